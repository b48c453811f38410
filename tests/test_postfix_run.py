"""End to end against a real (private) Postfix in gate mode, with an SMTP sink as the relay.

Every test queues real mail through Postfix's sendmail, runs the real
``qrunner`` command, and checks what an admin would check: the sink, the
queue (postqueue -j), qrunner's status, its log and its exit code.
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner, queue_message, queue_state

BY_SUBJECT = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if subject:find("boom") then error("boom in the policy") end
  return a
end
"""

NIGHT_ONLY = """
function CheckFile(f, a)
  local hour = os.date("*t").hour
  if hour >= 7 and hour < 19 then a.SkipSend = true; a.Reason = "daytime: waits for the night" end
  return a
end
"""


def subjects(sink, count):
    return sorted(m.header("Subject").decode() for m in sink.wait_for(count))


def test_allowed_mail_is_delivered_and_skipped_mail_held_with_reason(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, BY_SUBJECT)
    send_id = queue_message(postfix, "go")
    hold_id = queue_message(postfix, "please hold")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert subjects(smtp_sink, 1) == ["go"]
    postfix.wait_gone([send_id])
    assert queue_state(postfix)[hold_id][0] == "hold"
    assert f'{hold_id}: action=hold sender=default priority=50 reason="subject says hold"' in result.stderr
    assert f"{send_id}: action=send sender=default priority=50" in result.stderr
    status = qr("status")
    assert hold_id in status.stdout and "subject says hold" in status.stdout
    assert "sent=1 held=1" in status.stdout


def test_later_run_with_moved_clock_releases_and_delivers(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, NIGHT_ONLY)
    queue_id = queue_message(postfix, "report")

    day = qr("run", "--now", "2026-11-25T10:00:00")
    assert day.code == 0, day.stderr
    assert queue_state(postfix)[queue_id][0] == "hold"
    assert smtp_sink.messages == []

    night = qr("run", "--now", "2026-11-25T22:00:00")
    assert night.code == 0, night.stderr
    assert f"{queue_id}: action=release" in night.stderr
    assert subjects(smtp_sink, 1) == ["report"]
    postfix.wait_gone([queue_id])
    assert "qrunner holds in" in qr("status").stdout and queue_id not in qr("status").stdout


def test_dispatch_order_follows_priority_then_arrival(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, BY_SUBJECT)
    low = queue_message(postfix, "p10")
    high = queue_message(postfix, "p90")
    mid_old = queue_message(postfix, "p50 first")
    mid_new = queue_message(postfix, "p50 second")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert qr.dispatch_order() == [high, mid_old, mid_new, low]
    sent_lines = [line.split(": ")[1] for line in result.stderr.splitlines() if "action=send" in line]
    assert sent_lines == [high, mid_old, mid_new, low]
    assert len(smtp_sink.wait_for(4)) == 4


