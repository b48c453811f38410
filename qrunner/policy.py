"""The policy: the admin's ``relayout.lua`` decides, per message, per sender.

This module is the parent side; the Lua side runs in a worker process
(:mod:`qrunner.policy_worker`) that this module starts, feeds in batches and
watches. It knows nothing of Postfix or Exim: it takes :class:`Message`
records and returns one :class:`Decision` per message.

The rules (VPOP3's API, made exact in DESIGN.md section 2):

* messages are offered oldest first; senders run in ascending id order; the
  first sender sees every message, each later one only what the earlier ones
  skipped; the first sender that does not skip a message sends it;
* ``SkipSend``: true or a number other than 0 skips; false, nil and 0 send;
* ``Priority``: 1..100 (default 50), clamped with a warning, fractions
  rounded down; ``Reason``: a string, a number is turned into one;
* anything else (a runtime error, a timeout, a bad value) is a policy error,
  handled by ``on_script_error``: ``skip`` holds the message (fail closed),
  ``send`` sends it at priority 50.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import mmap
import os
import pickle
import pwd
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import Pipe
from typing import Dict, List, Optional, Sequence, Set, Tuple

from qrunner import trust
from qrunner.config import Sender
from qrunner.decision import Decision, Verdict
from qrunner.exceptions import ConfigError, ScriptLoadError
from qrunner.message import Message, NoHeaders, arrival_order
from qrunner.policy_worker import LOADING, PROGRESS
from qrunner.progress import NONE as NO_PROGRESS, Progress, Tick, no_tick

log = logging.getLogger("qrunner.policy")

DEFAULT_PRIORITY = 50
WATCHDOG_GRACE = 0.25  # wall-clock seconds past script_timeout before the worker is killed
WATCHDOG_POLL = 0.05  # seconds between the watchdog's looks at the worker's progress
STARTUP_ALLOWANCE = 10.0  # seconds a fresh worker may take to start Lua, on top of the script's own limits
HEADER_BATCH_BYTES = 4 << 20  # header text sent ahead in one answer at most (the message asked for always goes)
AHEAD_MIN = 4  # a header request for this many messages or more: the next batch is read before it is asked for
HEADER_BATCH_AHEAD = 128  # messages read before they are asked for, at most (the worker's HEADER_BATCH)
DEFAULT_SCRIPT_USER = "_qrunner"
PRINTED_LINE_CHARS = 4096  # characters of one printed line that reach the log; the rest is counted, not logged

# What governs, in qrunner, the knobs that later VPOP3 versions gave scripts.
VPOP3_EXTRAS = {
    "UseBATV": "BATV signing belongs to the MTA (a milter or Exim's BATV support)",
    "MaxMessagesPerConnection": "Postfix's smtp_connection_reuse_count_limit or Exim's connection_max_messages",
    "MaxRecipientsPerConnection": "Postfix's smtp_destination_recipient_limit or Exim's max_rcpt",
    "MaxRecipientsPerMessage": "Postfix's smtp_destination_recipient_limit or Exim's max_rcpt",
    "ConnectedServer": "the MTA's SMTP client; see its log",
    "ServerConnected": "the MTA's SMTP client, which qrunner does not drive; never called",
    "ReturnCodeHandler": "the MTA's SMTP client, which qrunner does not drive; never called",
}


@dataclass(frozen=True)
class PolicySettings:
    """How the script runs: which file, which Lua, which limits, which clock."""

    script: str
    lua: str = "5.4"
    timeout: float = 2.0
    memory_mb: int = 64
    on_script_error: str = "skip"
    now: Optional[int] = None  # epoch seconds the script's clock shows; None: the real clock
    strict_modes: bool = True  # as root, refuse a script someone other than root could change (qrunner/trust.py)
    script_user: str = DEFAULT_SCRIPT_USER  # whom the Lua worker runs as, when qrunner runs as root


def worker_identity(user: str) -> Tuple[Optional[int], Optional[int]]:
    """The uid and gid the Lua worker drops to: (None, None) when there is nothing to drop.

    Not root (an admin trying ``qrunner plan`` as themselves): the worker
    runs as that user, which cannot do what root can. ``script_user =
    "root"``: the admin's explicit choice to run the script as root, as
    qrunner did before it had a worker user. A user that does not exist is a
    configuration error (exit 78), not a silent fallback to root.
    """
    if os.geteuid() != 0 or user == "root":
        return None, None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"script_user {user!r} does not exist, and qrunner runs the policy script as that user when run as "
            f"root; create it (adduser --system --group --no-create-home --home /nonexistent {user}, as make "
            f"install and the package do) or set script_user = \"root\" to run the script as root knowingly.")
    if entry.pw_uid == 0:
        return None, None
    return entry.pw_uid, entry.pw_gid


def lupa_version() -> str:
    import lupa

    return getattr(lupa, "__version__", "?")


def lua_implementation(lua: str) -> str:
    """The Lua that ``lua`` (a configuration value) runs, as it names itself ("Lua 5.4", "LuaJIT 2.1...")."""
    from qrunner.policy_worker import LUA_MODULES

    try:
        module = importlib.import_module(LUA_MODULES[lua])
        return module.LuaRuntime().lua_implementation
    except (ImportError, KeyError, AttributeError) as error:
        return f"Lua {lua} not available ({error})"


def _as_number(kind: str, value) -> Optional[float]:
    if kind != "number" or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _read_skip(kind: str, value) -> Tuple[bool, Optional[str]]:
    if kind == "nil":
        return False, None
    if kind == "boolean":
        return bool(value), None
    number = _as_number(kind, value)
    if number is None:
        shown = "NaN" if kind == "number" else f"a {kind}"
        return True, f"SkipSend must be true, false or a number, not {shown}"
    return number != 0, None


def _read_priority(kind: str, value, where: str) -> Tuple[int, Optional[str]]:
    if kind == "nil":
        return DEFAULT_PRIORITY, None
    number = _as_number(kind, value)
    if number is None:
        shown = "NaN" if kind == "number" else f"a {kind}"
        return DEFAULT_PRIORITY, f"Priority must be a number from 1 to 100, not {shown}"
    clamped = min(100, max(1, number))
    if clamped != number:
        log.warning("%s: Priority %s is outside 1..100, clamped to %d", where, _lua_number(number), int(clamped))
    return int(math.floor(clamped)), None


def _lua_number(number) -> str:
    if isinstance(number, float) and math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return str(number)


def _read_reason(kind: str, value) -> Tuple[str, Optional[str]]:
    if kind == "nil":
        return "", None
    if kind == "string":
        return value.decode("utf-8", "replace"), None
    return "", f"Reason must be a string or a number, not a {kind}"


def verdict_from_result(sender: Sender, values: Sequence, where: str, on_error: str) -> Verdict:
    """Read a successful call's (SkipSend, Priority, Reason) by the rules above."""
    skip_kind, skip_value, prio_kind, prio_value, reason_kind, reason_value = values
    skip, skip_error = _read_skip(skip_kind, skip_value)
    priority, prio_error = _read_priority(prio_kind, prio_value, where)
    reason, reason_error = _read_reason(reason_kind, reason_value)
    errors = [e for e in (skip_error, prio_error, reason_error) if e]
    if errors:
        return policy_error(sender, "; ".join(errors), on_error)
    if skip and not reason:
        reason = f"skipped by sender {sender.name}, no reason given"
    return Verdict(sender, skip, priority, reason if skip else "")


