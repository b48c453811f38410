"""One face for both real MTAs, so an end-to-end case is written once and run over each.

A harness wraps a private instance (tests/postfix_instance.py,
tests/exim_instance.py) and its SMTP sink and answers, in the admin's words,
what the tests ask: queue a message, where is it now (waiting, held,
active, gone), its arrival time and size, in what order the MTA was asked
to deliver messages, hold it as an admin would, deliver it outside
qrunner, and what qrunner's configuration for this MTA is.

Every answer comes from the MTA's own tools (``postqueue -j``, Postfix's
log, ``exim -bp``, ``exipick``, the kernel's lock table, the SMTP sink),
never from qrunner's readers or its state database: a test must not grade
the program with the program's own eyes.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from qrunner_e2e import make_message

WAITING, HELD, ACTIVE = "waiting", "held", "active"

# The message id in the Received: field Exim writes when it takes a message in.
_EXIM_RECEIVED_ID = re.compile(rb"\bid ([0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4})\b")


class Harness:
    name = ""
    backend_class = ""  # "module:Class" of qrunner's back end for this MTA, to kill a run at one of its steps

    def __init__(self, instance, sink):
        self.instance = instance
        self.sink = sink

    def queue_message(self, subject: str, size: int = 0, to: Sequence[str] = ("bob@example.net",),
                      sender: str = "alice@qrunner-test.localdomain") -> str:
        """Submit a message and wait until it waits for qrunner behind the gate."""
        raise NotImplementedError

    def snapshot(self) -> Dict[str, Tuple[str, Tuple[str, ...]]]:
        """queue id -> (where, pending recipients): for "nothing changed" checks."""
        raise NotImplementedError

    def arrival(self, queue_id: str) -> int:
        """The arrival time (epoch seconds) the MTA's own tool reports."""
        raise NotImplementedError

    def size(self, queue_id: str) -> int:
        """The message size in bytes the MTA's own tool reports (what the policy's Size must be)."""
        raise NotImplementedError

    def dispatch_order(self, ids: Iterable[str], timeout: float = 30.0) -> List[str]:
        """``ids`` in the order the MTA says it was asked to deliver them (each waited for)."""
        raise NotImplementedError

    def where(self, queue_id: str) -> Optional[str]:
        return self.snapshot().get(queue_id, (None,))[0]

    def wait_where(self, queue_id: str, where: Optional[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.where(queue_id) != where:
            assert time.monotonic() < deadline, f"{queue_id} is {self.where(queue_id)}, not {where}"
            time.sleep(0.05)

    def wait_gone(self, queue_id: str) -> None:
        self.wait_where(queue_id, None)


def harness_for(request, tmp_path, name: Optional[str] = None) -> Harness:
    """The harness of a test parametrized over "memory", "postfix" and "exim" (``request.param``, or ``name``
    for a test whose parameter has another name).

    The memory back end runs on any machine; the real MTAs are the private
    instances of the fixtures ``postfix`` and ``exim``, each with its sink.
    """
    name = name or request.param
    if name == "memory":
        from memory_harness import MemoryHarness  # it builds on this module
        return MemoryHarness(str(tmp_path / "memory-queue"))
    if name == "postfix":
        return PostfixHarness(request.getfixturevalue("postfix"), request.getfixturevalue("smtp_sink"))
    return EximHarness(request.getfixturevalue("exim"), request.getfixturevalue("exim_sink"))


def _first_seen(ids: Iterable[str], observe: Callable[[], List[str]], what: str, timeout: float) -> List[str]:
    """``ids`` in the order ``observe()`` first lists them, once it lists them all."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        order = list(dict.fromkeys(i for i in observe() if i in wanted))
        if len(order) == len(wanted):
            return order
        assert time.monotonic() < deadline, f"{what} never showed {sorted(wanted - set(order))}"
        time.sleep(0.05)


class PostfixHarness(Harness):
    name = "postfix"
    backend_class = "qrunner.mta.postfix:PostfixBackend"  # for Qrunner.run_killed_at
    _WHERE = {"deferred": WAITING, "hold": HELD, "active": ACTIVE, "incoming": "incoming"}

    def config(self) -> str:
        return f'mta = "postfix"\n[postfix]\nconfig_directory = "{self.instance.config_directory}"\n'

    def queue_message(self, subject, size=0, to=("bob@example.net",), sender="alice@qrunner-test.localdomain"):
        queue_id = self.instance.submit(sender, list(to), make_message(subject, size, sender=sender, to=", ".join(to)))
        self.instance.wait_deferred([queue_id])
        return queue_id

    def snapshot(self):
        return {m["queue_id"]: (self._WHERE.get(m["queue_name"], m["queue_name"]),
                                tuple(r["address"] for r in m["recipients"])) for m in self.instance.queue()}

    def admin_hold(self, queue_id: str) -> None:
        self.instance.hold([queue_id])

    def deliver_outside(self, queue_id: str) -> None:
        """Start a delivery without qrunner (postqueue -i) and wait until the message is active."""
        self.instance.schedule(queue_id)
        self.instance.wait_for_queue([queue_id], "active")

    def arrival(self, queue_id: str) -> int:
        """``arrival_time`` as ``postqueue -j`` reports it."""
        return self._listed(queue_id)["arrival_time"]

    def size(self, queue_id: str) -> int:
        """``message_size`` as ``postqueue -j`` reports it."""
        return self._listed(queue_id)["message_size"]

    def dispatch_order(self, ids, timeout=30.0):
        """The order Postfix's flush service took the delivery requests in, from Postfix's log.

        The test instance's flush daemon runs with ``-v`` and logs each
        ``send_file`` request as it takes it (PostfixInstance.flush_requests).
        qrunner has up to 4 requests of one priority on their way at once
        (qrunner/mta/postfix_flush.py), which the service may take in either
        order, and sends a lower priority's only after every higher one's is
        answered: so the log's order is the order of the levels, exactly, and
        within a level the order of the service's processes. The sink cannot tell: the
        queue manager delivers concurrently, and mail scheduled milliseconds
        apart reaches the relay in either order (DESIGN.md section 4).
        """
        return _first_seen(ids, self.instance.flush_requests, "Postfix's log (flush -v)", timeout)

    def _listed(self, queue_id: str) -> dict:
        [entry] = [m for m in self.instance.queue() if m["queue_id"] == queue_id]
        return entry

    def filename(self, queue_id: str) -> str:
        """Where a deferred message's queue file is: found on disk, not worked out from a hashing rule."""
        deferred = os.path.join(self.instance.queue_directory, "deferred")
        [path] = glob.glob(os.path.join(deferred, queue_id)) + glob.glob(os.path.join(deferred, "*", queue_id))
        return path


class EximHarness(Harness):
    name = "exim"
    backend_class = "qrunner.mta.exim:EximBackend"

    def config(self) -> str:
        i = self.instance
        return (f'mta = "exim"\n[exim]\nbinary = "{i.binary}"\nconfig = "{i.config_path}"\n'
                f'spool_directory = "{i.spool_directory}"\nqueue = "{i.queue_name}"\n')

    def queue_message(self, subject, size=0, to=("bob@example.net",), sender="alice@qrunner-test.localdomain"):
        message_id = self.instance.submit(sender, list(to), make_message(subject, size, sender=sender,
                                                                         to=", ".join(to)))
        self.instance.wait_queued([message_id])
        return message_id

    def snapshot(self):
        """``exim -bp`` for the queue and the freezes; the kernel's lock table for "active".

        Active means an Exim process holds the lock on the message's ``-D``
        file (a delivery, or ``-Mf`` in progress), as /proc/locks shows it.
        """
        locked = self.instance.locked_ids()
        return {entry["id"]: (ACTIVE if entry["id"] in locked else HELD if entry["frozen"] else WAITING,
                              tuple(entry["recipients"])) for entry in self.instance.queue()}

    def admin_hold(self, queue_id: str) -> None:
        self.instance.freeze([queue_id])

    def deliver_outside(self, queue_id: str) -> None:
        """Start ``exim -M`` without qrunner and wait until it holds the message's lock."""
        self._outside = subprocess.Popen(self.instance.argv + [f"-qG{self.instance.queue_name}", "-M", queue_id],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_where(queue_id, ACTIVE)

    def arrival(self, queue_id: str) -> int:
        """``received_time`` as exipick reports it (``exim -bp`` shows only the age)."""
        return int(self._exipick(queue_id)["received_time"])

    def size(self, queue_id: str) -> int:
        """``message_size`` as exipick reports it: ``$message_size``, in bytes (``exim -bp`` rounds to K)."""
        return int(self._exipick(queue_id)["message_size"])

    def dispatch_order(self, ids, timeout=30.0):
        """The order the relay (the sink) received the messages in.

        qrunner hands a batch of up to 10 ids to one ``exim -qG<queue> -Mc
        ID...``, and Exim delivers them one after another: it forks a
        delivery for the first id, waits for it to end, then starts the next
        (seen in the kernel's lock table: one ``-D`` lock at a time, in the
        order named). So the sink's arrival order is the dispatch order,
        exactly, and it is what the relay saw. (The mainlog's ``=>`` lines
        have the same order, but only second-resolution stamps, and say less
        about what left.) Batches may run side by side
        (``dispatch_concurrency``): more than 10 ids have no single order.
        """
        ids = list(ids)
        assert len(ids) <= 10, "exact only within one -Mc batch of 10"
        return _first_seen(ids, lambda: [self.exim_id(m) for m in self.sink.messages], "the sink", timeout)

    @staticmethod
    def exim_id(message) -> Optional[str]:
        """The Exim message id of a message the sink received: from the Received: field Exim added."""
        m = _EXIM_RECEIVED_ID.search(message.header("Received") or b"")
        return m.group(1).decode() if m else None

    def _exipick(self, queue_id: str) -> Dict[str, str]:
        return self.instance.exipick(["received_time", "message_size"])[queue_id]

    def filename(self, queue_id: str) -> str:
        """The -D file, as Filename is for Exim."""
        return self.instance.data_path(queue_id)
