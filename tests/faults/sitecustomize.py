"""Fault injection for a qrunner subprocess, test-only: no hook of any kind lives in qrunner's own code.

tests/test_faults.py starts ``python -m qrunner`` with this directory first on PYTHONPATH, so Python imports
this module at start-up (``site`` does it for every interpreter, the Lua worker's included), and
``QRUNNER_FAULTS`` (a JSON list) says what to break. Each fault names a function by ``module:Owner.name`` or
``module:name`` and is applied the moment that module is imported (so nothing is imported that the run would not
import itself):

``{"target": "qrunner.state:State.mark_held", "when": "before" | "after", "call": N, "caller": "_hold",
"do": "kill" | "raise", "error": "ENOSPC" | "EROFS" | "EACCES" | "sqlite-full" | "sqlite-readonly",
"arg": "*glob*"}``

``do = "kill"``: the process SIGKILLs itself before (or just after) the N-th matching call (default the first),
as ``kill -9`` or a crash would: no ``finally``, no clean-up. ``do = "raise"``: that call raises the error the
kernel or SQLite gives for it (OSError with that errno; SQLite's "database or disk is full" or "attempt to write
a readonly database"). ``caller``: only calls made from a function of that name (one call site of a method
used in several places). ``arg``: only calls with a positional argument matching the glob (a path given to
``builtins:open`` or ``os:replace``; only writes, for ``open``).

``{"clock": SECONDS}``: ``time.time`` runs that many seconds off the real clock (negative: the clock stepped
back), as after an NTP step or a wrong hardware clock.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import importlib
import importlib.abc
import inspect
import json
import os
import signal
import sys

_FAULTS = json.loads(os.environ.get("QRUNNER_FAULTS") or "[]")


def _error(name: str) -> BaseException:
    if name.startswith("sqlite"):
        import sqlite3
        text = {"sqlite-full": "database or disk is full",
                "sqlite-readonly": "attempt to write a readonly database"}[name]
        return sqlite3.OperationalError(text)
    number = getattr(errno, name)
    return OSError(number, os.strerror(number))


def _matches(fault: dict, args: tuple, kwargs: dict) -> bool:
    if fault.get("caller") and sys._getframe(2).f_code.co_name != fault["caller"]:
        return False
    pattern = fault.get("arg")
    if pattern:
        texts = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
        if not any(fnmatch.fnmatch(t, pattern) for t in texts):
            return False
        if fault["target"] == "builtins:open":
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if not any(c in mode for c in "wax+"):
                return False
    return True


def _strike(fault: dict) -> None:
    if fault.get("do", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise _error(fault["error"])


def _wrap(function, fault: dict):
    seen = [0]
    wanted = int(fault.get("call", 1))

    @functools.wraps(function)
    def faulty(*args, **kwargs):
        if not _matches(fault, args, kwargs):
            return function(*args, **kwargs)
        seen[0] += 1
        if seen[0] != wanted:
            return function(*args, **kwargs)
        if fault.get("when", "before") == "before":
            _strike(fault)
        result = function(*args, **kwargs)
        _strike(fault)
        return result

    return faulty


def _apply(module, fault: dict) -> None:
    owner_name, _, name = fault["target"].partition(":")[2].rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    static = inspect.getattr_static(owner, name)
    if isinstance(static, staticmethod):
        setattr(owner, name, staticmethod(_wrap(static.__func__, fault)))
    else:
        setattr(owner, name, _wrap(getattr(owner, name), fault))


class _ApplyOnImport(importlib.abc.MetaPathFinder):
    """Applies the faults of a module right after it is first imported."""

    def __init__(self, pending: dict):
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        faults = self.pending.pop(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for fault in faults:
                _apply(module, fault)

        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    pending: dict = {}
    for fault in _FAULTS:
        if "clock" in fault:
            import time
            real, shift = time.time, float(fault["clock"])
            time.time = lambda: real() + shift
            continue
        module_name = fault["target"].partition(":")[0]
        if module_name in sys.modules:
            _apply(sys.modules[module_name], fault)
        else:
            pending.setdefault(module_name, []).append(fault)
    if pending:
        sys.meta_path.insert(0, _ApplyOnImport(pending))


_install()
