"""The memory back end's face for the end-to-end cases, beside the Postfix and Exim harnesses.

The memory MTA (qrunner/mta/memory.py) keeps its queue in a directory:
``queue.json`` and one file per message. This harness submits mail and acts
as an admin through that MTA's own tool (``MemoryQueue``), and reads what
happened through that tool's ``read()`` (the queue file and its log of
operations, read as plain JSON), never through qrunner's back end: the
queue is that MTA's truth, as ``postqueue -j`` is Postfix's. Its "sink" is
the queue's ``delivered`` list, in the order the MTA delivered.
"""

from __future__ import annotations

import email
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from mta_harness import ACTIVE, HELD, WAITING, Harness, _first_seen
from qrunner_e2e import make_message

from qrunner.mta.memory import MemoryQueue

_WHERE = {"waiting": WAITING, "held": HELD, "active": ACTIVE}


class Delivered:
    """One message as the memory relay got it (the face of tests/smtp_sink.py's SinkMessage)."""

    def __init__(self, entry: dict, content: bytes):
        self.queue_id = entry["id"]
        self.route = entry["route"]
        self.mail_from = entry["sender"]
        self.rcpt_tos = list(entry["recipients"])
        self._parsed = email.message_from_bytes(content)

    def header(self, name: str) -> Optional[bytes]:
        value = self._parsed.get(name)
        return None if value is None else str(value).encode()


class MemorySink:
    """What the memory MTA delivered, read from its queue file; ``data_delay`` is how long a delivery takes."""

    def __init__(self, directory: str):
        self.directory = directory
        self.data_delay = 0.0
        self._tool = MemoryQueue(directory)

    def _queue(self) -> dict:
        """The whole queue as the MTA's tool shows it (deliveries whose time is up have ended)."""
        if not os.path.isdir(self.directory):
            return {}
        return self._tool.read()

    def finish(self) -> None:
        """Let deliveries whose time is up end, as the MTA's delivery agents would by now."""
        with self._tool.change():
            pass

    @property
    def messages(self) -> List[Delivered]:
        self.finish()
        result = []
        for entry in self._queue().get("delivered", []):
            with open(os.path.join(self.directory, "messages", entry["id"]), "rb") as f:
                result.append(Delivered(entry, f.read()))
        return result

    def wait_for(self, count: int, timeout: float = 20.0) -> List[Delivered]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.messages
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, f"the memory relay got {len(got)} messages, not {count}"
            time.sleep(0.05)


class MemoryHarness(Harness):
    name = "memory"
    backend_class = "qrunner.mta.memory:MemoryBackend"

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.queue = MemoryQueue(directory)
        super().__init__(self.queue, MemorySink(directory))

    def reopen(self) -> None:
        """The queue directory was replaced whole (a test restoring a saved queue): read it afresh, as a new
        process would, rather than follow on from the log this one read before."""
        self.queue = self.instance = MemoryQueue(self.directory)
        self.sink._tool = MemoryQueue(self.directory)

    def config(self) -> str:
        return f'mta = "memory"\n[memory]\ndirectory = "{self.directory}"\n'

    def queue_message(self, subject: str, size: int = 0, to: Sequence[str] = ("bob@example.net",),
                      sender: str = "alice@qrunner-test.localdomain") -> str:
        queue_id = self.queue.submit(sender, list(to), make_message(subject, size, sender=sender, to=", ".join(to)))
        time.sleep(0.002)  # arrival order is by time, as in a real queue
        return queue_id

    def _entries(self) -> List[dict]:
        self.sink.finish()
        return self.sink._queue().get("messages", [])

    def snapshot(self) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
        return {m["id"]: (_WHERE.get(m["state"], m["state"]), tuple(m["recipients"])) for m in self._entries()}

    def admin_hold(self, queue_id: str) -> None:
        self.queue.admin_hold(queue_id)

    def deliver_outside(self, queue_id: str) -> None:
        self.queue.start_delivery(queue_id, self.sink.data_delay)

    def _entry(self, queue_id: str) -> dict:
        [entry] = [m for m in self._entries() if m["id"] == queue_id]
        return entry

    def arrival(self, queue_id: str) -> int:
        return int(self._entry(queue_id)["arrival"])

    def size(self, queue_id: str) -> int:
        return os.path.getsize(self.filename(queue_id))

    def filename(self, queue_id: str) -> str:
        return os.path.join(self.directory, "messages", queue_id)

    def dispatch_order(self, ids: Iterable[str], timeout: float = 30.0) -> List[str]:
        """The order the memory MTA delivered in (it delivers in the order it is asked, one at a time)."""
        return _first_seen(ids, lambda: [m.queue_id for m in self.sink.messages], "the memory relay", timeout)

    def set(self, **settings) -> None:
        self.queue.set(**settings)
