"""End to end against a real (private) Postfix in gate mode: the cases only Postfix has.

The cases both MTAs share are in test_run.py. These queue real mail through
Postfix's sendmail, run the real ``qrunner`` command, and check what an
admin would check: the sink, the queue (postqueue -j), qrunner's status,
its log and its exit code.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from log_daemons import wait_until
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner, queue_message, queue_state


def subjects(sink, count):
    return sorted(m.header("Subject").decode() for m in sink.wait_for(count))


def test_release_help_warns_about_queue_lifetime(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix)
    assert "maximal_queue_lifetime" in qr("release", "--help").stdout


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
    polite = qr("flush", queue_id)

    assert "waits for Postfix's retry time" in plan.stdout
    assert f"{queue_id}: action=wait" in run.stderr
    assert "action=send" not in run.stderr
    assert f"{queue_id}: action=wait" in polite.stderr and "action=send" not in polite.stderr
    forced = qr("flush", queue_id, "--ignore-policy")
    assert forced.code == 0
    assert subjects(smtp_sink, 1) == ["to a dead relay"]


def test_crash_between_record_and_hold_is_settled_by_next_run(tmp_path, postfix, smtp_sink):
    """Killed after recording a hold but before postsuper -h: the next run settles the record and sends."""
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_id = queue_message(postfix, "x")

    killed = qr.run_killed_at("qrunner.mta.postfix:PostfixBackend.hold")  # recorded 'holding', never held

    assert killed.code == -signal.SIGKILL
    assert queue_state(postfix)[queue_id][0] == "deferred"  # postsuper -h never ran
    assert "[holding, settled by the next run]" in qr("status").stdout
    qr.set_script(ALLOW_ALL)

    result = qr("run")

    assert result.code == 0, result.stderr
    [settled] = [line for line in result.stderr.splitlines() if "interrupted holding settled" in line]
    assert queue_id in settled and "message not on hold" in settled
    assert subjects(smtp_sink, 1) == ["x"]
    postfix.wait_gone([queue_id])
    assert queue_id not in qr("status").stdout


def test_bounce_has_an_empty_return_path(tmp_path, postfix, smtp_sink):
    """postqueue -j shows the null sender as MAILER-DAEMON; the policy must see ""."""
    qr = Qrunner(tmp_path, postfix, 'function CheckFile(f, a, s, c, rp)\n'
                                    '  if rp == "" then a.SkipSend = 1; a.Reason = "bounce" end\n'
                                    '  if rp == "MAILER-DAEMON" then error("null sender seen as MAILER-DAEMON") end\n'
                                    '  return a\nend\n')
    bounce = queue_message(postfix, "bounce", sender="")
    queue_message(postfix, "normal")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert queue_state(postfix)[bounce][0] == "hold"
    assert f'{bounce}: action=hold sender=default priority=50 reason="bounce"' in result.stderr
    assert subjects(smtp_sink, 1) == ["normal"]
    [row] = [line for line in qr("status").stdout.splitlines() if line.startswith(bounce)]
    assert row.split()[3:7] == ["<>", "default", "50", "bounce"]  # the null sender, as the log writes it


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


def _refusing_service(modes=None, deferred=None):
    """A flush service that greets, answers status 1 (refused) and moves nothing, so nothing reaches Postfix;
    ``modes`` gets the ``deferred`` queue file's mode as each request arrives."""
    def refusing(_path, _queue_id):
        if modes is not None:
            modes.append(os.stat(deferred).st_mode)
        ours, theirs = socket.socketpair()
        with theirs:
            theirs.sendall(b"protocol\0queue_flush_protocol\0\0status\0" b"1\0\0")
        return ours
    return refusing


