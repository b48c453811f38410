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
as ``kill -9`` or a crash would: no ``finally``, no clean-up. ``do = "kill-in-sqlite"``:
the kill comes from inside SQLite, ``steps`` virtual-machine steps into the call (SQLite's progress handler on
the call's connection: the first argument or its ``db``), so in the middle of a transaction or its commit.
``do = "exec"``: runs ``command`` (an argv) there and goes on, e.g. to stop the MTA in the middle of a run.
``once``: a file; the fault strikes only if it does not exist yet, and creates it (for a process started again
and again, such as the Lua worker). ``do = "raise"``: that call raises the error the
kernel or SQLite gives for it (OSError with that errno; SQLite's "database or disk is full" or "attempt to write
a readonly database": for a method of an object with a ``db`` connection, a State's, raised by its statements,
inside the method, as SQLite raises it). ``caller``: only calls made from a function of that name (one call site of a method
used in several places); ``caller_file``: only calls from a source file matching that glob (a method that both
the qrunner process and its Lua worker call: the worker's module runs as ``__main__``). ``arg``: only calls with a positional argument matching the glob (a path given to
``builtins:open`` or ``os:replace``; only writes, for ``open``).

``do = "probe"``: tries each ``[what, path]`` of ``attempts`` (``stat``, ``list``, ``read``, ``write``, ``create``,
``rename``) in the calling process, right there, and writes what each gave (``ok`` or the errno's name) as JSON to
``out``: what code that broke out of the Lua sandbox into the worker's process could do to the system.

``do = "replace"``: the call goes ahead with ``value`` (JSON: lists for tuples) in place of its first argument
after ``self``: what a Lua worker taken over by its script could send its root parent instead of its answer.

``{"target": ..., "do": "trace", "file": PATH, "as": "state"}``: no fault; each call from qrunner's runner,
executor or back-end interface (not from inside the traced module itself) appends ``CALLER AS METHOD`` to ``file``:
how tests/test_faults.py enumerates the steps a command takes.

``{"clock": SECONDS}``: ``time.time`` runs that many seconds off the real clock (negative: the clock stepped
back), as after an NTP step or a wrong hardware clock.

``{"torn_progress": SECONDS, "index": N}``: the Lua worker writes the progress block of call N (the index of the
call, then its start: qrunner.policy_worker.PROGRESS) in two parts, SECONDS apart: the new index beside the last
start, then the whole. It is what the parent reads when the kernel pauses the worker in the middle of that write
on a busy machine (``struct.pack_into`` stores one byte after another). N = -2 is the write that starts the
script's top level (``LOADING``).
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
    caller = sys._getframe(2).f_code
    if fault.get("caller") and caller.co_name != fault["caller"]:
        return False
    if fault.get("caller_file") and not fnmatch.fnmatch(caller.co_filename, fault["caller_file"]):
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


def _strike(fault: dict, args: tuple = ()) -> None:
    once = fault.get("once")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    do = fault.get("do", "kill")
    if do == "exec":
        import subprocess
        subprocess.run(fault["command"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    if do == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if do == "probe":
        _probe(fault["attempts"], fault["out"])
        return
    if do == "kill-in-sqlite":
        _kill_inside_sqlite(args, int(fault.get("steps", 100)))
        return
    raise _error(fault["error"])


def _attempt(what: str, path: str) -> str:
    try:
        if what == "stat":
            os.stat(path)
        elif what == "list":
            os.listdir(path)
        elif what == "read":
            open(path, "rb").close()
        elif what == "write":
            open(path, "ab").close()
        elif what == "create":
            open(path, "xb").close()
        elif what == "rename":
            os.rename(path, path + ".moved")
        return "ok"
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))


def _probe(attempts, out: str) -> None:
    results = [_attempt(what, path) for what, path in attempts]
    with open(out, "w") as handle:
        json.dump({"uid": os.getuid(), "results": results}, handle)


class _FailingConnection:
    """A State's connection whose statements fail as SQLite fails them; transactions pass to the real one."""

    def __init__(self, real, error: str):
        self.real, self.error = real, error

    def execute(self, *args, **kwargs):
        raise _error(self.error)

    executemany = executescript = execute

    def __enter__(self):
        return self.real.__enter__()

    def __exit__(self, *exc_info):
        return self.real.__exit__(*exc_info)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _kill_inside_sqlite(args: tuple, steps: int) -> None:
    """SIGKILL from inside SQLite, ``steps`` virtual-machine steps into the call: in the middle of a commit."""
    import sqlite3
    owner = args[0] if args else None
    connection = owner if isinstance(owner, sqlite3.Connection) else getattr(owner, "db", None)
    if not isinstance(connection, sqlite3.Connection):
        connection = next(a for a in args if isinstance(a, sqlite3.Connection))
    if not steps:
        connection.set_progress_handler(None, 0)
        return
    done = [0]

    def step() -> int:
        done[0] += 1
        if done[0] >= steps:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    connection.set_progress_handler(step, 1)  # SQLite counts per statement: count every step here instead


def _trace(function, fault: dict):
    name = function.__name__
    skip = os.path.normcase(inspect.getsourcefile(function) or "")

    @functools.wraps(function)
    def traced(*args, **kwargs):
        caller = sys._getframe(1).f_code
        if os.path.normcase(caller.co_filename) != skip and "/qrunner/" in caller.co_filename:
            with open(fault["file"], "a") as out:
                out.write(f"{caller.co_name} {fault['as']} {name}\n")
        return function(*args, **kwargs)

    return traced


def _replaced(function, fault: dict, args: tuple, kwargs: dict):
    """The call made with ``value`` in place of its first argument after ``self`` (once, if ``once`` says so)."""
    once = fault.get("once")
    if once:
        if os.path.exists(once):
            return function(*args, **kwargs)
        open(once, "w").close()
    return function(args[0], fault["value"], *args[2:], **kwargs)


def _wrap(function, fault: dict):
    if fault.get("do") == "trace":
        return _trace(function, fault)
    seen = [0]
    wanted = int(fault.get("call", 1))

    @functools.wraps(function)
    def faulty(*args, **kwargs):
        if not _matches(fault, args, kwargs):
            return function(*args, **kwargs)
        seen[0] += 1
        if seen[0] != wanted:
            return function(*args, **kwargs)
        owner = args[0] if args else None
        if fault.get("do") == "replace":
            return _replaced(function, fault, args, kwargs)
        if fault.get("do") == "raise" and fault["error"].startswith("sqlite") and hasattr(owner, "db"):
            real = owner.db  # a State method: its statement fails inside it, where SQLite would raise
            owner.db = _FailingConnection(real, fault["error"])
            try:
                return function(*args, **kwargs)
            finally:
                owner.db = real
        if fault.get("do") == "kill-in-sqlite":
            _strike(fault, args)  # the kill comes from inside the call
            try:
                return function(*args, **kwargs)
            finally:
                _kill_inside_sqlite(args, 0)  # the call needed fewer steps: no kill later, elsewhere
        if fault.get("when", "before") == "before":
            _strike(fault, args)
            return function(*args, **kwargs)
        result = function(*args, **kwargs)
        _strike(fault, args)
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
        # Kept until the module runs: a find_spec alone (coverage looks its source modules up) imports nothing.
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for fault in self.pending.pop(fullname, ()):
                _apply(module, fault)

        spec.loader.exec_module = exec_module
        return spec


def _tear_progress(pause: float, index: int) -> None:
    """struct.Struct, for the progress block's format only: the write of call ``index`` in two parts."""
    import struct
    import time

    class TornStruct(struct.Struct):
        def pack_into(self, buffer, offset, *values):
            if self.format == "=qd" and values and values[0] == index:
                struct.pack_into("=q", buffer, offset, values[0])
                time.sleep(pause)
            super().pack_into(buffer, offset, *values)

    struct.Struct = TornStruct


def _install() -> None:
    pending: dict = {}
    for fault in _FAULTS:
        if "clock" in fault:
            import time
            real, shift = time.time, float(fault["clock"])
            time.time = lambda: real() + shift
            continue
        if "torn_progress" in fault:
            _tear_progress(float(fault["torn_progress"]), int(fault.get("index", 0)))
            continue
        module_name = fault["target"].partition(":")[0]
        if module_name in sys.modules:
            _apply(sys.modules[module_name], fault)
        else:
            pending.setdefault(module_name, []).append(fault)
    if pending:
        sys.meta_path.insert(0, _ApplyOnImport(pending))


_install()