def policy_error(sender: Sender, error: str, on_error: str) -> Verdict:
    """A failed call: held (``skip``, fail closed) or sent at priority 50 (``send``)."""
    if on_error == "send":
        return Verdict(sender, False, DEFAULT_PRIORITY, "", error)
    return Verdict(sender, True, DEFAULT_PRIORITY, f"policy error: {error}", error)


def combine(message: Message, verdicts: Sequence[Verdict], several: bool) -> Decision:
    """One message's decision from its senders' verdicts, in sender order."""
    if type(verdicts) is not tuple:
        verdicts = tuple(verdicts)
    for verdict in verdicts:
        if not verdict.skip:
            return Decision(message, True, verdict.priority, verdict.sender, "", verdicts, several)
    reasons = [f"{v.sender.name}: {v.reason}" if several else v.reason for v in verdicts]
    priority = verdicts[-1].priority if verdicts else DEFAULT_PRIORITY
    return Decision(message, False, priority, None, "; ".join(reasons), verdicts, several)


# Lua's type names as the worker sends them, decoded once.
_KINDS = {k.encode(): k for k in ("nil", "boolean", "number", "string", "table", "function", "userdata", "thread")}


def _word(value) -> str:
    if type(value) is bytes:
        return _KINDS.get(value) or value.decode("utf-8", "replace")
    return str(value)