def test_a_send_postfix_refuses_gives_exit_1(tmp_path, postfix, mocker):
    """The flush service answers each request with a status other than 0: exit 1, and the message still waits."""
    from qrunner.cli import main
    from qrunner.mta import postfix_flush

    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_id = queue_message(postfix, "x")
    mocker.patch.object(postfix_flush, "_send", side_effect=_refusing_service())
    assert main(["--config", str(qr.config_path), "run"]) == 1
    assert queue_state(postfix)[queue_id][0] == "deferred"


def test_without_gate_mode_every_run_warns_and_status_says_gated_no(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    assert "gated: yes" in qr("status").stdout.splitlines()
    postfix.set(defer_transports="")
    for command in (["run", "--dry-run", "-v"], ["plan"], ["run"], ["-q", "run"], ["run", "-q"]):
        result = qr(*command)
        assert result.code == 0, result.stderr
        assert "Postfix is not in gate mode (defer_transports is empty)" in result.stderr, command
    status = qr("status").stdout.splitlines()
    assert "gated: no (Postfix is not in gate mode (defer_transports is empty): it delivers deferred mail on its " \
           "own schedule, so qrunner's holds work but its order does not; see contrib/postfix/main.cf.qrunner)" \
           in status


def test_run_summary_line_and_quiet(tmp_path, postfix, smtp_sink):
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_message(postfix, "x")
    quiet = qr("run", "-q")
    assert quiet.code == 0 and quiet.stderr == ""
    queue_message(postfix, "y")
    loud = qr("run")
    assert "run: listed=1 sent=1 held=0 released=0 errors=0 seconds=" in loud.stderr


def test_holds_older_than_the_queue_lifetime_are_flagged(tmp_path, postfix):
    qr = Qrunner(tmp_path, postfix, SKIP_ALL)
    queue_id = queue_message(postfix, "x")
    assert qr("run").code == 0
    postfix.set(maximal_queue_lifetime="1s", bounce_queue_lifetime="1s")
    time.sleep(2.1)

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: held by qrunner for longer than the MTA's queue lifetime" in result.stderr
    assert "bounces when released" in qr("status").stdout
    assert queue_state(postfix)[queue_id][0] == "hold"  # a warning, never an action


def test_real_postqueue_j_output_plans_offline_as_the_live_queue_plans(tmp_path, postfix):
    """postqueue -j | qrunner plan --queue-file -: the policy sees what a live run shows it, bounces included."""
    qr = Qrunner(tmp_path, postfix, 'function CheckFile(f, a, size, c, rp, r) a.Priority = 70 '
                                    'if rp == "" then a.SkipSend = 1 a.Reason = "bounce of " .. r[1] end return a end\n')
    normal = queue_message(postfix, "normal")
    bounce = queue_message(postfix, "bounce", sender="")
    listing = subprocess.run(["postqueue", "-c", postfix.config_directory, "-j"], capture_output=True, check=True)
    env = dict(os.environ, QRUNNER_CONFIG=str(qr.config_path),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    offline = subprocess.run([sys.executable, "-m", "qrunner", "plan", "--queue-file", "-", "--format", "json"],
                             input=listing.stdout, capture_output=True, env=env)
    live = qr("plan", "--format", "json")

    assert offline.returncode == 0 and live.code == 0, offline.stderr + live.stderr.encode()
    assert b'"sender": "MAILER-DAEMON"' in listing.stdout  # how postqueue -j shows the null sender
    shown = ("queue_id", "action", "priority", "reason", "errors")
    offline_decisions = [{k: d[k] for k in shown} for d in json.loads(offline.stdout)["decisions"]]
    live_decisions = [{k: d[k] for k in shown} for d in json.loads(live.stdout)["decisions"]]
    assert offline_decisions == live_decisions
    assert {d["queue_id"]: d["action"] for d in live_decisions} == {normal: "send", bounce: "skip"}


# ``python OVERTAKEN_RUN POSTCONF CONFIG_DIR ARGS...``: the qrunner command, its flush requests answered by a flush
# service the queue manager overtakes. flush(8)'s send_file makes the deferred file due (utime) first, and only then
# marks it flushed and moves it to incoming/; here the queue manager's own scan of the deferred queue (each second,
# the instance's queue_run_delay) comes in between, as it can on a busy machine, and takes the file before the
# service's next step, which then finds nothing to move and answers success (status 0, after its greeting), as
# flush(8) does.
OVERTAKEN_RUN = """
import glob, os, socket, subprocess, sys, time
import qrunner.mta.postfix_flush as postfix_flush
postconf, config_directory = sys.argv[1], sys.argv[2]
queue_directory = subprocess.run([postconf, "-c", config_directory, "-h", "queue_directory"],
                                 capture_output=True, text=True, check=True).stdout.strip()
def overtaken_flush(path, queue_id):
    [deferred] = glob.glob(os.path.join(queue_directory, "deferred", "**", queue_id), recursive=True)
    os.utime(deferred)
    deadline = time.monotonic() + 10
    while os.path.exists(deferred):
        if time.monotonic() > deadline:
            sys.exit("the queue manager's scan did not take " + queue_id + " within 10 s: the race was not played")
        time.sleep(0.01)
    ours, service = socket.socketpair()
    service.sendall(b"protocol\\0queue_flush_protocol\\0\\0status\\0000\\0\\0")
    service.close()
    return ours
assert hasattr(postfix_flush, "_send"), "the flush client changed: this test must replace its request step"
postfix_flush._send = overtaken_flush
from qrunner.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_flush_the_queue_manager_overtakes_still_gets_past_the_gate(tmp_path, postfix, smtp_sink):
    """A scan of the deferred queue between the flush service's steps delivers the message, not gates it again."""
    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_id = queue_message(postfix, "overtaken")
    wrapper = tmp_path / "overtaken_run.py"
    wrapper.write_text(OVERTAKEN_RUN)
    to = f"{queue_id}: to=<bob@example.net>"
    wait_until(lambda: re.search(f"{to}.*deferred transport", postfix.log_text()), "the arrival's gate line")

    run = subprocess.run([sys.executable, str(wrapper), postfix._command("postconf"), postfix.config_directory,
                          "run"], env=qr._env(), capture_output=True, text=True, timeout=120)

    assert run.returncode == 0, run.stderr
    assert subjects(smtp_sink, 1) == ["overtaken"]
    wait_until(lambda: re.search(f"{to}.*status=sent", postfix.log_text()),
               f"Postfix's status=sent line for {queue_id}")
    assert len(re.findall(f"{to}.*deferred transport", postfix.log_text())) == 1  # the arrival's, none after the run
    assert queue_id not in queue_state(postfix)


@pytest.mark.parametrize("how", ["run", "schedule"])
def test_a_refused_flush_request_takes_its_mark_off_the_queue_file(tmp_path, postfix, mocker, how):
    """Marked flushed before the request, a message Postfix then was not asked to send keeps no mark: at its retry
    time it would pass the gate without qrunner. By a run's send, and by the single request that a release of
    copies and a give-up make."""
    from qrunner.cli import main
    from qrunner.config import PostfixSettings
    from qrunner.mta import postfix_flush
    from qrunner.mta.postfix import PostfixBackend

    qr = Qrunner(tmp_path, postfix, ALLOW_ALL)
    queue_id = queue_message(postfix, "x")
    [deferred] = glob.glob(os.path.join(postfix.queue_directory, "deferred", "**", queue_id), recursive=True)
    modes = []
    mocker.patch.object(postfix_flush, "_send", side_effect=_refusing_service(modes, deferred))

    if how == "run":
        assert main(["--config", str(qr.config_path), "run"]) == 1
    else:
        assert PostfixBackend(PostfixSettings(config_directory=postfix.config_directory)).schedule(queue_id) is False

    assert modes and modes[0] & stat.S_IRGRP, "the file was not marked flushed before the request"
    assert not os.stat(deferred).st_mode & stat.S_IRGRP
    assert queue_state(postfix)[queue_id][0] == "deferred"
