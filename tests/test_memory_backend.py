"""The orchestration's harder cases over the memory back end: faults a real MTA will not show on demand.

A command failing half-way through its batch (as postsuper does on a stopped
Postfix), a message vanishing between the listing and the action, a
sender's route refusing a copy, a run killed mid-hand-over, a dead relay,
an ungated queue, a named queue and its way out. Each case runs the real
``qrunner`` command; expectations come from the memory queue's own file
(tests/memory_harness.py), never from qrunner's records.
"""

from __future__ import annotations

import os
import time

import pytest

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner

pytestmark = pytest.mark.memory

TWO_SENDERS = '[[sender]]\nid = 0\nname = "isp"\n[[sender]]\nid = 1\nname = "backup"\ndefault = true\n'


@pytest.fixture
def mta(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def test_a_hold_batch_that_fails_half_way_is_settled_by_the_next_run(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    first, second = mta.queue_message("one"), mta.queue_message("two")
    mta.set(fail={"hold": "the MTA stopped"})

    broken = qr("run")

    assert broken.code == 69 and "1 of 2 messages were changed" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr
    assert (mta.where(first), mta.where(second)) == (HELD, WAITING)
    assert qr("status").stdout.count("[holding, settled by the next run]") == 2  # no hold without a record
    assert "(run, failed: the memory queue's hold failed" in qr("status").stdout
    mta.set(fail={})
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{first}: record of an interrupted holding settled: message is on hold" in again.stderr
    assert f"{second}: action=hold" in again.stderr
    assert (mta.where(first), mta.where(second)) == (HELD, HELD)


def test_a_message_that_vanishes_before_its_hold_leaves_a_record_the_next_run_drops(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("delivered elsewhere meanwhile")
    mta.set(vanish={queue_id: "hold"})

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=vanished (not confirmed on hold" in result.stderr
    assert queue_id not in mta.snapshot()
    again = qr("run")
    assert f"{queue_id}: record of an interrupted holding settled: message not on hold" in again.stderr
    assert queue_id not in qr("status").stdout


def test_a_route_that_refuses_the_copy_leaves_the_original_held_with_the_reason(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    queue_id = mta.queue_message("for isp")
    mta.set(fail={"copy": "the listener refused it"})

    result = qr("run")

    assert result.code == 1, result.stderr
    assert f"{queue_id}: action=send sender=isp failed: {queue_id} was not copied" in result.stderr
    assert mta.where(queue_id) == HELD and mta.sink.messages == []
    assert "hand-over to sender isp failed" in qr("status").stdout
    mta.set(fail={})
    again = qr("run")
    assert f"{queue_id}: action=route sender=isp" in again.stderr
    assert "action=release" not in again.stderr  # handed over from the hold: never released on the way
    assert [(m.header("Subject"), m.route) for m in mta.sink.wait_for(1)] == [(b"for isp", "isp")]


def test_a_hold_going_to_a_senders_route_stays_held_and_recorded_until_it_is_copied(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    queue_id = mta.queue_message("held, then for isp")
    assert qr("run").code == 0
    held_since = [line for line in qr("status").stdout.splitlines() if line.startswith(queue_id)][0].split()[1:3]
    qr.set_script(ALLOW_ALL)

    killed = qr.run_killed_at("qrunner.state:State.record_copy")  # after the copy, before its record

    assert killed.code < 0
    assert mta.where(queue_id) == HELD  # never out of the hold in between
    [row] = [line for line in qr("status").stdout.splitlines() if line.startswith(queue_id)]
    assert row.split()[1:3] == held_since and row.endswith("being handed to sender isp")


def test_a_failure_late_in_a_send_batch_keeps_the_log_of_what_already_left(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, 'function CheckFile(f, a, s, c, rp, r, h)\n'
                                '  a.Priority = tonumber(h.subject:match("p(%d+)"))\n'
                                '  if sendername == "isp" and not h.subject:find("isp") then a.SkipSend = 1 end\n'
                                '  return a\nend\n')
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    first = mta.queue_message("p90 by default")
    routed = mta.queue_message("p50 for isp")
    last = mta.queue_message("p10 by default")
    mta.set(stop_at={last: "its delivery agent died"})

    result = qr("run")

    assert result.code == 69 and "stopped answering" in result.stderr, result.stderr
    assert f"{first}: action=send sender=backup priority=90" in result.stderr
    assert f"{routed}: action=route sender=isp priority=50" in result.stderr
    assert [m.route for m in mta.sink.wait_for(2)] == ["default", "isp"]  # the log tells exactly what left
    assert "(run, failed: the memory queue stopped answering" in qr("status").stdout
    mta.set(stop_at={})
    again = qr("run")
    assert again.code == 0 and f"{last}: action=send" in again.stderr, again.stderr
    assert [m.route for m in mta.sink.wait_for(3)] == ["default", "isp", "default"]  # nothing sent twice


def test_an_original_the_mta_would_not_remove_after_its_copy_is_removed_by_the_next_run(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    queue_id = mta.queue_message("for isp")
    mta.set(fail={"remove": "the MTA stopped"})

    result = qr("run")

    assert f"{queue_id}: the original of an accepted copy was not removed" in result.stderr
    assert f"{queue_id}: action=route sender=isp priority=50 new_queue_id=" in result.stderr
    assert "(original not deleted yet: the next run deletes it, then releases the copy)" in result.stderr
    assert mta.sink.messages == []  # the copy waits on its listener's hold while the original is queued
    mta.set(fail={})
    again = qr("run")
    assert "action=release" in again.stderr  # the failed command had removed the original before it stopped
    assert len(mta.sink.wait_for(1)) == 1 and queue_id not in mta.snapshot()


def test_a_copy_is_known_by_its_route_even_when_qrunners_records_are_gone(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    mta.set(routes_down=["isp"])  # the copy comes back deferred, and waits on its route
    original = mta.queue_message("for isp")
    first = qr("run")
    copy = first.stderr.split("new_queue_id=")[1].split()[0]
    assert mta.where(copy) == WAITING
    for name in os.listdir(qr.state_dir):
        os.remove(os.path.join(qr.state_dir, name))  # the records are lost

    again = qr("run")
    flushed = qr("flush", copy)

    assert again.code == 0 and copy not in again.stderr and "listed=0" in again.stderr, again.stderr
    assert flushed.code == 1 and f"{copy}: a copy qrunner handed to sender isp" in flushed.stderr
    assert original not in mta.snapshot() and mta.where(copy) == WAITING


def test_killed_before_the_copy_is_recorded_still_delivers_it_once(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    queue_id = mta.queue_message("crash before the record")

    killed = qr.run_killed_at("qrunner.state:State.record_copy")

    assert killed.code < 0
    assert mta.sink.messages == []  # the copy waits on its listener's hold
    assert mta.where(queue_id) == HELD  # never lost: the original is still here, still qrunner's
    again = qr("run")
    assert again.code == 0, again.stderr
    assert [m.route for m in mta.sink.wait_for(1)] == ["isp"]
    time.sleep(0.2)
    assert len(mta.sink.messages) == 1  # once: the unrecorded copy was deleted, the original handed over again
    assert queue_id not in mta.snapshot()


def test_mail_the_relay_deferred_waits_for_its_retry_time_unless_forced(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    queue_id = mta.queue_message("to a dead relay")
    mta.set(relay="down")
    assert qr("run").code == 0
    assert mta.where(queue_id) == WAITING  # the attempt came back deferred
    mta.set(relay="up")

    plan = qr("plan")
    polite = qr("flush", queue_id)
    forced = qr("flush", queue_id, "--ignore-policy")

    assert "waits for the MTA's retry time" in plan.stdout
    assert f"{queue_id}: action=wait" in polite.stderr and "action=send" not in polite.stderr
    assert f"{queue_id}: action=send sender=default priority=50 policy=overridden" in forced.stderr
    assert len(mta.sink.wait_for(1)) == 1


def test_an_ungated_queue_is_warned_about_on_every_run(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    mta.set(gated=False)
    for command in (["run"], ["run", "--dry-run"], ["plan"]):
        assert "the memory queue is not gated" in qr(*command).stderr


def test_flush_of_a_message_qrunner_may_not_touch_says_why_and_exits_1(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    busy = mta.queue_message("being delivered")
    mta.sink.data_delay = 60  # a slow relay: the delivery outside qrunner goes on during the flush
    mta.deliver_outside(busy)

    result = qr("flush", busy, "M00000099")

    assert result.code == 1, result.stderr
    assert f"{busy}: being delivered right now; left alone" in result.stderr
    assert "M00000099: not in the queue; nothing to do" in result.stderr
    bad = qr("flush", "../etc/passwd")
    assert bad.code == 64 and "is not a memory queue id" in bad.stderr


def test_holds_past_the_queue_lifetime_are_warned_about_and_flagged(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("held too long")
    assert qr("run").code == 0
    mta.set(queue_lifetime=1)
    time.sleep(1.1)

    result = qr("run")

    assert f"{queue_id}: held by qrunner for longer than the MTA's queue lifetime" in result.stderr
    assert "bounces when released" in qr("status").stdout
    assert mta.where(queue_id) == HELD  # a warning, never an action


def test_the_way_out_of_a_named_queue_leaves_nothing_behind(tmp_path, mta):
    mta.set(named_queue=True)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    held = mta.queue_message("held by qrunner")
    assert qr("run").code == 0
    waiting = mta.queue_message("arrived after the run")
    admins = mta.queue_message("held by the admin")
    mta.admin_hold(admins)

    result = qr("release", "--all", "--to-default-queue")

    assert result.code == 0, result.stderr
    default_queue = mta.sink._queue()["default_queue"]
    assert sorted(default_queue) == sorted([held, waiting, admins])
    assert mta.where(admins) == HELD  # moved, but the admin's hold is the admin's
    assert qr("run").stderr.count("listed=0") == 1


def test_to_default_queue_is_refused_without_a_named_queue(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    result = qr("release", "--all", "--to-default-queue")
    assert result.code == 64 and "no such queue" in result.stderr


def test_a_memory_queue_that_is_not_there_or_not_configured(tmp_path):
    missing = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, missing, ALLOW_ALL)
    missing_dir = tmp_path / "queue"
    for path in missing_dir.iterdir():
        path.unlink()
    missing_dir.rmdir()
    assert qr("run").code == 69
    qr.config_path.write_text(qr.config_path.read_text().replace("[memory]\n", "[memory]\n#"))
    result = qr("plan")
    assert result.code == 78 and "needs [memory] directory" in result.stderr


def test_without_the_gate_the_mta_delivers_by_itself_and_holds_still_work(tmp_path, mta):
    """The model of an ungated MTA: what the policy holds stays, the rest leaves on the MTA's own schedule."""
    qr = Qrunner(tmp_path, mta, 'function CheckFile(f, a, s, c, rp, r, h)\n'
                                '  if h.subject == "hold" then a.SkipSend = 1; a.Reason = "r" end return a end\n')
    held = mta.queue_message("hold")
    assert qr("run").code == 0
    mta.set(gated=False)
    other = mta.queue_message("leaves by itself")

    assert [m.queue_id for m in mta.sink.wait_for(1)] == [other]  # no qrunner run in between
    assert mta.where(held) == HELD


@pytest.mark.parametrize("command", [["release", "--all"], ["release", "--for-removal"]])
def test_the_way_out_never_sends_an_original_whose_copy_already_left(tmp_path, mta, command):
    """An interrupted hand-over leaves the original held; releasing it would have the MTA send it again."""
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    queue_id = mta.queue_message("crash after the copy")
    assert qr.run_killed_at(f"{mta.backend_class}.remove").code < 0  # the copy was recorded, then the kill
    mta.set(gated=False)

    result = qr(*command)

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=delete" in result.stderr and f"{queue_id}: action=release" not in result.stderr
    time.sleep(0.2)
    assert [m.route for m in mta.sink.wait_for(1)] == ["isp"]  # the copy, and nothing by the MTA's own routing
    assert queue_id not in mta.snapshot()
