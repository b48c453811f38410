"""Two routed senders ("isp", then "backup") over the memory back end, a private Postfix or a private Exim.

For tests that need several senders on every back end (``explain``,
``snapshot``). The real MTAs reuse tests/test_senders.py's routes (Postfix:
a re-injection listener per sender's relay; Exim: contrib's router and a
transport per sink), so a test module using this imports that module's
fixtures ``relays``, ``listener_ports`` and ``sinks``.
"""

from __future__ import annotations

import time
from typing import Sequence, Tuple

import test_senders
from memory_harness import MemoryHarness
from mta_harness import Harness, PostfixHarness
from qrunner_e2e import Qrunner, make_message

NAMES = ("isp", "backup")
SENDER = "alice@qrunner-test.localdomain"


def two_senders(request, tmp_path, script: str) -> Tuple[Harness, Qrunner]:
    """The harness of ``request.param`` and a qrunner configured with the two senders, each with its route."""
    if request.param == "memory":
        mta = MemoryHarness(str(tmp_path / "memory-queue"))
        qr = Qrunner(tmp_path, mta, script)
        qr.config_path.write_text(qr.config_path.read_text() + "".join(
            f'[[sender]]\nid = {i}\nname = "{name}"\n' for i, name in enumerate(NAMES)))
        return mta, qr
    if request.param == "postfix":
        postfix = request.getfixturevalue("postfix")
        mta = PostfixHarness(postfix, request.getfixturevalue("smtp_sink"))
        ports = request.getfixturevalue("listener_ports")
        for relay in request.getfixturevalue("relays"):
            relay.clear()
        return mta, test_senders.postfix_qrunner(tmp_path, postfix, script, NAMES, ports)
    exim = request.getfixturevalue("exim")
    return test_senders.exim_qrunner(tmp_path, exim, request.getfixturevalue("exim_sink"),
                                     request.getfixturevalue("sinks"), script, NAMES)


def submit(mta: Harness, subject: str, size: int = 0, to: Sequence[str] = ("bob@example.net",),
           headers: Sequence[tuple] = ()) -> str:
    """Queue a message with extra header fields and wait until it waits behind the gate."""
    content = make_message(subject, size, headers, sender=SENDER, to=", ".join(to))
    if mta.name == "memory":
        queue_id = mta.queue.submit(SENDER, list(to), content)
        time.sleep(0.002)  # arrival order is by time, as in a real queue
        return queue_id
    queue_id = mta.instance.submit(SENDER, list(to), content)
    if mta.name == "postfix":
        mta.instance.wait_deferred([queue_id])
    else:
        mta.instance.wait_queued([queue_id])
    return queue_id
