"""The Lua side of the policy: runs in its own process, one sender at a time.

Why a separate process: a Lua hook stops a busy loop, but never a single C
function (``string.find`` with a pathological pattern runs for minutes), and
on LuaJIT a memory error can take the whole process down. So the admin's
script runs here, and the parent (:mod:`qrunner.policy`) watches the wall
clock through a small shared memory block: before each ``CheckFile`` call the
worker writes the message's index and the time; if a call overruns, the
parent kills this process, records a policy error for that message and
starts a fresh worker for the rest of the pass. While the script's top level
and ``Start()`` run, the block holds ``LOADING`` and the time, so a load that
overruns is killed too (a load failure).

The protocol over the connection (pickled tuples):
  parent -> ("load", settings)        worker -> ("loaded", uses) | ("load_error", text)
  parent -> ("decide", [message...], base)
                                      worker -> ("results", [result...])*, ("done", uses)
  worker -> ("print", text)           at any time, for the parent's log
  worker -> ("headers", first, count) during a call; the parent answers on the header pipe
  worker -> ("abandon", reason)       the state is unusable; the worker exits
A result is ``(index, outcome)``, the outcome being CheckFile's values as
the prelude returns them (``(b"ok", kind, SkipSend, kind, Priority, kind,
Reason)``, ``(b"error", text)``, ``(b"timeout",)``, ``(b"memory",)``); the
parent reads them. Results are sent in small batches (every few
milliseconds), not one message per round trip, so that a 10,000-message
queue costs no more than it must.
The parent sends a pass as several "decide" requests (chunks), so that the
worker runs the first while the parent prepares the next and neither holds
a whole big queue's payloads at once; ``base`` is the chunk's first index in
the pass, and every index the worker reports (progress, results, prints)
counts from the start of the pass.

Headers: the worker runs the admin's script as an unprivileged user
(``script_user``, see :func:`enter_sandbox`), so it cannot read the MTA's
queue. The parent reads the header blocks and answers ``("headers", first,
count)`` on a pipe of its own with the fields of the messages ``first`` ..
``first + count - 1`` of the pass. A message's entry in "decide" says only
whether it has headers at all. The worker asks only when the script first
touches a message's headers, and asks for more messages at once (up to
HEADER_BATCH) while the script keeps reading the headers it was sent ahead:
a script that reads no header costs no read and no round trip, one that
reads every message's headers costs one round trip per batch, not per
message (:class:`_HeaderCache`).
"""

from __future__ import annotations

import collections
import importlib
import os
import struct
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from qrunner.wire import Connection


PROGRESS = struct.Struct("=qd")  # index of the call under way (-1: none), its monotonic start
LOADING = -2  # the PROGRESS index while the script's top level and Start() run
FLUSH_SECONDS = 0.01
PRINT_LIMIT = 200  # lines of print() output logged per call; a loop printing forever cannot flood the log
HEADER_BATCH = 128  # most messages' headers asked for in one round trip
# A script that reads the headers of one message in every few (up to this many) gets them read ahead
# too: reading a header block costs tens of microseconds, a round trip to the parent far more.
HEADER_GAP = 16

LUA_MODULES = {
    "5.1": "lupa.lua51",
    "5.2": "lupa.lua52",
    "5.3": "lupa.lua53",
    "5.4": "lupa.lua54",
    "5.5": "lupa.lua55",
    "luajit": "lupa.luajit21",
}

# Versions whose tables honour __len/__pairs and whose table library goes
# through metamethods; older ones get their headers before the call.
LAZY_HEADER_VERSIONS = ("5.3", "5.4", "5.5")

# Globals VPOP3 6.7 added; they exist with VPOP3's defaults so later scripts load.
VPOP3_GLOBALS = {
    "UseBATV": False,
    "MaxMessagesPerConnection": 0,
    "MaxRecipientsPerConnection": 0,
    "MaxRecipientsPerMessage": 0,
    "ConnectedServer": "",
}


def _read_prelude() -> bytes:
    """The Lua side's own code, shipped beside this module as package data (qrunner/prelude.lua).

    Read once per process, on import (so before the worker drops its
    privileges). As a ``.lua`` file it is read, edited
    and checked as Lua, not as a string inside Python; its first line is a
    comment, so that line numbers in Lua's messages are those of the file.
    Read as a plain file beside this one: importing importlib.resources
    (pathlib, tempfile, zipfile's helpers) was over a third of the worker's
    imports; it is the fallback for a package that is not plain files.
    """
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prelude.lua"), "rb") as handle:
            return handle.read()
    except OSError:
        import importlib.resources

        return importlib.resources.files("qrunner").joinpath("prelude.lua").read_bytes()