def _outcome(outcome) -> Tuple[str, tuple]:
    """A call's outcome as the worker sent it, read: ("ok", the six kinds and values) or (its kind, the rest)."""
    if type(outcome) is not tuple or not outcome:
        return "error", ("the Lua worker sent an unreadable result",)
    kind = _word(outcome[0])
    rest = outcome[1:]
    if kind == "ok":
        if len(rest) != 6:
            return "error", ("the Lua worker sent an unreadable result",)
        return kind, (_word(rest[0]), rest[1], _word(rest[2]), rest[3], _word(rest[4]), rest[5])
    return kind, rest


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


CHUNK = 1000  # messages per "decide" request: the worker runs one while the parent prepares the next


class _Payloads:
    """The CheckFile arguments of a chunk of messages, as the worker takes them.

    A message's headers stay here: its entry says only whether it has any
    (the worker asks for them when the script touches them, see
    :meth:`PolicyEngine._serve_headers`). A message's arrival time is
    formatted once per second it shares with others.
    """

    def __init__(self) -> None:
        self._times: Dict[int, bytes] = {}

    def chunk(self, messages: Sequence[Message]) -> List[tuple]:
        times = self._times
        payloads = []
        for message in messages:
            second = int(message.arrival)
            created = times.get(second)
            if created is None:
                if len(times) > 4096:
                    times.clear()
                created = times[second] = message.creation_time().encode()
            payloads.append((message.queue_file().encode("utf-8", "surrogateescape"), message.size, created,
                             message.sender.encode("utf-8", "surrogateescape"),
                             tuple([r.encode("utf-8", "surrogateescape") for r in message.recipients]),
                             not isinstance(message.headers, NoHeaders)))
        return payloads


