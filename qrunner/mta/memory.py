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

Its queue lives in ``DIRECTORY/queue.json``, replaced atomically (written
aside, then renamed) under an flock for every operation, beside one file
per message in ``DIRECTORY/messages/``. So a SIGKILL of qrunner at any step
leaves the queue exactly as the last finished operation left it, and the
next run finds it so: crash recovery is tested on any machine in seconds.

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
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

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


class MemoryQueue:
    """The queue directory, read and changed one whole operation at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, "queue.json")
        self.messages_dir = os.path.join(directory, "messages")

    # -- one operation -------------------------------------------------------

    @contextlib.contextmanager
    def change(self) -> Iterator[Dict[str, Any]]:
        """The queue for one read-modify-write: locked, then replaced atomically if the block ends well."""
        if not os.path.isdir(self.directory):
            raise UnavailableError(f"the memory queue {self.directory} does not exist; create it or fix "
                                   "[memory] directory.")
        with open(os.path.join(self.directory, "queue.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            queue = self._read()
            self._finish_deliveries(queue)
            yield queue
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "w") as out:
                json.dump(queue, out, indent=1)
            os.replace(temporary, self.path)

    def _read(self) -> Dict[str, Any]:
        try:
            with open(self.path) as f:
                queue = json.load(f)
        except FileNotFoundError:
            queue = {}
        for key, value in DEFAULTS.items():
            queue.setdefault(key, json.loads(json.dumps(value)))
        return queue

    @staticmethod
    def _finish_deliveries(queue: Dict[str, Any]) -> None:
        """Deliveries whose time is up end now: delivered, or deferred with a retry time if their relay is down.

        The MTA's own queue manager retries, by itself, once its retry time
        has come: every waiting copy on its route (a sender's route is never
        gated); with a named queue, what was handed back to the default
        queue (the MTA's runners never process the named one); without one,
        in an ungated queue, every waiting message.
        """
        now = time.time()
        for entry in queue["messages"]:
            if entry["state"] != QueueState.WAITING or (entry.get("retry_at") or 0) > now:
                continue
            in_default = entry["id"] in queue["default_queue"]
            if entry.get("route") or (in_default if queue["named_queue"] else not queue["gated"]):
                entry.update(state=QueueState.ACTIVE, active_until=now)
        finished = [m for m in queue["messages"] if m["state"] == QueueState.ACTIVE
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
        return next(m for m in queue["messages"] if m["id"] == queue_id)


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
        self._listed: Dict[str, Dict[str, Any]] = {}
        self._settings: Dict[str, Any] = {}
        self._look()

    def _look(self) -> List[Dict[str, Any]]:
        """One locked read of the queue: its messages, and the settings the facts below answer from."""
        with self.queue.change() as queue:
            self._settings = {k: queue[k] for k in ("gated", "named_queue", "max_queue_time", "queue_lifetime",
                                                    "returns_to_sender")}
            entries = [m for m in queue["messages"] if m["id"] not in queue["default_queue"]]
        self.has_named_queue = bool(self._settings["named_queue"])
        return entries

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
        route = self._listed.get(message.queue_id, {}).get("route")
        return next((s for s in senders if not s.default and s.name == route), None) if route else None

    def held_copy(self, message: Message, senders: Sequence[Sender]) -> Optional[Tuple[Sender, str]]:
        """A held message stamped with a sender's route (the listener's hold): that sender, the original's id."""
        entry = self._listed.get(message.queue_id, {})
        route = entry.get("route")
        if not route or entry.get("state") != QueueState.HELD:
            return None
        sender = next((s for s in senders if not s.default and s.name == route), None)
        return (sender, entry.get("original") or "") if sender is not None else None

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
        retry = self._listed.get(message.queue_id, {}).get("retry_at")
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
            return sum(1 for m in queue["messages"] if m["state"] == QueueState.ACTIVE)

    def still_delivering(self, queue_ids: Sequence[str]) -> Set[str]:
        wanted = set(queue_ids)
        with self.queue.change() as queue:
            return {m["id"] for m in queue["messages"] if m["id"] in wanted and m["state"] == QueueState.ACTIVE}

    def describe_route(self, sender: Sender) -> str:
        return "default: the MTA's own routing" if sender.default else f"memory: route {sender.name}"

    # -- actions ---------------------------------------------------------------

    def list(self) -> List[Message]:
        """The queue's messages; an entry whose id is no memory queue id is said and passed over.

        As the Postfix back end does with a ``postqueue -j`` line: an id that
        could be an option or a path (``-d``, ``../x``) never becomes one.
        """
        entries = []
        for entry in self._look():
            if self.is_message_id(entry.get("id")):
                entries.append(entry)
            else:
                log.warning("memory queue entry %r is not a memory queue id, skipped", entry.get("id"))
        self._listed = {m["id"]: m for m in entries}
        return [self._message(m) for m in entries]

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
            for number, queue_id in enumerate(queue_ids):
                if number >= 1 and operation in queue["fail"]:
                    break
                self._vanish(queue, queue_id, operation)
                entry = next((m for m in queue["messages"] if m["id"] == queue_id), None)
                if entry is None or queue_id in queue["default_queue"] or (from_state and entry["state"] != from_state):
                    continue
                change(entry)
                confirmed.add(queue_id)
            queue["messages"] = [m for m in queue["messages"] if m["state"] != "removed"]
            queue["default_queue"] += sorted(m["id"] for m in queue["messages"] if m.pop("handed_back", False))
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
            for number, queue_id in enumerate(queue_ids):
                if number >= 1 and "give_up" in queue["fail"]:
                    break
                self._vanish(queue, queue_id, "give_up")
                entry = next((m for m in queue["messages"] if m["id"] == queue_id), None)
                if entry is None or queue_id in queue["default_queue"] or entry["state"] == QueueState.ACTIVE:
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
            queue["messages"] = [m for m in queue["messages"] if m["id"] != queue_id]
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
            entry = next((m for m in queue["messages"] if m["id"] == queue_id), None)
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
            original = next((m for m in queue["messages"] if m["id"] == queue_id), None)
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
