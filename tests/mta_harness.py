"""One face for both real MTAs, so an end-to-end case is written once and run over each.

A harness wraps a private instance (tests/postfix_instance.py,
tests/exim_instance.py) and its SMTP sink and answers, in the admin's words,
what the tests ask: queue a message, where is it now (waiting, held,
active, gone), its arrival time and size, hold it as an admin would,
deliver it outside qrunner, and what qrunner's configuration for this MTA
is.

Every answer comes from the MTA's own tools (``postqueue -j``, ``exim
-bp``, ``exipick``, the kernel's lock table), never from qrunner's
readers or its state database: a test must not grade the program with the
program's own eyes.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from typing import Dict, Optional, Sequence, Tuple

from qrunner_e2e import make_message

WAITING, HELD, ACTIVE = "waiting", "held", "active"


class Harness:
    name = ""

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

    def where(self, queue_id: str) -> Optional[str]:
        return self.snapshot().get(queue_id, (None,))[0]

    def wait_where(self, queue_id: str, where: Optional[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.where(queue_id) != where:
            assert time.monotonic() < deadline, f"{queue_id} is {self.where(queue_id)}, not {where}"
            time.sleep(0.05)

    def wait_gone(self, queue_id: str) -> None:
        self.wait_where(queue_id, None)


class PostfixHarness(Harness):
    name = "postfix"
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

    def _exipick(self, queue_id: str) -> Dict[str, str]:
        return self.instance.exipick(["received_time", "message_size"])[queue_id]

    def filename(self, queue_id: str) -> str:
        """The -D file, as Filename is for Exim."""
        return self.instance.data_path(queue_id)