def test_admin_hold_is_never_released(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    admins = queue_message(postfix, "admin holds this")
    postfix.hold([admins])

    assert qr("run").code == 0
    assert qr("flush", "--all").code == 0
    released = qr("release", admins)
    assert released.code == 0 and "not held by qrunner" in released.stderr
    assert qr("release", "--all").code == 0
    flushed = qr("flush", admins, "--ignore-policy")
    assert "on hold by someone else" in flushed.stderr
    assert flushed.code == 1  # a named message qrunner may not act on

    assert queue_state(postfix)[admins][0] == "hold"
    assert smtp_sink.messages == []


def test_active_message_is_not_touched(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_id = queue_message(postfix, "slow one")
    smtp_sink.data_delay = 6.0  # the relay takes its time: the message stays active
    postfix.schedule(queue_id)
    postfix.wait_for_queue([queue_id], "active")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert queue_id not in result.stderr
    assert len(smtp_sink.wait_for(1, timeout=30)) == 1  # delivered, never held
    postfix.wait_gone([queue_id])


def test_release_all_returns_holds_to_postfix_without_sending(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    ids = [queue_message(postfix, f"m{i}") for i in range(3)]
    assert qr("run").code == 0
    assert {queue_state(postfix)[i][0] for i in ids} == {"hold"}

    result = qr("release", "--all")

    assert result.code == 0, result.stderr
    assert {queue_state(postfix)[i][0] for i in ids} == {"deferred"}
    assert "qrunner holds in" in qr("status").stdout
    assert not any(i in qr("status").stdout for i in ids)
    time.sleep(1)
    assert smtp_sink.messages == []  # gate mode: released mail waits for a schedule


def test_release_help_warns_about_queue_lifetime(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix)
    assert "maximal_queue_lifetime" in qr("release", "--help").stdout


def test_flush_follows_policy_unless_ignored(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    first = queue_message(postfix, "first")
    second = queue_message(postfix, "second")

    polite = qr("flush", first)
    assert polite.code == 0, polite.stderr
    assert queue_state(postfix)[first][0] == "hold"
    assert second in queue_state(postfix) and queue_state(postfix)[second][0] == "deferred"

    forced = qr("flush", first, "--ignore-policy")
    assert forced.code == 0, forced.stderr
    assert "policy is overridden" in forced.stderr
    assert f"{first}: action=release" in forced.stderr
    assert subjects(smtp_sink, 1) == ["first"]
    postfix.wait_gone([first])
    assert queue_state(postfix)[second][0] == "deferred"


def test_dry_run_and_plan_change_nothing(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, BY_SUBJECT)
    queue_message(postfix, "p70 go")
    hold_id = queue_message(postfix, "hold me")
    before = queue_state(postfix)

    dry = qr("run", "--dry-run")
    plan = qr("plan", "--format", "json")

    assert dry.code == 0 and plan.code == 0
    assert "hold me" not in dry.stdout and hold_id in dry.stdout and "subject says hold" in dry.stdout
    assert '"action": "send", "priority": 70' in plan.stdout
    time.sleep(1)
    assert queue_state(postfix) == before
    assert smtp_sink.messages == []
    assert not os.path.exists(os.path.join(qr.state_dir, "qrunner.sqlite"))


def test_second_concurrent_run_exits_75(tmp_path, postfix):
    slow = "function Start() local t = os.clock() while os.clock() - t < 4 do end end\n" + ALLOW_ALL
    qr = Qrunner(tmp_path, postfix, slow, extra_config="")
    qr.config_path.write_text(qr.config_path.read_text().replace("script_timeout = 2", "script_timeout = 10"))
    queue_message(postfix, "x")
    first = qr.start("run")
    lock = os.path.join(qr.state_dir, "qrunner.lock")
    deadline = time.monotonic() + 30
    while not (os.path.exists(lock) and open(lock).read().strip()):
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)

    second = qr("run")

    assert second.code == 75
    assert f"PID {first.pid}" in second.stderr
    assert first.wait(timeout=60) == 0


def test_postfix_stopped_exits_69_and_changes_nothing(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_message(postfix, "x")
    before = queue_state(postfix)
    postfix.stop()

    result = qr("run")

    assert result.code == 69
    assert "Postfix is not running" in result.stderr
    assert "Traceback" not in result.stderr
    postfix.start()
    assert queue_state(postfix) == before


def test_script_that_does_not_load_exits_78_and_changes_nothing(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, "function CheckFile(f, a)\n  return a\n-- missing end\n")
    qr.set_script("function CheckFile(f, a)\n  if then\nend\n")
    queue_message(postfix, "x")
    before = queue_state(postfix)

    result = qr("run")

    assert result.code == 78
    assert "relayout.lua:2:" in result.stderr
    assert result.stdout == ""
    assert queue_state(postfix) == before


def test_runtime_error_holds_that_message_delivers_the_rest_exit_1(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, BY_SUBJECT)
    bad = queue_message(postfix, "boom")
    good = queue_message(postfix, "fine")

    result = qr("run")

    assert result.code == 1, result.stderr
    assert subjects(smtp_sink, 1) == ["fine"]
    postfix.wait_gone([good])
    assert queue_state(postfix)[bad][0] == "hold"
    status = qr("status").stdout
    assert bad in status and "policy error" in status and "boom in the policy" in status


def test_mail_to_a_dead_relay_waits_for_its_retry_time(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_id = queue_message(postfix, "to a dead relay")
    postfix.set(defer_transports="", relayhost="[127.0.0.1]:9")  # discard port: connection refused
    postfix.schedule(queue_id)
    deadline = time.monotonic() + 30
    while "deferred transport" in str(postfix.queue()) or queue_state(postfix)[queue_id][0] != "deferred":
        assert time.monotonic() < deadline, "Postfix did not try the dead relay"
        time.sleep(0.1)
    postfix.set(defer_transports="smtp", relayhost=f"[127.0.0.1]:{smtp_sink.port}")

    plan = qr("plan")
    run = qr("run")

    assert "waits for its retry time" in plan.stdout
    assert f"{queue_id}: action=wait" in run.stderr
    assert "action=send" not in run.stderr
    forced = qr("flush", queue_id, "--ignore-policy")
    assert forced.code == 0
    assert subjects(smtp_sink, 1) == ["to a dead relay"]


def test_crash_between_record_and_hold_is_settled_by_next_run(tmp_path, postfix, smtp_sink):
    """A hold recorded but never made (a crash in between) must not leave a stale record."""
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_id = queue_message(postfix, "x")
    assert qr("run").code == 0
    assert qr("release", "--all").code == 0
    arrival = [m["arrival_time"] for m in postfix.queue() if m["queue_id"] == queue_id][0]
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        db.execute("INSERT INTO holds VALUES (?, ?, ?, 'holding', 0, 'default', 'crash test')",
                   (f"postfix:{os.path.realpath(postfix.queue_directory)}", queue_id, arrival))
    qr.set_script(ALLOW_ALL)

    result = qr("run")

    assert result.code == 0, result.stderr
    assert "interrupted holding settled: message not on hold" in result.stderr
    assert subjects(smtp_sink, 1) == ["x"]


def test_bounce_has_an_empty_return_path(tmp_path, postfix, smtp_sink):
    """postqueue -j shows the null sender as MAILER-DAEMON; the policy must see ""."""
    qr = Qrunner(tmp_path, postfix, 'function CheckFile(f, a, s, c, rp)\n'
                                    '  if rp == "" then a.SkipSend = 1; a.Reason = "bounce" end\n'
                                    '  if rp == "MAILER-DAEMON" then error("null sender seen as MAILER-DAEMON") end\n'
                                    '  return a\nend\n')
    bounce = queue_message(postfix, "bounce", sender="")
    normal = queue_message(postfix, "normal")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert queue_state(postfix)[bounce][0] == "hold"
    assert f'{bounce}: action=hold sender=default priority=50 reason="bounce"' in result.stderr
    assert subjects(smtp_sink, 1) == ["normal"]


@pytest.mark.parametrize("command", [["run"], ["flush", "--all"], ["release", "--all"]])
def test_not_root_exits_77_before_touching_anything(tmp_path, postfix, mocker, capsys, command):
    from qrunner.cli import main

    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    mocker.patch("os.geteuid", return_value=65534)
    assert main(["--config", str(qr.config_path)] + command) == 77
    assert "must run as root" in capsys.readouterr().err
    assert not os.path.exists(qr.state_dir)  # refused before the lock or the state was touched


def test_status_of_an_unreadable_state_exits_77_not_an_empty_list(tmp_path, postfix, mocker, capsys):
    from qrunner.cli import main

    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_message(postfix, "x")
    assert qr("run").code == 0
    real_access = os.access
    mocker.patch("os.access", lambda path, mode: False if str(path).startswith(qr.state_dir) else real_access(path, mode))
    assert main(["--config", str(qr.config_path), "status"]) == 77
    assert "holds" not in capsys.readouterr().out


def test_unconfirmed_hold_keeps_its_record_until_the_next_run_settles_it(tmp_path, postfix, mocker, capsys):
    from qrunner.cli import main
    from qrunner.mta.postfix import PostfixBackend

    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_id = queue_message(postfix, "x")
    real_hold = PostfixBackend.hold
    mocker.patch.object(PostfixBackend, "hold", lambda self, ids: (real_hold(self, ids), set())[1])
    assert main(["--config", str(qr.config_path), "run"]) == 0
    mocker.stopall()
    assert queue_state(postfix)[queue_id][0] == "hold"
    assert "[holding, settled by the next run]" in qr("status").stdout

    settle = qr("run")

    assert settle.code == 0, settle.stderr
    assert "interrupted holding settled: message is on hold" in settle.stderr
    status = qr("status").stdout
    assert queue_id in status and "settled by the next run" not in status


def test_a_send_postfix_refuses_gives_exit_1(tmp_path, postfix, mocker):
    from qrunner.cli import main
    from qrunner.mta.postfix import PostfixBackend

    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_message(postfix, "x")
    mocker.patch.object(PostfixBackend, "schedule", return_value=False)
    assert main(["--config", str(qr.config_path), "run"]) == 1


def test_without_gate_mode_every_run_warns(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    postfix.set(defer_transports="")
    result = qr("run", "--dry-run", "-v")
    assert result.code == 0, result.stderr
    assert "not in gate mode" in result.stderr


def test_run_summary_line_and_quiet(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_message(postfix, "x")
    quiet = qr("run", "-q")
    assert quiet.code == 0 and quiet.stderr == ""
    queue_message(postfix, "y")
    loud = qr("run")
    assert "run: listed=1 sent=1 held=0 released=0 errors=0 seconds=" in loud.stderr
