"""The ``action=`` log lines are an interface: admins grep them. This golden test pins their format.

One scenario over the memory back end walks through every action the
executor logs (hold, keep, release, send, route, wait for a retry time and
for a pacing limit, vanished, delete, handback, expire both ways, the release
command's lines and the summaries); the log, with its PIDs, times and
durations made neutral, must be exactly the golden text.
A change here is a change admins' scripts see: make it on purpose.
"""

from __future__ import annotations

import re
import time

import pytest

from memory_harness import MemoryHarness
from qrunner_e2e import Qrunner, make_message

pytestmark = pytest.mark.memory

POLICY = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  if sendername == "isp" and not subject:find("isp") then a.SkipSend = 1; a.Reason = "not for isp" end
  return a
end
"""
RELEASE_ALL = "function CheckFile(f, a) return a end\n"
SENDERS = '[[sender]]\nid = 0\nname = "isp"\n[[sender]]\nid = 1\nname = "backup"\ndefault = true\n'

GOLDEN = """\
== run
qrunner[PID]: M00000003: action=hold sender=isp,backup priority=50 reason="isp: not for isp; backup: subject says hold"
qrunner[PID]: M00000001: action=route sender=isp priority=90 new_queue_id=M00000006
qrunner[PID]: M00000005: action=vanished (no longer waiting: delivered, deleted or being delivered)
qrunner[PID]: M00000002: action=send sender=backup priority=10
qrunner[PID]: M00000004: action=wait sender=backup priority=50 next_retry=TIME reason="the MTA's retry time"
qrunner[PID]: run: listed=5 sent=2 held=1 released=0 errors=0 seconds=SECONDS
== run -v
qrunner[PID]: M00000003: action=keep sender=isp,backup reason="isp: not for isp; backup: subject says hold"
qrunner[PID]: M00000004: action=wait sender=backup priority=50 next_retry=TIME reason="the MTA's retry time"
qrunner[PID]: run: listed=2 sent=0 held=0 released=0 errors=0 seconds=SECONDS
== run, policy allows all
qrunner[PID]: M00000003: action=route sender=isp priority=50 new_queue_id=M00000007
qrunner[PID]: M00000004: action=wait sender=isp priority=50 next_retry=TIME reason="the MTA's retry time"
qrunner[PID]: run: listed=2 sent=1 held=0 released=0 errors=0 seconds=SECONDS
== flush --ignore-policy
qrunner[PID]: flush --ignore-policy: the policy is overridden by the admin for M00000004
qrunner[PID]: M00000004: action=send sender=backup priority=50 policy=overridden
qrunner[PID]: flush: listed=1 sent=1 held=0 released=0 errors=0 seconds=SECONDS
== run killed after the copy was recorded, then run
qrunner[PID]: M00000008: action=delete reason="already handed to sender isp as M00000009 by an interrupted run"
qrunner[PID]: M00000009: action=release reason="copy for sender isp of M00000008: released to its route now that the original is gone"
qrunner[PID]: run: listed=0 sent=0 held=0 released=0 errors=0 seconds=SECONDS
== run with max_queue_time passed
qrunner[PID]: M0000000A: action=handback reason="older than max_queue_time: handed to the MTA's own retry and freeze rules"
qrunner[PID]: run: listed=0 sent=0 held=0 released=0 errors=0 seconds=SECONDS
== release --all --to-default-queue
qrunner[PID]: M0000000B: action=release
qrunner[PID]: M0000000B: action=move to=default-queue
qrunner[PID]: release: released=1 moved=1 seconds=SECONDS
== run with max_hold_age passed (hold, then too old)
qrunner[PID]: M0000000C: action=release
qrunner[PID]: M0000000C: action=expire to=default-route priority=50 reason="past max_hold_age (10 min since arrival): sent by the MTA's own routing without asking the policy"
qrunner[PID]: run: listed=0 sent=0 held=0 released=1 errors=0 expired=1 seconds=SECONDS
== run with max_hold_age passed (hold, then returned)
qrunner[PID]: M0000000D: action=expire to=return-path reason="past max_hold_age (10 min since arrival): returned to its sender"
qrunner[PID]: run: listed=0 sent=0 held=0 released=0 errors=0 expired=1 seconds=SECONDS
== run with max_per_run = 1
qrunner[PID]: M0000000E: action=route sender=isp priority=50 new_queue_id=M00000011
qrunner[PID]: M0000000F: action=wait sender=isp priority=50 reason="max_per_run (1) reached: left for the next run"
qrunner[PID]: M00000010: action=wait sender=isp priority=50 reason="max_per_run (1) reached: left for the next run"
qrunner[PID]: run: listed=3 sent=1 held=0 released=0 errors=0 seconds=SECONDS
== run with max_active = 1 while the MTA delivers one
qrunner[PID]: M0000000F: action=wait sender=isp priority=50 reason="max_active (1) reached: the MTA is delivering 1 message; left for the next run"
qrunner[PID]: M00000010: action=wait sender=isp priority=50 reason="max_active (1) reached: the MTA is delivering 1 message; left for the next run"
qrunner[PID]: run: listed=2 sent=0 held=0 released=0 errors=0 seconds=SECONDS
"""


def neutral(log: str) -> str:
    log = re.sub(r"qrunner\[\d+\]", "qrunner[PID]", log)
    log = re.sub(r"seconds=\d+\.\d\d", "seconds=SECONDS", log)
    return re.sub(r"next_retry=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "next_retry=TIME", log)


def test_every_action_line_keeps_its_format(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, POLICY)
    qr.config_path.write_text(qr.config_path.read_text() + SENDERS)
    transcript = []

    def step(title, *args):
        result = qr(*args)
        transcript.append(f"== {title}\n" + neutral(result.stderr))
        return result

    mta.queue_message("p90 for isp")          # M00000001: routed through isp (its copy: M00000006)
    mta.queue_message("p10 plain")            # M00000002: backup, the MTA's own route
    mta.queue_message("please hold")          # M00000003: every sender skips it
    waiting = mta.queue_message("deferred")   # M00000004: its retry time has not come
    vanishing = mta.queue_message("gone")     # M00000005: delivered elsewhere before qrunner asks
    with mta.queue.change() as queue:
        [entry] = [m for m in queue["messages"] if m["id"] == waiting]
        entry["retry_at"] = time.time() + 3600
        queue["vanish"] = {vanishing: "send"}
    step("run", "run")
    step("run -v", "run", "-v")
    qr.set_script(RELEASE_ALL)
    step("run, policy allows all", "run")
    step("flush --ignore-policy", "flush", waiting, "--ignore-policy")

    qr.set_script(POLICY)
    mta.queue_message("isp again")
    assert qr.run_killed_at(f"{mta.backend_class}.remove", "run").code < 0
    step("run killed after the copy was recorded, then run", "run")

    mta.set(named_queue=True, max_queue_time=3600)
    mta.queue_message("old")
    with mta.queue.change() as queue:
        queue["messages"][-1]["arrival"] = time.time() - 7200
    step("run with max_queue_time passed", "run")

    qr.set_script('function CheckFile(f, a) a.SkipSend = 1; a.Reason = "r" return a end\n')
    mta.queue_message("held on the way out")
    assert qr("run", "-q").code == 0
    step("release --all --to-default-queue", "release", "--all", "--to-default-queue")

    qr.set_script(POLICY)
    for subject in ("hold, then too old", "hold, then returned"):
        mta.queue.submit("alice@example.org", ["bob@example.net"], make_message(subject), arrival=time.time() - 1800)
        assert qr("run", "-q").code == 0
        qr.config_path.write_text("max_hold_age = 600\n" + qr.config_path.read_text())
        if subject.endswith("returned"):
            qr.config_path.write_text('on_hold_expiry = "bounce"\n' + qr.config_path.read_text())
        step(f"run with max_hold_age passed ({subject})", "run")
        qr.config_path.write_text(qr.config_path.read_text().replace("max_hold_age = 600\n", ""))

    qr.set_script(RELEASE_ALL)
    settings = qr.config_path.read_text()
    qr.config_path.write_text("max_per_run = 1\n" + settings)
    mta.queue_message("paced")
    mta.queue_message("paced too")
    step("run with max_per_run = 1", "run")
    qr.config_path.write_text("max_active = 1\n" + settings)
    mta.queue.start_delivery(mta.queue_message("being delivered"), 60)
    step("run with max_active = 1 while the MTA delivers one", "run")

    assert "".join(transcript) == GOLDEN