PRELUDE = _read_prelude()


class _Writer:
    """Batches results to the parent: a send per few milliseconds, not per message.

    A thread of its own sends what has gathered every FLUSH_SECONDS, while
    the next calls run. So a result never waits here for the next call to
    return: when that call is stuck in C (no hook stops it) and the parent
    kills this process, every message decided before it has reached the
    parent, which waits for them, and none is decided again in the fresh
    state. lupa releases the GIL while Lua runs, so the thread runs while the
    main thread is stuck there. Results wait in a deque (whose append and
    popleft are atomic), so adding one costs no lock and no wake-up: the main
    thread adds one per message, and the thread looks on its own clock.
    """

    def __init__(self, out: "_Outbox"):
        self.out = out
        self.pending: collections.deque = collections.deque()
        self.add = self.pending.append
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._send_batches, name="results", daemon=True)
        self.thread.start()

    def _send_batches(self) -> None:
        pending, popleft = self.pending, self.pending.popleft
        while not self.closing.wait(FLUSH_SECONDS):
            if pending:
                self.out.send(("results", [popleft() for _ in range(len(pending))]))

    def close(self) -> None:
        """Send what is left, after the thread has sent its last batch: results arrive in order."""
        self.closing.set()
        self.thread.join()
        if self.pending:
            self.out.send(("results", list(self.pending)))
            self.pending.clear()


class _Outbox:
    """The connection to the parent, shared by the main thread and the writer's: one send at a time."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self.lock:
            self.conn.send(message)

    def recv(self) -> Any:
        return self.conn.recv()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _HeaderCache:
    """The header fields the parent has sent, by index in the pass; asks for more in batches that grow.

    The first request is for the one message the script touches, so a
    script that reads the headers of one message in a thousand reads one
    file. While the script goes on to use the fields sent ahead, each
    request asks for twice as many messages (up to HEADER_BATCH); when it
    leaves most of them unused, half as many, but never too few to reach
    the script's next read when it reads every few messages (HEADER_GAP).
    """

    def __init__(self, out: "_Outbox", pipe: Optional[Connection]):
        self.out = out
        self.pipe = pipe
        self.fields: Dict[int, Optional[tuple]] = {}
        self.batch = 1
        self.ahead = 0  # messages sent ahead in the last answer
        self.used = 0  # of those, the ones the script read
        self.asked = False  # a request made in this pass
        self.last = 0  # the message of the last request

    def clear(self) -> None:
        """A new pass (indices count afresh): forget what was sent ahead."""
        self.fields.clear()
        self.ahead = self.used = 0
        self.batch = 1
        self.asked = False

    def get(self, index: int) -> Tuple[List[bytes], Optional[str]]:
        entry = self.fields.pop(index, None)
        if entry is not None:
            self.used += 1
            return entry
        if self.asked:
            grown = 2 * self.batch if 2 * self.used >= self.ahead else max(1, self.batch // 2)
            gap = index - self.last
            if 0 < gap <= HEADER_GAP:
                grown = max(grown, 2 * gap)  # a script reading every few messages: cover two of its reads
            self.batch = min(grown, HEADER_BATCH)
        self.last = index
        self.fields.clear()
        return self._ask(index)

    def _ask(self, index: int) -> Tuple[List[bytes], Optional[str]]:
        if self.pipe is None:
            return [], "no header pipe to qrunner"
        try:
            self.out.send(("headers", index, self.batch))
            first, entries = self.pipe.recv()
        except (EOFError, OSError):
            return [], "qrunner stopped answering header requests"
        self.ahead = self.used = 0
        for offset, entry in enumerate(entries[1:], first + 1):
            if entry is not None:
                self.fields[offset] = entry
                self.ahead += 1
        self.asked = True
        return entries[0] if first == index and entries else ([], "qrunner sent the headers of another message")


class LuaState:
    """One sender's Lua state: the sandbox, the script's globals, its limits."""

    def __init__(self, conn: "_Outbox", settings: Dict[str, Any], headers: _HeaderCache):
        lupa = importlib.import_module(LUA_MODULES[settings["lua"]])
        self.conn = conn
        self.settings = settings
        self.headers = headers
        self.current_has_headers = False
        self.current_index: Optional[int] = None
        kwargs: Dict[str, Any] = {"encoding": None, "unpack_returned_tuples": True, "register_eval": False,
                                  "register_builtins": False}
        kwargs["max_memory"] = settings["memory_mb"] << 20
        self.lua = lupa.LuaRuntime(**kwargs)
        opts = {
            b"timeout": float(settings["timeout"]),
            b"now": settings.get("now"),
            b"senderid": settings["sender_id"],
            b"sendername": settings["sender_name"].encode(),
            b"print_limit": PRINT_LIMIT,
            b"lazy_headers": settings["lua"] in LAZY_HEADER_VERSIONS,
            b"vpop3_globals": self.lua.table_from({k.encode(): (v.encode() if isinstance(v, str) else v)
                                                    for k, v in VPOP3_GLOBALS.items()}),
        }
        prelude = self.lua.execute(PRELUDE, self._print, self._fetch_headers, self.lua.table_from(opts))
        self.call = prelude[b"call"]
        self.run_top = prelude[b"run_top"]
        self.used_globals = prelude[b"used_globals"]
        self.table_from = self.lua.table_from

    def _print(self, text: bytes) -> None:
        self.conn.send(("print", _text(text), self.current_index))

    def _fetch_headers(self, index: Optional[int] = None):
        """The header lines of message ``index`` of the pass (the call under way when None): the lazy tables of a
        message the script kept from an earlier call still get that message's own."""
        current = self.current_index
        if index is None:
            index = current
        # Outside any call (Lua collecting a kept table as the state closes, say) nothing is asked of qrunner:
        # the parent may be waiting for another answer on the connection.
        if current is None or (index == current and not self.current_has_headers):
            lines, problem = [], None
        else:
            lines, problem = self.headers.get(index)
        if problem:
            self.conn.send(("print", f"headers not available: {problem}", index))
        return self.table_from(lines)  # the prelude reads HeaderData from the lines (fill_tables)


