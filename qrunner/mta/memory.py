"""The memory back end: a faithful model of an MTA queue, kept in a directory (``mta = "memory"``).

Not a mock: it holds real messages and answers every request of the
back-end interface as an MTA does, with the same traps. Messages wait,
are held, are being delivered for a while (``delivery_seconds``, or
``slow`` for one message), leave by
the default route or by a sender's route (as Postfix does it: a copy under
a new id, stamped with its route and its original's id, put on hold by the
listener as it is accepted, released once the original is removed; with
``listener_holds`` false, as an older listener, not held), come back deferred
with a retry time when the relay is down, vanish between the listing and
an action, and a command can fail half-way through a batch, like
``postsuper`` on a stopped Postfix. Asked to give up on a message, it
returns it to its sender as the real MTAs do: the original goes, a bounce
from the null sender to the original's sender is queued (behind the gate,
as Exim puts its bounces into the named queue). With ``named_queue`` it also has
Exim's shape: qrunner's own queue, ``max_queue_time``, and handing mail
back to the default queue. ``stop_at`` makes the MTA stop answering in the
middle of a run, as a Postfix whose flush service and ``postqueue`` went away.

Its queue lives in ``DIRECTORY/queue.json`` and the log of the operations
since it was written (one line per operation, written under an flock:
:class:`MemoryQueue` says how), beside one file per message in
``DIRECTORY/messages/``. So a SIGKILL of qrunner at any step leaves the
queue exactly as the last finished operation left it, and the next run
finds it so: crash recovery is tested on any machine in seconds. An
operation costs what it changes, so the model holds a queue of a hundred
thousand messages as a real MTA does.

:class:`MemoryQueue` is the MTA's own tool: tests and admins submit mail,
hold it as an admin would, start a delivery outside qrunner and change how
the model behaves (``relay``, ``fail``, ``vanish``, ``gated``, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from qrunner.config import Sender
from qrunner.exceptions import UnavailableError
from qrunner.message import HeaderSource, Message, QueueState
from qrunner.mta.base import (Backend, Due, Gate, HandOverJournal, Outcome, Result, SendRequest, finish_hand_over,
                              send_copying_routes)

log = logging.getLogger("qrunner.memory")

MESSAGE_ID = re.compile(r"M[0-9A-F]{8}\Z")
RETRY_SECONDS = 300  # how long a message the relay deferred waits, as Postfix's minimal_backoff_time
MAX_HEADER_BYTES = 262144

DEFAULTS: Dict[str, Any] = {
    "next_id": 1,
    "messages": [],
    "delivered": [],           # what reached a relay, in order: {"id", "route", "sender", "recipients", "at"}
    "default_queue": [],       # ids handed back (named_queue only): the MTA's own runners have them now
    "relay": "up",             # "down": every delivery attempt ends deferred
    "delivery_seconds": 0.0,   # how long a delivery keeps a message active
    "slow": {},                # message id -> seconds its delivery takes instead (a big message, a slow relay)
    "gated": True,
    "named_queue": False,
    "max_queue_time": None,
    "queue_lifetime": None,
    "fail": {},                # operation -> why: that command fails after the first message of its batch
    "vanish": {},              # message id -> operation: the message is delivered elsewhere just before it
    "stop_at": {},             # message id -> why: the MTA stops answering when asked to deliver it
    "routes_down": [],         # senders whose relay is down: their copies come back deferred, on their route
    "returns_to_sender": True,  # False: like Postfix before 3.5, no way to return a message to its sender
    "listener_holds": True,    # False: a sender's listener without the HOLD (an older master.cf): copies go at once
}


class _Entry(dict):
    """One message's record; every change to it marks it for the operation's line in the log.

    A record's values are replaced, never changed in place
    (``entry["recipients"] = [...]``, not ``.append``): the mark is what
    makes a change last.
    """

    __slots__ = ("_marks",)
    SHARED = ("state", "sender", "route", "delay_reason")  # values most messages share: kept once, not per message

    def __init__(self, data: Dict[str, Any], marks: Set[str]):
        super().__init__(data)
        for key in self.SHARED:
            value = data.get(key)
            if type(value) is str:
                dict.__setitem__(self, key, sys.intern(value))
        self._marks = marks

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._marks.add(self["id"])

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._marks.add(self["id"])

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._marks.add(self["id"])

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key, *default):
        if key in self:
            self._marks.add(self["id"])
        return super().pop(key, *default)


class _Messages:
    """The queue's messages in the order they were queued, each found by its id at once.

    It reads as the list it stands for (iterate, ``len``, ``[0]``,
    ``[-1]``) and changes by ``append`` and ``remove``; :meth:`get`
    finds one message without walking the queue, so an operation on one
    message costs the same in a queue of ten and of a hundred thousand.
    """

    def __init__(self, entries: List[Dict[str, Any]], marks: Set[str]):
        """Takes the records out of ``entries`` one by one (so a big queue is not held twice while read)."""
        self._marks = marks
        self._by_id: Dict[str, _Entry] = {}
        entries.reverse()
        while entries:
            entry = entries.pop()
            self._by_id[entry["id"]] = _Entry(entry, marks)

    def get(self, queue_id: str) -> Optional[_Entry]:
        return self._by_id.get(queue_id)

    def ids(self):
        return self._by_id.keys()

    def append(self, entry: Dict[str, Any]) -> None:
        self._by_id[entry["id"]] = _Entry(entry, self._marks)
        self._marks.add(entry["id"])

    def remove(self, entry: Dict[str, Any]) -> None:
        del self._by_id[entry["id"]]
        self._marks.add(entry["id"])

    def __iter__(self) -> Iterator[_Entry]:
        return iter(list(self._by_id.values()))  # a copy: the loop may remove what it walks

    def __len__(self) -> int:
        return len(self._by_id)

    def __getitem__(self, index):
        return list(self._by_id.values())[index]

    def __eq__(self, other) -> bool:
        return list(self._by_id.values()) == list(other)


class MemoryQueue:
    """The queue directory, read and changed one whole operation at a time.

    On disk: ``queue.json``, the whole queue as some operation left it
    (with its ``generation``, first), and ``queue.log.GENERATION``, one JSON line
    per operation since then, naming the messages it changed (their whole
    record, or ``null`` for one that left) and the settings it set. An
    operation is one ``write`` of one line under the flock: a kill before
    it leaves the queue as it was, a kill in the middle leaves a line
    without its newline, which does not count (the next operation cuts
    it off before writing its own). Each process keeps the queue it last
    read and reads only the log lines written since; when the log has
    grown past the size of ``queue.json`` (and 1 MB), the queue is written
    whole again under the next generation (aside, then renamed) and the old
    log goes. So an operation costs what it changes, not the size of the
    queue: the model runs a hundred thousand messages as it runs ten.
    """

    LIST_KEYS = ("delivered", "default_queue")  # settings that only grow (an operation appends to them)
    COMPACT_BYTES = 1 << 20
    WATCH_KEYS = {"gated", "named_queue", "default_queue"}  # settings that change which messages time moves

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, "queue.json")
        self.messages_dir = os.path.join(directory, "messages")
        self._queue: Optional[Dict[str, Any]] = None
        self._stale = False  # an operation failed half-way: what this process holds is not what is written
        self._generation = 0
        self._offset = 0
        self._base_size = 0
        self._marks: Set[str] = set()
        self._watch: Set[str] = set()
        self._default_queue: Set[str] = set()

    # -- one operation -------------------------------------------------------

    @contextlib.contextmanager
    def change(self) -> Iterator[Dict[str, Any]]:
        """The queue for one read-modify-write: locked, then its changes logged as one line if the block ends well."""
        if not os.path.isdir(self.directory):
            raise UnavailableError(f"the memory queue {self.directory} does not exist; create it or fix "
                                   "[memory] directory.")
        with open(os.path.join(self.directory, "queue.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            queue = self._current()
            self._marks.clear()
            before, messages = self._settings_now(queue), queue["messages"]
            try:
                self._finish_deliveries(queue)
                yield queue
                self._commit(queue, before, messages)
            except BaseException:
                self._stale = True  # what the block changed in memory never reached the disk: read it again
                raise

    def read(self) -> Dict[str, Any]:
        """The whole queue as plain data (the model's ``postqueue -j``): what tests judge by."""
        with self.change() as queue:
            plain = {key: json.loads(json.dumps(value)) for key, value in queue.items() if key != "messages"}
            plain["messages"] = [dict(entry) for entry in queue["messages"]]
        return plain

    def _current(self) -> Dict[str, Any]:
        """The queue now: the copy this process holds, brought up to date from the log, or read whole."""
        if self._queue is None or self._stale or self._written_generation() != self._generation:
            self._load()
        else:
            self._replay()
        assert self._queue is not None
        return self._queue

    def _written_generation(self) -> int:
        """The generation of queue.json on disk, from its first bytes (written first for this: no whole read);
        0 for none yet, or one written before generations were."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(40)
        except FileNotFoundError:
            return 0
        found = re.match(rb'\{"generation":(\d+),', head)
        return int(found.group(1)) if found else 0

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                raw = json.load(f)
                self._base_size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raw, self._base_size = {}, 0
        for key, value in DEFAULTS.items():
            raw.setdefault(key, json.loads(json.dumps(value)))
        self._generation = raw.pop("generation", 0)
        self._marks = set()
        raw["messages"] = _Messages(raw["messages"], self._marks)
        self._queue, self._stale, self._offset = raw, False, 0
        self._replay()
        self._watch_all()

    def _log_path(self) -> str:
        return f"{self.path[:-len('.json')]}.log.{self._generation}"

    def _replay(self) -> None:
        """Apply the log lines written since this process last looked (a line without its newline is not one)."""
        try:
            with open(self._log_path(), "rb") as f:
                f.seek(self._offset)
                tail = f.read()
        except FileNotFoundError:
            return
        end = tail.rfind(b"\n") + 1
        for line in tail[:end].splitlines():
            self._apply(json.loads(line))
        self._offset += end

    def _apply(self, change: Dict[str, Any]) -> None:
        queue = self._queue
        assert queue is not None
        messages: _Messages = queue["messages"]
        for queue_id, entry in change.get("messages", {}).items():
            old = messages.get(queue_id)
            if entry is None:
                if old is not None:
                    messages.remove(old)
            else:
                messages._by_id[queue_id] = _Entry(entry, self._marks)
            self._rewatch(queue, queue_id)
        queue.update(change.get("settings", {}))
        for key, items in change.get("appended", {}).items():
            queue[key].extend(items)
        if self.WATCH_KEYS & (change.get("settings", {}).keys() | change.get("appended", {}).keys()):
            self._watch_all()

    def _settings_now(self, queue: Dict[str, Any]) -> Dict[str, Any]:
        """What the operation's line compares against: the small settings as one text, each growing list's
        length."""
        seen: Dict[str, Any] = {key: (queue[key], len(queue[key])) for key in self.LIST_KEYS}
        seen[""] = self._small_settings(queue)
        return seen

    def _small_settings(self, queue: Dict[str, Any]) -> str:
        return json.dumps({key: value for key, value in queue.items()
                           if key != "messages" and key not in self.LIST_KEYS}, sort_keys=True)

    def _commit(self, queue: Dict[str, Any], before: Dict[str, Any], messages: _Messages) -> None:
        """Write the operation's line: the messages it marked, the settings it changed."""
        if queue["messages"] is not messages:  # the block put a list of its own there: every message counts
            queue["messages"] = _Messages(list(queue["messages"]), self._marks)
            self._marks |= set(messages.ids()) | set(queue["messages"].ids())
        change: Dict[str, Any] = {}
        if self._marks:
            messages = queue["messages"]
            change["messages"] = {queue_id: messages.get(queue_id) for queue_id in sorted(self._marks)}
        settings, appended = {}, {}
        for key in self.LIST_KEYS:
            old_list, old_len = before[key]
            value = queue[key]
            if value is old_list and len(value) >= old_len:
                if len(value) > old_len:
                    appended[key] = value[old_len:]
            else:
                settings[key] = value
        if self._small_settings(queue) != before[""]:
            settings.update((key, value) for key, value in queue.items()
                            if key != "messages" and key not in self.LIST_KEYS)
        if settings:
            change["settings"] = settings
        if appended:
            change["appended"] = appended
        for queue_id in self._marks:
            self._rewatch(queue, queue_id)
        if self.WATCH_KEYS & (settings.keys() | appended.keys()):
            self._watch_all()
        if change:
            self._write(change)

    def _write(self, change: Dict[str, Any]) -> None:
        line = (json.dumps(change, separators=(",", ":")) + "\n").encode()
        fd = os.open(self._log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.fstat(fd).st_size > self._offset:
                os.ftruncate(fd, self._offset)  # a line a killed operation left half-written
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._offset += len(line)
        if self._offset > max(self.COMPACT_BYTES, self._base_size):
            self._compact()

    def _compact(self) -> None:
        """The whole queue again under the next generation (written aside, then renamed); the old log goes."""
        queue = self._queue
        assert queue is not None
        old_log = self._log_path()
        whole: Dict[str, Any] = {"generation": self._generation + 1}  # first: _written_generation reads it there
        whole.update((key, value) for key, value in queue.items() if key != "messages")
        whole["messages"] = list(queue["messages"])
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as out:
            out.write(json.dumps(whole, separators=(",", ":")))
        os.replace(temporary, self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old_log)
        self._generation, self._offset, self._base_size = self._generation + 1, 0, os.stat(self.path).st_size

    # -- what time changes by itself ---------------------------------------------

    def watched(self) -> List[str]:
        """The messages time may move (being delivered, or retried by the MTA itself), in the order queued."""
        return sorted(self._watch)

    def _watch_all(self) -> None:
        queue = self._queue
        assert queue is not None
        self._watch, self._default_queue = set(), set(queue["default_queue"])
        for queue_id in queue["messages"].ids():
            self._rewatch(queue, queue_id)

    def _rewatch(self, queue: Dict[str, Any], queue_id: str) -> None:
        """Watch a message time may move: being delivered, or waiting where the MTA retries it by itself."""
        entry = queue["messages"].get(queue_id)
        if entry is not None and (entry["state"] == QueueState.ACTIVE or (
                entry["state"] == QueueState.WAITING and self._retried_by_mta(queue, entry))):
            self._watch.add(queue_id)
        else:
            self._watch.discard(queue_id)

    def _retried_by_mta(self, queue: Dict[str, Any], entry: Dict[str, Any]) -> bool:
        """The MTA's own queue manager retries it: a copy on its route; what was handed back to the default
        queue (with a named queue, the MTA's runners never process the named one); without one, in an ungated
        queue, every waiting message."""
        if entry.get("route"):
            return True
        if queue["named_queue"]:
            return entry["id"] in self._default_queue
        return not queue["gated"]

    def _finish_deliveries(self, queue: Dict[str, Any]) -> None:
        """Deliveries whose time is up end now: delivered, or deferred with a retry time if their relay is down.

        The MTA's own queue manager retries, by itself, once its retry time
        has come, what :meth:`_retried_by_mta` says. Only the watched
        messages can change here, in the order they were queued.
        """
        now = time.time()
        watched = [queue["messages"].get(queue_id) for queue_id in self.watched()]
        for entry in watched:
            if entry is None or entry["state"] != QueueState.WAITING or (entry.get("retry_at") or 0) > now:
                continue
            entry.update(state=QueueState.ACTIVE, active_until=now)
        finished = [m for m in watched if m is not None and m["state"] == QueueState.ACTIVE
                    and m.get("active_until", now + 1) <= now]
        for entry in sorted(finished, key=lambda m: m["active_until"]):
            route = entry.get("route") or "default"
            if (queue["relay"] == "down" and route == "default") or route in queue["routes_down"]:
                entry.update(state=QueueState.WAITING, retry_at=now + RETRY_SECONDS, delay_reason="relay down")
                continue
            queue["messages"].remove(entry)
            queue["delivered"].append({"id": entry["id"], "route": entry.get("route") or "default",
                                       "sender": entry["sender"], "recipients": entry["recipients"], "at": now})

    # -- the MTA's own tools ---------------------------------------------------

    def submit(self, sender: str, recipients: Sequence[str], content: bytes, route: str = "",
               arrival: Optional[float] = None) -> str:
        """Queue a message (waiting for delivery, as a gated MTA keeps it); its new id."""
        with self.change() as queue:
            return self._add(queue, sender, recipients, content, route, arrival)

    def submit_many(self, messages: Iterable[Tuple[str, Sequence[str], bytes, Optional[float]]]) -> List[str]:
        """Queue many messages (sender, recipients, content, arrival) in one operation, as ``exim -bS`` takes
        a batch: how a test builds a queue of a hundred thousand in seconds. Their new ids, in order."""
        with self.change() as queue:
            return [self._add(queue, sender, recipients, content, "", arrival)
                    for sender, recipients, content, arrival in messages]

    def _add(self, queue, sender, recipients, content: bytes, route: str, arrival: Optional[float],
             state: str = QueueState.WAITING) -> str:
        queue_id = "M%08X" % queue["next_id"]
        queue["next_id"] += 1
        os.makedirs(self.messages_dir, exist_ok=True)
        with open(os.path.join(self.messages_dir, queue_id), "wb") as f:
            f.write(content)
        queue["messages"].append({"id": queue_id, "arrival": time.time() if arrival is None else arrival,
                                  "sender": sender, "recipients": list(recipients), "state": state,
                                  "route": route, "retry_at": None, "delay_reason": "deferred transport"})
        return queue_id

    def set(self, **settings: Any) -> None:
        """Change how the model behaves (``relay="down"``, ``fail={"hold": "why"}``, ...)."""
        with self.change() as queue:
            queue.update(settings)

    def admin_hold(self, queue_id: str) -> None:
        """Hold a message as an admin would (the MTA cannot tell who held it)."""
        with self.change() as queue:
            self._entry(queue, queue_id)["state"] = QueueState.HELD

    def start_delivery(self, queue_id: str, seconds: float) -> None:
        """A delivery outside qrunner: the message is active for ``seconds``, then delivered."""
        with self.change() as queue:
            self._entry(queue, queue_id).update(state=QueueState.ACTIVE, active_until=time.time() + seconds)

    def content_path(self, queue_id: str) -> str:
        return os.path.join(self.messages_dir, queue_id)

    @staticmethod
    def _entry(queue, queue_id: str) -> Dict[str, Any]:
        entry = queue["messages"].get(queue_id)
        if entry is None:
            raise KeyError(f"{queue_id} is not in the memory queue")
        return entry


class MemoryFileHeaders(HeaderSource):
    """The header fields of a memory message, read from its file when the script first asks."""

    __slots__ = ("path", "problem")

    def __init__(self, path: str):
        self.path = path
        self.problem: Optional[str] = None

    def __getstate__(self):
        return self.path

    def __setstate__(self, path) -> None:
        self.path, self.problem = path, None

    def read(self) -> List[bytes]:
        try:
            with open(self.path, "rb") as f:
                head = f.read(MAX_HEADER_BYTES)
        except OSError as exc:
            self.problem = f"headers of {os.path.basename(self.path)} could not be read: {exc.strerror}"
            return []
        fields: List[bytes] = []
        for line in head.replace(b"\r\n", b"\n").split(b"\n"):
            if not line:
                break
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\n" + line
            else:
                fields.append(line)
        return fields


class MemoryBackend(Backend):
    """qrunner's side of the memory queue: the same interface as Postfix's and Exim's back ends."""

    id_hint = "a memory queue id like M00000001"
    ungate_hint = 'set "gated" to false in the memory queue (MemoryQueue.set(gated=False))'

    def __init__(self, directory: str):
        self.queue = MemoryQueue(directory)
        self.instance = f"memory:{os.path.realpath(directory)}"
        self._routes: Dict[str, str] = {}          # listed messages that are copies on a sender's route
        self._retry_at: Dict[str, float] = {}      # listed messages that wait for a retry time
        self._held_copies: Dict[str, str] = {}     # listed copies the listener holds -> their original's id
        self._settings: Dict[str, Any] = {}
        self._look()

    def _look(self, listing: bool = False) -> List[Message]:
        """One locked read of the queue: the settings the facts below answer from, and (``listing``) its
        messages, made while the queue is read (no copy of a record is kept)."""
        messages = []
        with self.queue.change() as queue:
            self._settings = {k: queue[k] for k in ("gated", "named_queue", "max_queue_time", "queue_lifetime",
                                                    "returns_to_sender")}
            if listing:
                default_queue = set(queue["default_queue"])
                entries = []
                for entry in queue["messages"]:
                    if not self.is_message_id(entry.get("id")):
                        log.warning("memory queue entry %r is not a memory queue id, skipped", entry.get("id"))
                    elif entry["id"] not in default_queue:
                        entries.append(entry)
                self._routes = {m["id"]: m["route"] for m in entries if m.get("route")}
                self._held_copies = {m["id"]: m.get("original") or "" for m in entries
                                     if m.get("route") and m["state"] == QueueState.HELD}
                self._retry_at = {m["id"]: m["retry_at"] for m in entries if m.get("retry_at")}
                messages = [self._message(m) for m in entries]
        self.has_named_queue = bool(self._settings["named_queue"])
        return messages

    # -- facts ---------------------------------------------------------------

    def is_message_id(self, text: str) -> bool:
        return isinstance(text, str) and MESSAGE_ID.match(text) is not None

    def check(self, senders: Sequence[Sender], acting: bool) -> None:
        """Every sender has a route here (the model routes by sender name); the queue must exist."""
        self._look()

    def gate(self, senders: Sequence[Sender] = ()) -> Gate:
        gated = bool(self._settings["gated"])
        return Gate(gated, "the memory queue is gated" if gated else
                    "the memory queue is not gated: it would deliver waiting mail on its own schedule")

    def unfit(self, message: Message, ours: bool) -> Optional[str]:
        if message.state == QueueState.ACTIVE:
            return "being delivered right now; left alone"
        if message.held and not ours:
            return "on hold by someone else, not by qrunner; left alone"
        return None

    def copy_of(self, message: Message, senders: Sequence[Sender], recorded: bool = False) -> Optional[Sender]:
        route = self._routes.get(message.queue_id)
        return next((s for s in senders if not s.default and s.name == route), None) if route else None

    def held_copy(self, message: Message, senders: Sequence[Sender]) -> Optional[Tuple[Sender, str]]:
        """A held message stamped with a sender's route (the listener's hold): that sender, the original's id."""
        route = self._routes.get(message.queue_id)
        if not route or message.queue_id not in self._held_copies:
            return None
        sender = next((s for s in senders if not s.default and s.name == route), None)
        return (sender, self._held_copies[message.queue_id]) if sender is not None else None

    def release_copies(self, queue_ids: Sequence[str]) -> Set[str]:
        """Held copies released and delivered now, on their route (as ``postsuper -H`` and a flush request).

        The delivery takes as long as the original's would (``slow``, ``delivery_seconds``).
        """
        with self.queue.change() as queue:
            slow, seconds = dict(queue["slow"]), float(queue["delivery_seconds"])
        now = time.time()
        return self._each("release_copies", queue_ids, QueueState.HELD, lambda e: e.update(
            state=QueueState.ACTIVE, active_until=now + float(slow.get(e.get("original"), seconds))))

    def sends_from_hold(self, route: Optional[Sender]) -> bool:
        return route is not None

    def due(self, message: Message, attempts: Optional[Tuple[int, float]]) -> Optional[Due]:
        retry = self._retry_at.get(message.queue_id)
        return Due(retry, "the MTA's retry time") if retry and retry > time.time() else None

    def expired(self, message: Message) -> Optional[str]:
        limit = self._settings["max_queue_time"] if self._settings["named_queue"] else None
        if not limit or message.state == QueueState.ACTIVE or time.time() - message.arrival <= limit:
            return None
        return "older than max_queue_time: handed to the MTA's own retry and freeze rules"

    def queue_lifetime(self) -> Optional[float]:
        return self._settings["queue_lifetime"]

    @property
    def cannot_return(self) -> Optional[str]:  # type: ignore[override]
        if self._settings["returns_to_sender"]:
            return None
        return "this memory queue is set to have no way to return a message to its sender (returns_to_sender)"

    def version(self) -> str:
        return f"the memory back end ({self.queue.directory})"

    hand_over_batch = 1  # a model: one message a step, so that every pacing limit acts exactly

    def delivering(self) -> int:
        """Messages being delivered now, in every queue of the model (deliveries whose time is up have ended)."""
        with self.queue.change() as queue:
            entries = [queue["messages"].get(queue_id) for queue_id in self.queue.watched()]
            return sum(1 for m in entries if m is not None and m["state"] == QueueState.ACTIVE)

    def still_delivering(self, queue_ids: Sequence[str]) -> Set[str]:
        with self.queue.change() as queue:
            entries = [queue["messages"].get(queue_id) for queue_id in queue_ids]
            return {m["id"] for m in entries if m is not None and m["state"] == QueueState.ACTIVE}

    def describe_route(self, sender: Sender) -> str:
        return "default: the MTA's own routing" if sender.default else f"memory: route {sender.name}"

    # -- actions ---------------------------------------------------------------

    def list(self) -> List[Message]:
        """The queue's messages; an entry whose id is no memory queue id is said and passed over.

        As the Postfix back end does with a ``postqueue -j`` line: an id that
        could be an option or a path (``-d``, ``../x``) never becomes one.
        """
        return self._look(listing=True)

    def _message(self, entry: Dict[str, Any]) -> Message:
        path = self.queue.content_path(entry["id"])
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        return Message(queue_id=entry["id"], arrival=entry["arrival"], size=size, sender=entry["sender"],
                       recipients=tuple(entry["recipients"]), queue_name=entry["state"], filename=path,
                       headers=MemoryFileHeaders(path), state=entry["state"],
                       delay_reasons=(entry.get("delay_reason") or "",))

    def hold(self, queue_ids: Sequence[str]) -> Set[str]:
        return self._each("hold", queue_ids, QueueState.WAITING, lambda e: e.update(state=QueueState.HELD))

    def release(self, queue_ids: Sequence[str]) -> Set[str]:
        return self._each("release", queue_ids, QueueState.HELD, lambda e: e.update(state=QueueState.WAITING))

    def remove(self, queue_ids: Sequence[str]) -> Set[str]:
        return self._each("remove", queue_ids, None, lambda e: e.update(state="removed"))

    def hand_back(self, queue_ids: Sequence[str]) -> Set[str]:
        if not self.has_named_queue:
            return set()
        return self._each("hand_back", queue_ids, None, lambda e: e.update(handed_back=True))

    def _each(self, operation: str, queue_ids: Sequence[str], from_state: Optional[str], change) -> Set[str]:
        """One batch command: each message changed in turn; a failing command stops after the first."""
        confirmed: Set[str] = set()
        with self.queue.change() as queue:
            default_queue = set(queue["default_queue"])
            for number, queue_id in enumerate(queue_ids):
                if number >= 1 and operation in queue["fail"]:
                    break
                self._vanish(queue, queue_id, operation)
                entry = queue["messages"].get(queue_id)
                if entry is None or queue_id in default_queue or (from_state and entry["state"] != from_state):
                    continue
                change(entry)
                confirmed.add(queue_id)
            for queue_id in confirmed:
                entry = queue["messages"].get(queue_id)
                if entry["state"] == "removed":
                    queue["messages"].remove(entry)
            queue["default_queue"] += sorted(queue_id for queue_id in confirmed
                                             if queue["messages"].get(queue_id) is not None
                                             and queue["messages"].get(queue_id).pop("handed_back", False))
            failed = queue["fail"].get(operation)
        if failed and queue_ids:
            raise UnavailableError(f"the memory queue's {operation} failed ({failed}); {len(confirmed)} of "
                                   f"{len(queue_ids)} messages were changed before it stopped.")
        return confirmed

    def give_up(self, queue_ids: Sequence[str]) -> Set[str]:
        """Each waiting or held message back to its sender, in one operation: its bounce queued, the original gone.

        A message being delivered is left as it is (Exim's ``-Mg`` does the
        same); a failing command stops after the first, as the others do.
        """
        confirmed: Set[str] = set()
        with self.queue.change() as queue:
            default_queue = set(queue["default_queue"])
            for number, queue_id in enumerate(queue_ids):
                if number >= 1 and "give_up" in queue["fail"]:
                    break
                self._vanish(queue, queue_id, "give_up")
                entry = queue["messages"].get(queue_id)
                if entry is None or queue_id in default_queue or entry["state"] == QueueState.ACTIVE:
                    continue
                queue["messages"].remove(entry)
                text = (f"From: MAILER-DAEMON\nTo: {entry['sender']}\nSubject: Undelivered Mail Returned to Sender\n"
                        f"\nYour message {queue_id} was returned to you: the MTA gave up on it.\n")
                self.queue._add(queue, "", [entry["sender"]], text.encode(), "", None)
                confirmed.add(queue_id)
            failed = queue["fail"].get("give_up")
        if failed and queue_ids:
            raise UnavailableError(f"the memory queue's give_up failed ({failed}); {len(confirmed)} of "
                                   f"{len(queue_ids)} messages were returned before it stopped.")
        return confirmed

    @staticmethod
    def _vanish(queue: Dict[str, Any], queue_id: str, operation: str) -> None:
        """A message set to vanish before this operation is delivered elsewhere first."""
        if queue["vanish"].get(queue_id) == operation:
            entry = queue["messages"].get(queue_id)
            if entry is not None:
                queue["messages"].remove(entry)
            del queue["vanish"][queue_id]

    def send(self, requests: Sequence[SendRequest], journal: HandOverJournal) -> Dict[str, Outcome]:
        """The default route: delivery starts now. A sender's route: hold, copy, remove, as Postfix does."""
        return send_copying_routes(self, requests, journal, self._deliver, self._hand_over)

    def _deliver(self, queue_id: str) -> Outcome:
        with self.queue.change() as queue:
            stopped = queue["stop_at"].get(queue_id)
            if stopped:
                raise UnavailableError(f"the memory queue stopped answering ({stopped}); start it again.")
            self._vanish(queue, queue_id, "send")
            entry = queue["messages"].get(queue_id)
            if entry is None or entry["state"] != QueueState.WAITING:
                return Outcome(Result.VANISHED)
            if "send" in queue["fail"]:
                return Outcome(Result.FAILED, queue["fail"]["send"])
            entry.update(state=QueueState.ACTIVE, active_until=time.time() + _delivery_seconds(queue, queue_id))
        return Outcome(Result.SCHEDULED)

    def _hand_over(self, request: SendRequest, journal: HandOverJournal) -> Outcome:
        queue_id = request.message.queue_id
        with self.queue.change() as queue:
            if "copy" in queue["fail"]:
                return Outcome(Result.FAILED, f"{queue_id} was not copied: {queue['fail']['copy']}")
            original = queue["messages"].get(queue_id)
            if original is None:
                return Outcome(Result.VANISHED)
            with open(self.queue.content_path(queue_id), "rb") as f:
                content = f.read()
            held = bool(queue["listener_holds"])
            new_id = self.queue._add(queue, original["sender"], original["recipients"], content,
                                     request.route.name, None, state=QueueState.HELD if held else QueueState.ACTIVE)
            copy = MemoryQueue._entry(queue, new_id)
            copy["original"] = queue_id  # as the XFORWARD IDENT leaves it in a Postfix copy
            if not held:
                copy["active_until"] = time.time() + _delivery_seconds(queue, queue_id)
        return finish_hand_over(self, request, journal, new_id, held)


def _delivery_seconds(queue: Dict[str, Any], queue_id: str) -> float:
    """How long delivering this message takes (a routed copy: as long as its original would)."""
    return float(queue["slow"].get(queue_id, queue["delivery_seconds"]))
