"""End to end, written once and run over the memory back end and both real MTAs.

Postfix and Exim each run gated and relay to an SMTP sink; the memory back
end (qrunner/mta/memory.py) models the same queue on any machine, so the
orchestration's every case also runs in seconds without an MTA.

Every test queues real mail, runs the real ``qrunner`` command, and checks
what an admin would check: the sink, the queue, qrunner's status, its log
and its exit code. MTA-specific cases live in test_postfix_run.py and
test_exim_run.py.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from mta_harness import ACTIVE, HELD, WAITING, harness_for
from qrunner_e2e import ALLOW_ALL, NIGHT_ONLY, SKIP_ALL, Qrunner

BY_SUBJECT = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if subject:find("boom") then error("boom in the policy") end
  return a
end
"""


@pytest.fixture(params=["memory", "postfix", "exim"])
def mta(request, tmp_path):
    """Each test runs against the memory back end (any machine), the private Postfix and the private Exim."""
    return harness_for(request, tmp_path)


def subjects(sink, count):
    return sorted(m.header("Subject").decode() for m in sink.wait_for(count))


def test_allowed_mail_is_delivered_and_skipped_mail_held_with_reason(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, BY_SUBJECT)
    send_id = mta.queue_message("go")
    hold_id = mta.queue_message("please hold")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert subjects(mta.sink, 1) == ["go"]
    mta.wait_gone(send_id)
    assert mta.where(hold_id) == HELD
    assert f'{hold_id}: action=hold sender=default priority=50 reason="subject says hold"' in result.stderr
    assert f"{send_id}: action=send sender=default priority=50" in result.stderr
    assert all(line.startswith(f"qrunner[{line[8:].split(']')[0]}]: ") for line in result.stderr.splitlines())
    status = qr("status")
    [row] = [line for line in status.stdout.splitlines() if line.startswith(hold_id)]
    assert status.stdout.splitlines()[1].split() == ["QUEUE", "ID", "HELD", "SINCE", "ENVELOPE", "FROM", "DECIDED",
                                                     "BY", "PRIO", "REASON"]
    assert re.match(rf"{hold_id}\s+{time.strftime('%Y-%m-%d')} \d\d:\d\d:\d\d\s+alice@qrunner-test.localdomain\s+"
                    r"default\s+50\s+subject says hold$", row)
    assert re.search(rf"last run: {time.strftime('%Y-%m-%d')} \d\d:\d\d:\d\d \(run, ok\): listed=2 sent=1 held=1",
                     status.stdout)


def test_later_run_with_moved_clock_releases_and_delivers(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, NIGHT_ONLY)
    queue_id = mta.queue_message("report")

    day = qr("run", "--now", "2026-11-25T10:00:00")
    assert day.code == 0, day.stderr
    assert mta.where(queue_id) == HELD
    assert mta.sink.messages == []
    still_day = qr("run", "-v", "--now", "2026-11-25T11:00:00")  # -v: also what stays as it is
    assert f"{queue_id}: action=keep" in still_day.stderr and mta.where(queue_id) == HELD

    night = qr("run", "--now", "2026-11-25T22:00:00")
    assert night.code == 0, night.stderr
    assert f"{queue_id}: action=release" in night.stderr
    assert subjects(mta.sink, 1) == ["report"]
    mta.wait_gone(queue_id)
    assert queue_id not in qr("status").stdout


def test_dispatch_order_follows_priority_then_arrival(tmp_path, mta):
    """The order as the MTA saw it: Postfix's flush requests in its log; the relay's arrivals for Exim."""
    qr = Qrunner(tmp_path, mta, BY_SUBJECT)
    low = mta.queue_message("p10")
    high = mta.queue_message("p90")
    mid_old = mta.queue_message("p50 first")
    mid_new = mta.queue_message("p50 second")

    result = qr("run")

    assert result.code == 0, result.stderr
    order = mta.dispatch_order([low, high, mid_old, mid_new])
    if mta.name == "postfix":  # the flush service takes one level's few requests in either order (mta_harness.py)
        assert order[0] == high and order[3] == low and set(order[1:3]) == {mid_old, mid_new}, order
    else:
        assert order == [high, mid_old, mid_new, low]
    sent_lines = [line.split(": ")[1] for line in result.stderr.splitlines() if "action=send" in line]
    assert sent_lines == [high, mid_old, mid_new, low]
    assert len(mta.sink.wait_for(4)) == 4