def _load(conn: "_Outbox", settings: Dict[str, Any], progress, headers: _HeaderCache) -> Optional[LuaState]:
    try:
        state = LuaState(conn, settings, headers)
    except MemoryError:
        conn.send(("load_error", "memory", f"the Lua state could not be created within {settings['memory_mb']} MB"))
        return None
    except Exception as exc:  # lupa reports a missing Lua build or a broken prelude this way
        conn.send(("load_error", "error", f"cannot start Lua {settings['lua']}: {exc}"))
        return None
    PROGRESS.pack_into(progress, 0, LOADING, time.monotonic())
    try:
        outcome = state.run_top(settings["script_text"], ("@" + settings["script_name"]).encode())
    except MemoryError:
        outcome = (b"memory",)
    finally:
        PROGRESS.pack_into(progress, 0, -1, 0.0)
    if not isinstance(outcome, tuple):
        outcome = (outcome,)
    kind = _text(outcome[0])
    detail = _text(outcome[1]) if len(outcome) > 1 and outcome[1] is not None else ""
    if kind != "ok":
        conn.send(("load_error", kind, detail))
        return None
    conn.send(("loaded", _text(state.used_globals())))
    return state


def _decide(conn: "_Outbox", state: LuaState, messages: List[tuple], progress, base: int = 0) -> bool:
    """Run CheckFile over a chunk (indices from ``base``); False when the state had to be abandoned.

    Each result goes to the parent as ``(index, outcome)``, the call's
    return values as Lua gave them (the parent reads them): the loop does
    as little as it can per message. The progress block names the call
    under way; it is not cleared between two calls of a chunk (a call's
    bookkeeping takes microseconds, and the next call overwrites it), only
    when the chunk ends.
    """
    writer = _Writer(conn)
    call = state.call
    table_from = state.table_from
    pack_into = PROGRESS.pack_into
    monotonic = time.monotonic
    add = writer.add
    if base == 0:
        state.headers.clear()
    try:
        for index, (filename, size, ctime, returnpath, recipients, has_headers) in enumerate(messages, base):
            state.current_has_headers = has_headers
            state.current_index = index
            pack_into(progress, 0, index, monotonic())
            try:
                outcome = call(filename, size, ctime, returnpath, table_from(recipients), index)
            except MemoryError:
                outcome = (b"memory",)
            if type(outcome) is not tuple:
                outcome = (outcome,)
            if outcome[0] == b"memory":
                pack_into(progress, 0, -1, 0.0)
                add((index, outcome))
                writer.close()
                conn.send(("abandon", "memory"))
                return False
            add((index, outcome))
    finally:
        pack_into(progress, 0, -1, 0.0)
    writer.close()
    state.current_index = None
    state.current_has_headers = False
    conn.send(("done", _text(state.used_globals())))
    return True


PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


def _prctl(libc, option: int, arg: int = 0) -> int:
    # prctl is variadic and reads unsigned longs: pass every argument at full width
    import ctypes

    ulong = ctypes.c_ulong
    return libc.prctl(ctypes.c_int(option), ulong(arg), ulong(0), ulong(0), ulong(0))


def _status() -> Dict[str, str]:
    with open("/proc/self/status") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def enter_sandbox(uid: Optional[int], gid: Optional[int]) -> None:
    """Become ``uid``/``gid`` for good, with no supplementary group, no capability and no way back.

    Called once, after Python, the qrunner package and lupa are loaded and
    before any of the admin's code runs. ``uid`` None (qrunner not run as
    root, or ``script_user = "root"``): the user stays, only no_new_privs is
    set. As root: the capability bounding set is emptied (where this process
    may), then setgroups([]), setresgid, setresuid (the kernel clears the
    permitted and effective capabilities on the change from uid 0), then
    PR_SET_NO_NEW_PRIVS, so no setuid program or file capability can give
    any of it back; last, /proc/self/status must show the result, or this
    raises and no script runs.
    """
    import ctypes  # here, not at the top: the parent imports this module for the protocol and needs no ctypes

    os.chdir("/")
    libc = ctypes.CDLL(None, use_errno=True)
    if uid is not None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as handle:
                last_cap = int(handle.read())
        except (OSError, ValueError):
            last_cap = 63
        for cap in range(last_cap + 1):
            _prctl(libc, PR_CAPBSET_DROP, cap)  # fails without CAP_SETPCAP (some containers): the checks below decide
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if _prctl(libc, PR_SET_NO_NEW_PRIVS, 1) != 0:
        error = ctypes.get_errno()
        raise OSError(error, "prctl(PR_SET_NO_NEW_PRIVS) failed: " + os.strerror(error))
    if uid is None:
        return
    status = _status()
    wrong = []
    if status.get("Uid", "").split() != [str(uid)] * 4:
        wrong.append("uids " + status.get("Uid", "?"))
    if status.get("Gid", "").split() != [str(gid)] * 4:
        wrong.append("gids " + status.get("Gid", "?"))
    if status.get("Groups", "").split():
        wrong.append("groups " + status["Groups"])
    for field in ("CapPrm", "CapEff", "CapAmb"):
        if field in status and int(status[field], 16) != 0:
            wrong.append(f"{field} {status[field]}")
    if status.get("NoNewPrivs", "1").strip() != "1":
        wrong.append("no_new_privs not set")
    if wrong:
        raise PermissionError("the Lua worker did not drop its privileges: " + ", ".join(wrong))


def main(argv: List[str]) -> int:
    """Entry point: ``python -m qrunner.policy_worker CONN_FD PROGRESS_FD HEADER_FD LUA UID GID``.

    UID and GID are ``-`` when there is nothing to drop. The Lua module is
    imported before the drop (the worker's user need not read the venv's
    files, though in practice it can).
    """
    import mmap

    conn = _Outbox(Connection(int(argv[0])))
    progress = mmap.mmap(int(argv[1]), PROGRESS.size)
    header_pipe = Connection(int(argv[2]))  # read only: the parent's end is the writing one
    try:
        importlib.import_module(LUA_MODULES[argv[3]])
    except Exception:
        pass  # the load request reports it, in words
    uid = None if argv[4] == "-" else int(argv[4])
    gid = None if argv[5] == "-" else int(argv[5])
    refused: Optional[str] = None
    try:
        enter_sandbox(uid, gid)
    except OSError as error:
        refused = str(error) if isinstance(error, PermissionError) and not error.errno else \
            f"the Lua worker could not drop its privileges to uid {uid}, gid {gid}: {error.strerror or error}"
    headers = _HeaderCache(conn, header_pipe)
    state: Optional[LuaState] = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return 0
        if request[0] == "load":
            if refused:
                conn.send(("load_error", "sandbox", refused))
                continue
            state = _load(conn, request[1], progress, headers)
        elif request[0] == "decide" and state is not None:
            if not _decide(conn, state, request[1], progress, *request[2:]):
                return 0
        elif request[0] == "quit":
            return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Exit without the interpreter's exit handlers: they were registered by
    # root (a coverage run's data file, say) and the worker may no longer
    # write where they would; nothing of the worker's own is left unsent.
    sys.stdout.flush()
    os._exit(code)
