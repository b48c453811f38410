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
  parent -> ("decide", [message...], base, kinds)
                                      worker -> ("results", [result...])*, ("done", uses)
  worker -> ("print", text)           at any time, for the parent's log
  worker -> ("abandon", reason)       the state is unusable; the worker exits
Results are sent in small batches (every few milliseconds), not one message
per round trip, so that a 10,000-message queue costs no more than it must.
The parent sends a pass as several "decide" requests (chunks), so that the
worker runs the first while the parent prepares the next and neither holds
a whole big queue's payloads at once; ``base`` is the chunk's first index in
the pass, and every index the worker reports (progress, results, prints)
counts from the start of the pass. A message's header source travels as a
source object or, for the common kinds, packed (:meth:`HeaderSource.pack`):
``(k, arg)`` with ``kinds[k]`` sent once per chunk; it is unpacked only when
the script first touches the headers.
"""

from __future__ import annotations

import importlib
import importlib.resources
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional, Sequence

from qrunner.message import header_data_columns

PROGRESS = struct.Struct("=qd")  # index of the call under way (-1: none), its monotonic start
LOADING = -2  # the PROGRESS index while the script's top level and Start() run
FLUSH_SECONDS = 0.01
FLUSH_COUNT = 500
PRINT_LIMIT = 200  # lines of print() output logged per call; a loop printing forever cannot flood the log

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

    Read once per process, on import. As a ``.lua`` file it is read, edited
    and checked as Lua, not as a string inside Python; its first line is a
    comment, so that line numbers in Lua's messages are those of the file.
    """
    return importlib.resources.files("qrunner").joinpath("prelude.lua").read_bytes()


PRELUDE = _read_prelude()


class _Writer:
    """Batches results to the parent: a send per few milliseconds, not per message.

    A thread of its own sends what has gathered, FLUSH_SECONDS after the first
    result of a batch, while the next calls run. So a result never waits here
    for the next call to return: when that call is stuck in C (no hook stops
    it) and the parent kills this process, every message decided before it has
    reached the parent, which waits for them, and none is decided again in the
    fresh state. lupa releases the GIL while Lua runs, so the thread runs while
    the main thread is stuck there.
    """

    def __init__(self, out: "_Outbox"):
        self.out = out
        self.pending: List[tuple] = []
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._send_batches, name="results", daemon=True)
        self.thread.start()

    def add(self, result: tuple) -> None:
        with self.ready:
            self.pending.append(result)
            if len(self.pending) == 1 or len(self.pending) >= FLUSH_COUNT:
                self.ready.notify()

    def _send_batches(self) -> None:
        while True:
            with self.ready:
                while not self.pending and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                if len(self.pending) < FLUSH_COUNT:
                    self.ready.wait(FLUSH_SECONDS)  # let a batch gather; FLUSH_COUNT or close() cut it short
                batch, self.pending = self.pending, []
            if batch:
                self.out.send(("results", batch))

    def close(self) -> None:
        """Send what is left, after the thread has sent its last batch: results arrive in order."""
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join()
        if self.pending:
            self.out.send(("results", self.pending))
            self.pending = []


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


class LuaState:
    """One sender's Lua state: the sandbox, the script's globals, its limits."""

    def __init__(self, conn: Connection, settings: Dict[str, Any]):
        lupa = importlib.import_module(LUA_MODULES[settings["lua"]])
        self.conn = conn
        self.settings = settings
        self.current_headers = None
        self.current_kinds: Sequence[tuple] = ()
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

    def _fetch_headers(self):
        source = self.current_headers
        if type(source) is tuple:  # packed: rebuilt only now that the script asks
            kind = self.current_kinds[source[0]]
            source = self.current_headers = kind[0].unpack(kind, source[1])
        lines = source.read() if source is not None else []
        names, values = header_data_columns(lines)
        problem = getattr(source, "problem", None)
        if problem:
            self.conn.send(("print", f"headers not available: {problem}", self.current_index))
        table_from = self.table_from
        return table_from(lines), table_from(names), table_from(values)


def _load(conn: Connection, settings: Dict[str, Any], progress) -> Optional[LuaState]:
    try:
        state = LuaState(conn, settings)
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


def _decide(conn: Connection, state: LuaState, messages: List[tuple], progress, base: int = 0,
            kinds: Sequence[tuple] = ()) -> bool:
    """Run CheckFile over a chunk (indices from ``base``); False when the state had to be abandoned."""
    writer = _Writer(conn)
    call = state.call
    table_from = state.table_from
    pack_into = PROGRESS.pack_into
    monotonic = time.monotonic
    add = writer.add
    state.current_kinds = kinds
    for index, (filename, size, ctime, returnpath, recipients, headers) in enumerate(messages, base):
        state.current_headers = headers
        state.current_index = index
        pack_into(progress, 0, index, monotonic())
        try:
            outcome = call(filename, size, ctime, returnpath, table_from(recipients))
        except MemoryError:
            outcome = (b"memory",)
        pack_into(progress, 0, -1, 0.0)
        if not isinstance(outcome, tuple):
            outcome = (outcome,)
        kind = outcome[0]
        if kind == b"ok":
            _, skip_kind, skip, prio_kind, prio, reason_kind, reason = outcome
            add((index, "ok", (_KINDS.get(skip_kind) or _text(skip_kind), skip, _KINDS.get(prio_kind) or _text(prio_kind),
                               prio, _KINDS.get(reason_kind) or _text(reason_kind), reason)))
            continue
        kind = _text(kind)
        if kind == "memory":
            writer.add((index, "memory", None))
            writer.close()
            conn.send(("abandon", "memory"))
            return False
        writer.add((index, kind, outcome[1:]))
    writer.close()
    state.current_index = None
    state.current_headers = None
    conn.send(("done", _text(state.used_globals())))
    return True


# Lua's type names as the parent reads them, decoded once.
_KINDS = {k.encode(): k for k in ("nil", "boolean", "number", "string", "table", "function", "userdata", "thread")}


def main(argv: List[str]) -> int:
    """Entry point: ``python -m qrunner.policy_worker CONN_FD PROGRESS_FD``."""
    import mmap

    conn = _Outbox(Connection(int(argv[0])))
    progress = mmap.mmap(int(argv[1]), PROGRESS.size)
    state: Optional[LuaState] = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return 0
        if request[0] == "load":
            state = _load(conn, request[1], progress)
        elif request[0] == "decide" and state is not None:
            if not _decide(conn, state, request[1], progress, *request[2:]):
                return 0
        elif request[0] == "quit":
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