def test_admin_hold_is_never_released_or_sent(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    admins = mta.queue_message("admin holds this")
    mta.admin_hold(admins)

    assert qr("run").code == 0
    assert qr("flush", "--all").code == 0
    released = qr("release", admins)
    assert released.code == 1 and f"{admins}: not held by qrunner; left alone" in released.stderr
    assert "(release, exit 1: 1 named but left alone)" in qr("status").stdout
    assert qr("release", "--all").code == 0
    flushed = qr("flush", admins, "--ignore-policy")
    assert "by someone else" in flushed.stderr
    assert flushed.code == 1  # a named message qrunner may not act on
    assert "(flush, exit 1: 1 named but left alone)" in qr("status").stdout  # the real outcome, not "ok"

    assert mta.where(admins) == HELD
    time.sleep(0.5)
    assert mta.sink.messages == []


def test_message_being_delivered_is_not_touched(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("slow one")
    mta.sink.data_delay = 6.0  # the relay takes its time: the message stays active meanwhile
    mta.deliver_outside(queue_id)

    result = qr("run")

    assert result.code == 0, result.stderr
    assert queue_id not in result.stderr
    assert len(mta.sink.wait_for(1, timeout=30)) == 1  # delivered, never held
    mta.wait_gone(queue_id)


def test_release_all_returns_holds_to_the_mta_without_sending(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    ids = [mta.queue_message(f"m{i}") for i in range(3)]
    assert qr("run").code == 0
    assert {mta.where(i) for i in ids} == {HELD}

    result = qr("release", "--all")

    assert result.code == 0, result.stderr
    assert {mta.where(i) for i in ids} == {WAITING}
    assert not any(i in qr("status").stdout for i in ids)
    time.sleep(1)
    assert mta.sink.messages == []  # gate mode: released mail waits for qrunner


def test_release_of_one_named_hold(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    first, second = mta.queue_message("one"), mta.queue_message("two")
    assert qr("run").code == 0

    result = qr("release", first)

    assert result.code == 0, result.stderr
    assert mta.where(first) == WAITING and mta.where(second) == HELD


def test_flush_follows_policy_unless_ignored(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    first = mta.queue_message("first")
    second = mta.queue_message("second")

    polite = qr("flush", first)
    assert polite.code == 0, polite.stderr
    assert f'{first}: action=hold sender=default priority=50 reason="not now"' in polite.stderr
    assert mta.where(first) == HELD
    assert mta.where(second) == WAITING
    again = qr("flush", first)  # a named message the policy still holds: said, with the reason
    assert again.code == 0 and f'{first}: action=keep sender=default reason="not now"' in again.stderr

    forced = qr("flush", first, "--ignore-policy")
    assert forced.code == 0, forced.stderr
    assert "policy is overridden" in forced.stderr
    assert f"{first}: action=release" in forced.stderr
    assert subjects(mta.sink, 1) == ["first"]
    mta.wait_gone(first)
    assert mta.where(second) == WAITING


def test_dry_run_and_plan_change_nothing(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, BY_SUBJECT)
    mta.queue_message("p70 go")
    hold_id = mta.queue_message("hold me")
    before = mta.snapshot()

    dry = qr("run", "--dry-run")
    plan = qr("plan", "--format", "json")

    assert dry.code == 0 and plan.code == 0, dry.stderr + plan.stderr
    assert hold_id in dry.stdout and "subject says hold" in dry.stdout
    assert '"action": "send", "priority": 70' in plan.stdout
    time.sleep(1)
    assert mta.snapshot() == before
    assert mta.sink.messages == []
    assert not os.path.exists(os.path.join(qr.state_dir, "qrunner.sqlite"))


def test_second_concurrent_run_exits_75(tmp_path, mta):
    slow = "function Start() local t = os.clock() while os.clock() - t < 4 do end end\n" + ALLOW_ALL
    qr = Qrunner(tmp_path, mta, slow)
    qr.config_path.write_text(qr.config_path.read_text().replace("script_timeout = 2", "script_timeout = 10"))
    mta.queue_message("x")
    first = qr.start("run")
    lock = os.path.join(qr.state_dir, "qrunner.lock")
    deadline = time.monotonic() + 30
    while not (os.path.exists(lock) and open(lock).read().strip()):
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)

    second = qr("run")
    flush = qr("flush", "--all")
    release = qr("release", "--all")

    assert (second.code, flush.code, release.code) == (75, 75, 75)
    assert f"PID {first.pid}" in second.stderr
    assert first.wait(timeout=60) == 0


def test_script_that_does_not_load_exits_78_and_changes_nothing(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, "function CheckFile(f, a)\n  if then\nend\n")
    mta.queue_message("x")
    before = mta.snapshot()

    result = qr("run")

    assert result.code == 78
    assert "relayout.lua:2:" in result.stderr
    assert result.stdout == ""
    assert mta.snapshot() == before


def test_runtime_error_holds_that_message_delivers_the_rest_exit_1(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, BY_SUBJECT)
    bad = mta.queue_message("boom")
    good = mta.queue_message("fine")

    result = qr("run")

    assert result.code == 1, result.stderr
    assert subjects(mta.sink, 1) == ["fine"]
    mta.wait_gone(good)
    assert mta.where(bad) == HELD
    status = qr("status").stdout
    assert bad in status and "policy error" in status and "boom in the policy" in status


def test_live_policy_sees_the_message_as_queued(tmp_path, mta):
    """Arguments from the live queue: size, sender, recipients, headers, the queue file as Filename.

    Size and CreationTime are checked against what the MTA's own tool reports for the message.
    """
    script = """
function CheckFile(f, a, size, created, from, rcpts, hd, hl)
  print(string.format("seen %s|%d|%s|%s|%d|%s|%s|%s", created, size, from, table.concat(rcpts, ","), #hl,
        hd.subject, tostring(io == nil), f))
  local file_ok = (f ~= "") and f:find("^/") ~= nil
  if not file_ok then error("Filename is not a path: " .. f) end
  return a
end
"""
    qr = Qrunner(tmp_path, mta, script)
    queue_id = mta.queue_message("argument check", to=("x1@example.net", "x2@example.org"))

    result = qr("plan")

    assert result.code == 0, result.stderr
    line = [ln for ln in result.stderr.splitlines() if "seen " in ln][0]
    created, size, sender, rcpts, nlines, subject, sandboxed, filename = line.split("seen ", 1)[1].split("|")
    assert filename == mta.filename(queue_id)
    assert created == time.strftime("%Y%m%d%H%M%S", time.localtime(mta.arrival(queue_id)))
    assert int(size) == mta.size(queue_id)  # postqueue -j message_size; exipick message_size
    assert sender == "alice@qrunner-test.localdomain"
    assert rcpts == "x1@example.net,x2@example.org"
    assert int(nlines) >= 3 and subject == "argument check" and sandboxed == "true"


# -- crash recovery: a run killed (SIGKILL) at each step, then a normal run ------------------


def test_killed_between_recording_a_hold_and_making_it(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("crash before the hold")

    killed = qr.run_killed_at(f"{mta.backend_class}.hold")

    assert killed.code < 0
    assert mta.where(queue_id) == WAITING  # the MTA was never asked
    assert "[holding, settled by the next run]" in qr("status").stdout
    qr.set_script(ALLOW_ALL)
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{queue_id}: record of an interrupted holding settled: message not on hold" in again.stderr
    assert subjects(mta.sink, 1) == ["crash before the hold"]
    mta.wait_gone(queue_id)
    assert queue_id not in qr("status").stdout


def test_killed_between_making_a_hold_and_marking_it(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("crash after the hold")

    killed = qr.run_killed_at("qrunner.state:State.mark_held")

    assert killed.code < 0
    assert mta.where(queue_id) == HELD  # made, not yet marked: still qrunner's, never an admin's
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{queue_id}: record of an interrupted holding settled: message is on hold" in again.stderr
    qr.set_script(ALLOW_ALL)
    released = qr("run")
    assert f"{queue_id}: action=release" in released.stderr
    assert subjects(mta.sink, 1) == ["crash after the hold"]


def test_killed_between_marking_a_release_and_making_it(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("crash before the release")
    assert qr("run").code == 0
    qr.set_script(ALLOW_ALL)

    killed = qr.run_killed_at(f"{mta.backend_class}.release")

    assert killed.code < 0
    assert mta.where(queue_id) == HELD and "[releasing, settled by the next run]" in qr("status").stdout
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{queue_id}: record of an interrupted releasing settled: message is on hold" in again.stderr
    assert f"{queue_id}: action=release" in again.stderr
    assert subjects(mta.sink, 1) == ["crash before the release"]


def test_killed_after_the_send_before_the_run_was_recorded_sends_once(tmp_path, mta):
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    queue_id = mta.queue_message("crash after the send")

    killed = qr.run_killed_at("qrunner.state:State.record_dispatches")

    assert killed.code < 0
    assert subjects(mta.sink, 1) == ["crash after the send"]
    mta.wait_gone(queue_id)
    again = qr("run")
    assert again.code == 0 and "listed=0" in again.stderr, again.stderr
    time.sleep(0.5)
    assert len(mta.sink.messages) == 1