class _Feeder(threading.Thread):
    """Sends one pass's messages to the worker in chunks, from its own thread.

    A thread, so that the parent's watchdog never waits on a send: while
    the worker runs a chunk it reads nothing, and a chunk sent ahead can
    fill the connection. When the worker is killed, the send fails and the
    feeder ends; :meth:`_Worker.close` waits for it before it closes the
    connection, so that no stale chunk ever reaches another worker.
    """

    def __init__(self, conn, messages: Sequence[Message], pending: Sequence[int]):
        super().__init__(name="qrunner-policy-feeder", daemon=True)
        self.conn = conn
        self.messages = messages
        self.pending = pending
        self.chunks = (len(pending) + CHUNK - 1) // CHUNK
        self.stop = False

    def run(self) -> None:
        payloads = _Payloads()
        messages, pending = self.messages, self.pending
        try:
            for base in range(0, len(pending), CHUNK):
                if self.stop:
                    return
                chunk = payloads.chunk([messages[i] for i in pending[base:base + CHUNK]])
                self.conn.send(("decide", chunk, base))
        except (OSError, ValueError, EOFError):
            pass  # the worker is gone (killed by the watchdog, or died): the pass goes on in a fresh one


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: tuples, lists, strings, bytes, numbers, None.

    The worker runs the admin's script as an unprivileged user; what it
    sends must never be able to run code in this process, which is root.
    A pickle can name any importable function to call; this one names
    none, so a worker that the script somehow took over can at worst send
    wrong results (read like any other bad result) or garbage (an error).
    """

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the Lua worker sent a {module}.{name}, not plain data")


class _Worker:
    """A running worker process, its connections and its progress block.

    Two connections: requests and results over one; on the other, only
    the answers to the worker's header requests, so that an answer never
    queues behind a chunk the feeder is sending.
    """

    def __init__(self, lua: str, identity: Tuple[Optional[int], Optional[int]]) -> None:
        parent_end, child_end = Pipe()
        header_read, header_write = Pipe(duplex=False)
        self._progress_file = tempfile.TemporaryFile()
        self._progress_file.truncate(PROGRESS.size)
        self.progress_map = mmap.mmap(self._progress_file.fileno(), PROGRESS.size)
        PROGRESS.pack_into(self.progress_map, 0, -1, 0.0)
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        fds = (child_end.fileno(), self._progress_file.fileno(), header_read.fileno())
        uid, gid = identity
        # cwd "/": ``python -m`` puts its working directory first on sys.path, so a worker started where qrunner was
        # (say /tmp) would import, as root and before it drops to script_user, a ``qrunner`` package (or a module
        # named like one it imports) that anyone could have put there. The worker finds its own package through
        # PYTHONPATH (above); it works from "/" in any case (enter_sandbox).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qrunner.policy_worker", *map(str, fds), lua,
             "-" if uid is None else str(uid), "-" if gid is None else str(gid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=fds, env=env, cwd="/",
        )
        child_end.close()
        header_read.close()
        self.conn = parent_end
        self.header_pipe = header_write
        self.sender: Optional[Sender] = None
        self.loading: Optional[Sender] = None  # a load request sent and not yet answered
        self.feeder: Optional[_Feeder] = None  # the thread sending the current pass, if any

    def progress(self) -> Tuple[int, float]:
        return PROGRESS.unpack_from(self.progress_map, 0)

    def receive(self) -> tuple:
        """The worker's next message, unpickled with no class or function allowed (:class:`_PlainUnpickler`)."""
        data = self.conn.recv_bytes()
        try:
            return _PlainUnpickler(io.BytesIO(data)).load()
        except Exception as error:  # anything but plain data: treated as a worker that died
            raise OSError(f"unreadable message from the Lua worker: {error}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.close()

    def _end_feeder(self) -> None:
        """The feeder is done before the connection closes (its fd must never reach another worker)."""
        feeder = self.feeder
        if feeder is None:
            return
        feeder.stop = True
        if feeder.is_alive():
            if self.proc.poll() is None:
                self.proc.kill()  # a chunk half-sent cannot be followed by "quit"
                self.proc.wait()
            feeder.join()
        self.feeder = None

    def close(self) -> None:
        try:
            self._end_feeder()
            if self.proc.poll() is None:
                try:
                    self.conn.send(("quit",))
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self.conn.close()
            self.header_pipe.close()
            self.progress_map.close()
            self._progress_file.close()


class _CallClock:
    """When the parent first saw the call the worker's progress block names: what the watchdog counts from.

    The worker writes the block (the call's index, then its start on its
    own clock) with plain stores, one byte after another, and nothing stops
    the kernel from pausing it half-way on a busy machine. A read then finds
    the new index beside the last start, or a start whose bytes mix two
    values; after a pass or a load the last start is 0.0, so a call that has
    just begun looked hours old and was killed at once ("did not return
    within 2 s" after a few milliseconds, seen about once in 15 runs on a
    loaded 2-core machine). Counted from the parent's first sight of each
    (index, start) it reads, a half-written block only moves the deadline
    later, by the moment the write takes to finish: every reading is a new
    one, seen now. A call that is really stuck wrote its block long before,
    and is killed ``limit`` after the parent first saw it (never before its
    own start plus ``limit``, at most one look, WATCHDOG_POLL, after).
    """

    __slots__ = ("seen", "since")

    def __init__(self) -> None:
        self.seen: Optional[Tuple[int, float]] = None
        self.since = 0.0

    def first_seen(self, progress: Tuple[int, float], now: float) -> float:
        if progress != self.seen:
            self.seen, self.since = progress, now
        return self.since


class _Stuck(Exception):
    """The worker overran a call or died.

    ``index`` is the call under way (in the batch sent), None when the worker
    died between calls; then the first undecided message takes the blame, so
    a worker that keeps dying cannot loop forever.
    """

    def __init__(self, index: Optional[int], why: str):
        super().__init__(why)
        self.index = index
        self.why = why


class PolicyEngine:
    """Runs the admin's script over messages, sender by sender.

    Use as a context manager; :meth:`decide` is the whole job. A script that
    does not load raises :class:`ScriptLoadError` before any message is
    decided, so the caller changes nothing in the queue.
    """

    def __init__(self, settings: PolicySettings, progress: Progress = NO_PROGRESS):
        self.settings = settings
        self.progress = progress
        self._script_text = self._read_script(settings.script, settings.strict_modes and trust.enforced())
        self._identity = worker_identity(settings.script_user)
        self._worker: Optional[_Worker] = None
        self._extras_used: Set[str] = set()
        self._tick: Tick = no_tick
        self._singles: Dict[int, Tuple[Verdict]] = {}  # id of a verdict shared by messages -> its 1-tuple

    @staticmethod
    def _read_script(path: str, strict: bool = False) -> bytes:
        """The script's text as the standard ``lua`` loads a file: a UTF-8 BOM and a first ``#`` line skipped.

        The ``#`` line (``#!/usr/bin/lua``) is blanked, not removed, so that
        Lua's line numbers stay the file's. A compiled chunk is refused here,
        naming the file: qrunner loads source text only, since bytecode can
        escape any sandbox. ``strict``: the file (and every directory on
        its path) must be root's alone, as sshd's StrictModes wants
        (qrunner/trust.py); checked on the open file, before it is read.
        """
        try:
            with open(path, "rb") as handle:
                unsafe = trust.check_opened(path, handle.fileno(), "the policy script",
                                            " (or set strict_modes = false in qrunner.toml)") if strict else None
                if unsafe:
                    raise ScriptLoadError(unsafe)
                text = handle.read()
        except FileNotFoundError:
            raise ScriptLoadError(f"{path}: policy script not found; set 'script' in the configuration or pass --script.")
        except OSError as exc:
            raise ScriptLoadError(f"{path}: cannot read the policy script: {exc.strerror}.")
        if text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        if text.startswith(b"#"):
            end = text.find(b"\n")
            text = b"" if end < 0 else text[end:]
        if text.startswith(b"\x1bLua"):
            raise ScriptLoadError(f"{path}: is compiled Lua (bytecode, as luac writes it); qrunner loads policy "
                                  "scripts as source text only, since bytecode can escape the sandbox: point "
                                  "'script' at the .lua source.")
        return text

    def __enter__(self) -> "PolicyEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # -- the job -----------------------------------------------------------

    def decide(self, messages: Sequence[Message], senders: Sequence[Sender]) -> List[Decision]:
        """Every message's decision, in arrival order (oldest first)."""
        ordered = arrival_order(messages)
        verdicts: List[Tuple[Verdict, ...]] = [()] * len(ordered)
        singles = self._singles  # the messages that share a verdict share its 1-tuple too
        remaining: Sequence[int] = range(len(ordered))
        for sender in senders:
            with self.progress.bar(f"policy, sender {sender.name}", len(remaining)) as self._tick:
                answers = self.run_pass(sender, [ordered[i] for i in remaining])
            for i, verdict in zip(remaining, answers):
                earlier = verdicts[i]
                if earlier:
                    verdicts[i] = earlier + (verdict,)
                    continue
                verdicts[i] = singles.get(id(verdict)) or (verdict,)
            remaining = [i for i, verdict in zip(remaining, answers) if verdict.skip]
        singles.clear()
        self._log_extras()
        several = len(senders) > 1
        return [combine(m, v, several) for m, v in zip(ordered, verdicts)]

    def load(self, sender: Sender) -> None:
        """Load the script for ``sender`` (top level, then ``Start()``)."""
        self._loaded_worker(sender)

    def run_pass(self, sender: Sender, messages: Sequence[Message]) -> List[Verdict]:
        """One sender's verdicts on ``messages``, in the order given."""
        results: List[Optional[Verdict]] = [None] * len(messages)
        self._loaded_worker(sender)
        pending = list(range(len(messages)))
        while True:
            if not pending:
                return results  # type: ignore[return-value]
            worker = self._loaded_worker(sender)
            feeder = worker.feeder = _Feeder(worker.conn, messages, pending)
            feeder.start()
            try:
                self._collect(worker, sender, messages, pending, results, feeder.chunks)
            except _Stuck as stuck:
                self._worker = None
                if stuck.index is None:
                    # Between calls: the first message without a result is the one it was about to decide. None
                    # is without one when the worker died after its last result: the pass is complete.
                    stuck.index = next((n for n, i in enumerate(pending) if results[i] is None), None)
                if stuck.index is not None:
                    message = messages[pending[stuck.index]]
                    results[pending[stuck.index]] = policy_error(sender, stuck.why, self.settings.on_script_error)
                    log.error("%s: sender %s: %s; the Lua state was abandoned and the rest of this pass runs in a "
                              "fresh state (top level and Start() run again)", message.queue_id, sender.name,
                              stuck.why)
            if worker.feeder is feeder:
                worker._end_feeder()
            pending = [i for i in pending if results[i] is None]

    # -- the worker --------------------------------------------------------

    def prepare(self, sender: Sender) -> None:
        """Start the worker and load ``sender``'s script now, without waiting for it.

        The runner calls this before it lists the queue, so that starting
        Python and Lua overlaps with the MTA's listing; a load failure is
        reported when the first pass needs the state, still before anything
        in the queue is changed.
        """
        if self._worker is None:
            self._worker = self._new_worker()
            self._worker.conn.send(("load", self._load_settings(sender)))
            self._worker.loading = sender

    def _new_worker(self) -> _Worker:
        return _Worker(self.settings.lua, self._identity)

    def _loaded_worker(self, sender: Sender) -> _Worker:
        worker = self._worker
        if worker is not None and worker.sender == sender and worker.proc.poll() is None:
            return worker
        if worker is not None and worker.loading == sender:
            worker.loading = None  # the load request prepare() sent: its answer is next
        else:
            if worker is None or worker.proc.poll() is not None:
                if worker is not None:
                    worker.kill()
                worker = self._worker = self._new_worker()
            worker.sender = None
            worker.conn.send(("load", self._load_settings(sender)))
        reply = self._await_load(worker, sender)
        if reply[0] != "loaded":
            self.close()
            raise ScriptLoadError(self._load_error_text(sender, reply[1], reply[2]))
        self._note_extras(reply[1])
        worker.sender = sender
        return worker

    def _load_settings(self, sender: Sender) -> Dict:
        s = self.settings
        return {"lua": s.lua, "timeout": s.timeout, "memory_mb": s.memory_mb, "now": s.now,
                "sender_id": sender.id, "sender_name": sender.name, "script_text": self._script_text,
                "script_name": s.script}

    def _await_load(self, worker: _Worker, sender: Sender) -> tuple:
        running_limit = 2 * (self.settings.timeout + WATCHDOG_GRACE)  # top level, then Start()
        deadline = time.monotonic() + STARTUP_ALLOWANCE + running_limit
        clock = _CallClock()
        while True:
            progress = worker.progress()
            if progress[0] == LOADING:  # the script itself runs now: its own limit counts, not Lua's start-up
                deadline = min(deadline, clock.first_seen(progress, time.monotonic()) + running_limit)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                worker.kill()
                self._worker = None
                return ("load_error", "timeout", "")
            if not worker.conn.poll(min(remaining, WATCHDOG_POLL)):
                continue
            try:
                reply = worker.receive()
            except (EOFError, OSError):
                worker.kill()
                self._worker = None
                return ("load_error", "crashed", "")
            if reply[0] == "print":
                self._log_print(sender, None, reply[1])
                continue
            return reply

    def _full_path(self, text: str) -> str:
        """Lua shortens a long chunk name to "..." and its tail: put the script's whole path back."""
        script = self.settings.script
        if text.startswith("..."):
            tail, colon, rest = text[3:].partition(":")
            if colon and tail and script.endswith(tail):
                return f"{script}:{rest}"
        return text

    def _load_error_text(self, sender: Sender, kind: str, detail: str) -> str:
        script = self.settings.script
        detail = self._full_path(detail)
        limit = f"{self.settings.timeout:g} s"
        texts = {
            "syntax": f"{detail}; fix the script (nothing was decided)",
            "error": f"{detail} (while running the script's top level); fix the script (nothing was decided)",
            "timeout": f"{script}: the script's top level or Start() did not finish within {limit}; nothing was decided",
            "memory": f"{script}: the script's top level ran out of memory ({self.settings.memory_mb} MB); nothing was decided",
            "nocheckfile": f"{script}: the script defines no function CheckFile; define CheckFile(Filename, Actions, ...) (nothing was decided)",
            "start_error": f"{detail} (in Start()); fix the script (nothing was decided)",
            "start_timeout": f"{script}: Start() did not finish within {limit}; nothing was decided",
            "start_memory": f"{script}: Start() ran out of memory ({self.settings.memory_mb} MB); nothing was decided",
            "crashed": f"{script}: the Lua worker died while loading the script; nothing was decided",
            "sandbox": f"{detail}; nothing was decided (see script_user in the README)",
        }
        text = texts.get(kind, f"{script}: {detail or kind}")
        return f"{text} [sender {sender.id}:{sender.name}]" if sender.id or sender.name != "default" else text

    def _collect(self, worker: _Worker, sender: Sender, messages: Sequence[Message],
                 pending: List[int], results: List[Optional[Verdict]], chunks: int) -> None:
        limit = self.settings.timeout + WATCHDOG_GRACE
        idle_since = time.monotonic()
        verdict = self._verdicts(sender)
        received = 0  # results of this batch so far; they come in order
        served: Tuple[int, float, float] = (-1, 0.0, 0.0)  # a call's (index, start), the time spent on its headers
        ahead: Dict[int, Optional[tuple]] = {}  # header fields read before the worker asked (see _serve_headers)
        clock = _CallClock()
        while True:
            progress = worker.progress()
            index = progress[0]
            now = time.monotonic()
            deadline = (clock.first_seen(progress, now) + limit) if index >= 0 else \
                (idle_since + STARTUP_ALLOWANCE + limit)
            if served[:2] == progress:
                deadline += served[2]  # reading the headers here is not the script's time
            if index > received:
                # Calls before this one returned and their results are on the
                # way (the worker sends them within milliseconds, even while
                # this call is stuck): let them arrive before any kill, or they
                # would be decided a second time in the fresh state.
                deadline += limit
            # Wait in short slices: a call may start (and get stuck) while we
            # wait out the idle allowance, and its own deadline is much nearer.
            if worker.conn.poll(min(max(deadline - now, 0.0), WATCHDOG_POLL)):
                try:
                    reply = worker.receive()
                except (EOFError, OSError):
                    dying, _ = worker.progress()
                    worker.kill()
                    raise _Stuck(dying if dying >= 0 else None, "the Lua worker died during CheckFile")
                idle_since = time.monotonic()
                try:
                    kind = reply[0]
                    if kind == "results":
                        for local, outcome in reply[1]:
                            i = pending[local]
                            results[i] = verdict(messages[i], outcome)
                        received += len(reply[1])
                        self._tick(len(reply[1]))
                    elif kind == "headers":
                        took = self._serve_headers(worker, messages, pending, reply[1], reply[2], ahead)
                        calling, since = worker.progress()
                        spent = served[2] if served[:2] == (calling, since) else 0.0
                        served = (calling, since, spent + took)
                    elif kind == "print":
                        self._log_print(sender, messages[pending[reply[2]]] if reply[2] is not None else None, reply[1])
                    elif kind == "done":
                        self._note_extras(reply[1])
                        chunks -= 1
                        if chunks <= 0:
                            return
                    elif kind == "abandon":
                        worker.kill()
                        self._worker = None
                        return
                except (LookupError, TypeError, ValueError, AttributeError) as error:
                    # Plain data of the wrong shape (a worker taken over by the script): the parent, root, must not fall
                    # over on it; the worker is treated as one that died, fail closed for the call under way.
                    dying, _ = worker.progress()
                    worker.kill()
                    raise _Stuck(dying if dying >= 0 else None, "the Lua worker sent a message qrunner cannot read "
                                 f"({type(error).__name__})") from None
                continue
            if time.monotonic() < deadline:
                continue
            if worker.progress() == progress:
                worker.kill()
                if index >= 0:
                    raise _Stuck(index, f"CheckFile did not return within {self.settings.timeout:g} s")
                raise _Stuck(None, "the Lua worker stopped answering")

    @staticmethod
    def _serve_headers(worker: _Worker, messages: Sequence[Message], pending: Sequence[int],
                       first: int, count: int, ahead: Optional[Dict[int, Optional[tuple]]] = None) -> float:
        """Answer a header request: the fields of messages ``first`` .. ``first + count - 1`` of the pass.

        The parent reads them because the worker cannot: it runs as
        ``script_user``. The message asked for is read in full (its MTA's
        command as the fallback, when its file is gone); the ones sent ahead
        only from their files (:meth:`HeaderSource.prefetch`), up to
        HEADER_BATCH_BYTES, so that a batch never runs one MTA command per
        message; one that is not sent ahead is asked for again if the
        script touches it. Returns the seconds the answer took.

        ``ahead`` (one pass's): when the worker asks for a batch of at least
        AHEAD_MIN messages (its script reads the headers of most messages),
        the next batch is read as soon as this one is sent, while the worker
        runs the script over this one, so that the next request finds it
        read. The worker asks for messages in order, and for each at most
        once a pass unless it was not sent: what a request passes over is
        dropped, and no file is read twice.

        Why the parent reads, rather than opening the files and passing the
        descriptors (SCM_RIGHTS) for the worker to read: the fallback
        commands need root and run here anyway; a descriptor would give the
        worker the whole file (the body too) and a handle it could lock
        (Exim's delivery locks its spool files); and the worker waits for
        the fields either way, so reading them here costs no more time
        than reading them there.
        """
        began = time.monotonic()
        ahead = {} if ahead is None else ahead
        entries: List[Optional[tuple]] = []
        total = 0
        end = min(first + max(count, 1), len(pending))
        for local in range(max(first, 0), end):
            try:
                if local in ahead:
                    entry = ahead[local]
                    if entry is not None or entries:
                        entries.append(entry)
                        total += sum(map(len, entry[0])) if entry is not None else 0
                        continue
                source = messages[pending[local]].header_source()  # made only for a message not read ahead
                lines = source.read() if not entries else (source.prefetch() if total < HEADER_BATCH_BYTES else None)
                problem = source.problem
            except Exception as error:  # a header source must never end the run
                lines, problem = ([], f"headers could not be read: {error}") if not entries else (None, None)
            if lines is None:
                entries.append(None)
                continue
            total += sum(map(len, lines))
            entries.append((lines, problem))
        for local in [k for k in ahead if k < end]:
            del ahead[local]  # taken, or passed over by the script: never asked for again this pass
        try:
            worker.header_pipe.send((first, entries))
        except (OSError, ValueError):
            return time.monotonic() - began  # the worker is gone; the watchdog sees it
        took = time.monotonic() - began
        if count >= AHEAD_MIN:
            PolicyEngine._read_ahead(messages, pending, end, min(2 * count, HEADER_BATCH_AHEAD), ahead)
        return took

    @staticmethod
    def _read_ahead(messages: Sequence[Message], pending: Sequence[int], start: int, count: int,
                    ahead: Dict[int, Optional[tuple]]) -> None:
        """The fields of the ``count`` messages from ``start`` on, from their files only, into ``ahead``."""
        total = 0
        for local in range(start, min(start + count, len(pending))):
            if total >= HEADER_BATCH_BYTES:
                break
            if local in ahead:
                continue
            source = messages[pending[local]].header_source()
            try:
                lines = source.prefetch()
                problem = source.problem
            except Exception:  # read again (in full) when asked
                lines = None
            if lines is None:
                ahead[local] = None
                continue
            total += sum(map(len, lines))
            ahead[local] = (lines, problem)

    def _verdicts(self, sender: Sender):
        """``_verdict`` for one pass, sharing one Verdict among the messages whose call returned the same values.

        A result is the call's outcome as the worker sent it: Lua's return
        values, ``(b"ok", skip kind, skip, priority kind, priority, reason
        kind, reason)`` or ``(b"error", text)``, ``(b"timeout",)``,
        ``(b"memory",)``. Only a plain result is shared: one that needed a
        warning (a clamped Priority) or is an error is read afresh for each
        message, so that each still logs with its own queue id.
        """
        shared: Dict[tuple, Verdict] = {}
        singles = self._singles
        on_error = self.settings.on_script_error
        fresh = self._verdict

        def verdict(message: Message, outcome: tuple) -> Verdict:
            found = shared.get(outcome)
            if found is not None:
                return found
            kind, values = _outcome(outcome)
            if kind == "ok":
                if (values[2] == "nil" or values[2] == "number" and 1 <= values[3] <= 100) and len(shared) < 1024:
                    found = shared[outcome] = verdict_from_result(sender, values, "", on_error)
                    singles[id(found)] = (found,)  # keeps it alive, so its id stays its own
                    return found
            return fresh(sender, message, kind, values)

        return verdict

    def _verdict(self, sender: Sender, message: Message, outcome: str, values) -> Verdict:
        where = f"{message.queue_id}: sender {sender.name}"
        on_error = self.settings.on_script_error
        if outcome == "ok":
            return verdict_from_result(sender, values, where, on_error)
        if outcome == "timeout":
            error = f"CheckFile did not return within {self.settings.timeout:g} s"
        elif outcome == "memory":
            error = f"the script ran out of memory ({self.settings.memory_mb} MB)"
            log.error("%s: %s; the Lua state was abandoned and the rest of this pass runs in a fresh state "
                      "(top level and Start() run again)", where, error)
        else:
            error = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else str(values[0])
            error = self._full_path(error)
        log.error("%s: policy error: %s", where, error)
        return policy_error(sender, error, on_error)

    def _log_print(self, sender: Sender, message: Optional[Message], text: str) -> None:
        """One line of the script's ``print``, marked as the script's; a control character shows as ``?``.

        The worker splits printed text into lines (each counts towards the
        per-call cap), so no printed text can start a log line of its own;
        a line longer than ``PRINTED_LINE_CHARS`` is cut there (a 10 MB
        ``print`` must not become a 10 MB log line), saying how much was left out.
        """
        prefix = message.queue_id if message is not None else sender.name
        if len(text) > PRINTED_LINE_CHARS:
            text = text[:PRINTED_LINE_CHARS] + f"... ({len(text) - PRINTED_LINE_CHARS} more characters not logged)"
        shown = "".join(c if c == "\t" or c.isprintable() else "?" for c in text)
        log.info("%s: script (sender %s): %s", prefix, sender.name, shown)

    def _note_extras(self, names: str) -> None:
        self._extras_used.update(n for n in names.split(",") if n)

    def _log_extras(self) -> None:
        for name in sorted(self._extras_used):
            log.info("the script uses VPOP3's %s, which cannot act in qrunner: %s governs this instead",
                     name, VPOP3_EXTRAS.get(name, "the MTA"))
        self._extras_used.clear()

