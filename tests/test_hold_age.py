"""Hold age (issue 11, point 8): past ``max_hold_age`` the policy is no longer asked.

Such a message is sent by the MTA's own routing (``action=expire``, a
warning, a counter), or with ``on_hold_expiry = "bounce"`` returned to its
sender; an admin's hold never expires; ``status`` and ``status --check`` mark
holds nearing either limit. Over the memory back end (its queue file is the
expectation; arrival times can be set there) for every path of the plan,
and against the real Postfix and Exim, whose own tools (the sink,
``postqueue -j``, Postfix's log, ``exim -bp``, Exim's mainlog and mailbox)
say what became of the message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING, EximHarness, PostfixHarness, harness_for
from qrunner_e2e import ALLOW_ALL, Qrunner, make_message

from qrunner.config import PostfixSettings
from qrunner.mta import postfix as postfix_mod

# Holds everything, and says so on stderr each time it is asked: the test sees whether the policy was asked.
ASKED = ('function CheckFile(f, a, s, c, rp, r, h)\n'
         '  print("asked about " .. (h.subject or "?"))\n'
         '  a.SkipSend = 1; a.Reason = "not now"\n'
         '  return a\nend\n')


def configure(qr: Qrunner, **settings) -> None:
    """Top-level settings put first in qrunner.toml (before any table), each replacing an earlier line of its own."""
    lines = [line for line in qr.config_path.read_text().splitlines(keepends=True)
             if line.split(" = ")[0] not in settings]
    head = "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())
    qr.config_path.write_text(head + "".join(lines))


@pytest.fixture
def memory(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def submit_aged(mta: MemoryHarness, subject: str, age: float, sender: str = "alice@qrunner-test.localdomain") -> str:
    """A message that arrived ``age`` seconds ago, as the memory MTA's own tool queues it."""
    return mta.queue.submit(sender, ["bob@example.net"], make_message(subject, sender=sender),
                            arrival=time.time() - age)


def queue_file(mta: MemoryHarness) -> dict:
    return mta.sink._queue()


def counter(metrics_file, name: str) -> float:
    with open(metrics_file) as f:
        return sum(s.value for family in text_string_to_metric_families(f.read()) for s in family.samples
                   if s.name == name)


# -- the memory back end: every path of the plan ---------------------------------------------


def test_a_hold_past_max_hold_age_is_released_and_sent_without_asking_the_policy(tmp_path, memory):
    metrics_file = tmp_path / "qrunner.prom"
    qr = Qrunner(tmp_path, memory, ASKED, extra_config=f'metrics_file = "{metrics_file}"')
    configure(qr, max_hold_age=2000)
    queue_id = submit_aged(memory, "old news", 1800)

    first = qr("run")
    assert first.code == 0, first.stderr
    assert "asked about old news" in first.stderr and memory.where(queue_id) == HELD
    assert re.search(rf"^{queue_id} .*\[near max_hold_age: the policy is no longer asked from "
                     rf"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(memory.arrival(queue_id) + 2000))}\]$",
                     qr("status").stdout, re.M)
    assert qr("status", "--check").stdout == "QRUNNER WARNING: 1 holds near max_hold_age\n"

    configure(qr, max_hold_age=1200)
    second = qr("run")

    assert second.code == 0, second.stderr
    assert "asked about" not in second.stderr  # past max_hold_age the policy is not asked
    assert f"{queue_id}: action=release" in second.stderr
    assert (f'{queue_id}: action=expire to=default-route priority=50 reason="past max_hold_age (20 min since '
            'arrival): sent by the MTA\'s own routing without asking the policy"') in second.stderr
    assert "run: listed=0 sent=0 held=0 released=1 errors=0 expired=1 seconds=" in second.stderr
    assert [(d["id"], d["route"]) for d in queue_file(memory)["delivered"]] == [(queue_id, "default")]
    assert queue_id not in qr("status").stdout
    assert counter(metrics_file, "qrunner_expired_total") == 1
    assert counter(metrics_file, "qrunner_sent_total") == 0  # sent by expiry, not by a sender's decision


def test_a_waiting_message_past_max_hold_age_is_sent_at_once_and_the_rest_still_decided(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=600)
    old = submit_aged(memory, "old", 3600)
    young = memory.queue_message("young")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert "asked about young" in result.stderr and "asked about old" not in result.stderr
    assert f"{old}: action=expire to=default-route priority=50" in result.stderr
    assert f"{old}: action=release" not in result.stderr  # it was never held
    assert memory.where(young) == HELD
    assert [d["id"] for d in queue_file(memory)["delivered"]] == [old]


def test_dry_run_and_plan_show_the_expire_step_and_change_nothing(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=600)
    old = submit_aged(memory, "old", 3600)
    before = queue_file(memory)

    dry = qr("run", "--dry-run")
    plan = qr("plan", "--format", "json")

    assert dry.code == 0 and plan.code == 0, dry.stderr + plan.stderr
    assert re.search(rf"^{old}\s+expire\s+-\s+-\s+past max_hold_age \(10 min since arrival\): sent by the MTA's "
                     r"own routing without asking the policy$", dry.stdout, re.M), dry.stdout
    assert json.loads(plan.stdout)["recovery"] == [
        {"queue_id": old, "action": "expire",
         "reason": "past max_hold_age (10 min since arrival): sent by the MTA's own routing without asking the policy"}]
    assert "action=" not in dry.stderr + plan.stderr
    assert queue_file(memory) == before
    assert not os.path.exists(os.path.join(qr.state_dir, "qrunner.sqlite"))


def test_an_admins_hold_never_expires(tmp_path, memory):
    """The MTA's hold that qrunner has no record of is the admin's: qrunner leaves it alone, past any age."""
    qr = Qrunner(tmp_path, memory, ALLOW_ALL)
    configure(qr, max_hold_age=1)
    admins = submit_aged(memory, "admin holds this", 3600)
    memory.admin_hold(admins)

    run = qr("run")
    flush = qr("flush", "--all")
    named = qr("flush", admins)

    assert run.code == 0 and flush.code == 0, run.stderr + flush.stderr
    assert "action=expire" not in run.stderr + flush.stderr + named.stderr
    assert named.code == 1 and f"{admins}: on hold by someone else, not by qrunner; left alone" in named.stderr
    assert memory.where(admins) == HELD
    assert queue_file(memory)["delivered"] == []


def test_expired_mail_still_waits_for_the_mtas_retry_time(tmp_path, memory):
    """Expiry overrides the policy, not the relay's backoff: a deferred message is not sent before its retry time."""
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=600)
    old = submit_aged(memory, "deferred by the relay", 3600)
    with memory.queue.change() as queue:
        queue["messages"][0].update(retry_at=time.time() + 3600, delay_reason="relay down")

    plan = qr("plan")
    result = qr("run")

    assert re.search(rf"^{old}\s+expire .*without asking the policy; waits for the MTA's retry time "
                     r"\d\d:\d\d:\d\d$", plan.stdout, re.M), plan.stdout
    assert result.code == 0, result.stderr
    assert re.search(rf'{old}: action=wait sender=- priority=50 next_retry=\S+ reason="the MTA\'s retry time"',
                     result.stderr)
    assert "asked about" not in result.stderr and "action=expire" not in result.stderr
    assert memory.where(old) == WAITING and queue_file(memory)["delivered"] == []


def test_a_flush_of_a_named_message_past_max_hold_age_expires_it_and_ignore_policy_overrides(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=600)
    first = submit_aged(memory, "first", 3600)
    second = submit_aged(memory, "second", 3600)

    named = qr("flush", first)
    forced = qr("flush", second, "--ignore-policy")

    assert named.code == 0 and forced.code == 0, named.stderr + forced.stderr
    assert f"{first}: action=expire to=default-route" in named.stderr and second not in named.stderr
    assert f"{second}: action=send sender=default priority=50 policy=overridden" in forced.stderr
    assert [d["id"] for d in queue_file(memory)["delivered"]] == [first, second]


def test_on_hold_expiry_bounce_returns_the_message_to_its_sender(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    held = submit_aged(memory, "held, then too old", 1800, sender="carol@example.org")
    assert qr("run").code == 0 and memory.where(held) == HELD
    bounce = submit_aged(memory, "a bounce", 1800, sender="")
    configure(qr, max_hold_age=600, on_hold_expiry="bounce")
    assert "[past max_hold_age: the next run returns it to its sender]" in qr("status").stdout

    result = qr("run")

    assert result.code == 0, result.stderr
    assert (f'{held}: action=expire to=return-path reason="past max_hold_age (10 min since arrival): returned to '
            'its sender"') in result.stderr
    assert (f'{bounce}: action=expire to=default-route priority=50 reason="past max_hold_age (10 min since arrival): '
            'a bounce has no sender to return it to, so it goes by the MTA\'s own routing"') in result.stderr
    queue = queue_file(memory)
    assert held not in [m["id"] for m in queue["messages"]]
    [returned] = [m for m in queue["messages"] if m["sender"] == ""]
    assert returned["recipients"] == ["carol@example.org"]  # the MTA's bounce, queued for the original's sender
    assert [d["id"] for d in queue["delivered"]] == [bounce]  # a bounce is never returned: it is sent
    assert held not in qr("status").stdout


def test_a_run_killed_while_returning_mail_is_settled_by_the_next(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    held = submit_aged(memory, "held", 1800)
    assert qr("run").code == 0
    configure(qr, max_hold_age=600, on_hold_expiry="bounce")

    killed = qr.run_killed_at("qrunner.mta.memory:MemoryBackend.give_up")

    assert killed.code < 0 and memory.where(held) == HELD
    assert "[releasing, settled by the next run]" in qr("status").stdout
    again = qr("run")
    assert again.code == 0, again.stderr
    assert f"{held}: record of an interrupted releasing settled: message is on hold" in again.stderr
    assert f"{held}: action=expire to=return-path" in again.stderr
    assert memory.where(held) is None


def test_bounce_where_the_mta_cannot_return_mail_is_a_configuration_error(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=600, on_hold_expiry="bounce")
    memory.set(returns_to_sender=False)  # like Postfix before 3.5
    submit_aged(memory, "old", 3600)
    before = queue_file(memory)

    for command in (("run",), ("plan",), ("flush", "--all")):
        result = qr(*command)
        assert result.code == 78, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert ('on_hold_expiry = "bounce" returns mail past max_hold_age to its sender, but this memory queue is '
                'set to have no way to return a message to its sender') in result.stderr
        assert 'set on_hold_expiry = "send"' in result.stderr
    assert queue_file(memory) == before


@pytest.mark.parametrize("setting, problem", [
    ("max_hold_age = -1", "setting 'max_hold_age' must be 0 (off: no limit) or more (it is -1)"),
    ('max_hold_age = "3d"', "setting 'max_hold_age' must be a number of seconds since arrival (0: off), not '3d'"),
    ('on_hold_expiry = "later"', 'setting \'on_hold_expiry\' must be one of "send", "bounce"'),
])
def test_bad_hold_age_settings_are_one_sentence_and_exit_78(tmp_path, memory, setting, problem):
    qr = Qrunner(tmp_path, memory, ASKED)
    qr.config_path.write_text(setting + "\n" + qr.config_path.read_text())

    result = qr("run")

    assert result.code == 78 and problem in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_status_marks_holds_near_the_mtas_queue_lifetime_and_check_warns_for_both(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ASKED)
    configure(qr, max_hold_age=4000)
    memory.set(queue_lifetime=4000)
    queue_id = submit_aged(memory, "getting old", 3600)
    assert qr("run").code == 0

    status = qr("status").stdout
    check = qr("status", "--check")

    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(memory.arrival(queue_id) + 4000))
    assert re.search(rf"^{queue_id} .*not now \[near max_hold_age: the policy is no longer asked from {until}\] "
                     rf"\[near the MTA's queue lifetime: bounces if released after {until}\]$", status, re.M), status
    assert (check.code, check.stdout) == (1, "QRUNNER WARNING: 1 holds near the MTA's queue lifetime; "
                                             "1 holds near max_hold_age\n")


# -- the real MTAs -----------------------------------------------------------------------


# What the expire line says after the priority: Postfix schedules (the default), Exim's -Mc reports the delivery.
EXPIRE_RESULT = {"postfix": "", "exim": " result=delivered"}


@pytest.mark.parametrize("which", ["postfix", "exim"])
def test_a_hold_past_max_hold_age_is_sent_by_the_default_route(tmp_path, request, which):
    mta = harness_for(request, tmp_path, which)
    qr = Qrunner(tmp_path, mta, ASKED)
    queue_id = mta.queue_message("held, then too old")
    assert qr("run").code == 0 and mta.where(queue_id) == HELD
    time.sleep(2)
    configure(qr, max_hold_age=1)

    result = qr("run")

    assert result.code == 0, result.stderr
    assert "asked about" not in result.stderr
    assert f"{queue_id}: action=release" in result.stderr
    assert f"{queue_id}: action=expire to=default-route priority=50{EXPIRE_RESULT[which]} reason=" in result.stderr
    [delivered] = mta.sink.wait_for(1)
    assert delivered.header("Subject") == b"held, then too old"
    mta.wait_gone(queue_id)  # postqueue -j / exim -bp no longer list it


def deferred_except(postfix, queue_id: str, timeout: float = 20.0) -> list:
    """The messages of Postfix's deferred queue other than ``queue_id``, once there is one (postqueue -j)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in postfix.queue() if m["queue_id"] != queue_id and m["queue_name"] == "deferred"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_postfix_returns_a_hold_past_max_hold_age_to_its_sender(tmp_path, postfix, smtp_sink):
    """Forced expiration (postsuper -f, Postfix 3.5+): Postfix's bounce goes to the sender, through the gate."""
    mta = PostfixHarness(postfix, smtp_sink)
    qr = Qrunner(tmp_path, mta, ASKED)
    queue_id = mta.queue_message("held, then returned", sender="carol@example.org")
    assert qr("run").code == 0 and mta.where(queue_id) == HELD
    time.sleep(2)
    configure(qr, max_hold_age=1, on_hold_expiry="bounce")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=expire to=return-path" in result.stderr
    mta.wait_gone(queue_id)
    assert f"{queue_id}: from=<carol@example.org>, status=force-expired, returned to sender" in postfix.log_text()
    [bounce] = deferred_except(postfix, queue_id)  # postqueue -j: Postfix's own bounce, deferred by the gate
    assert bounce["sender"] == "MAILER-DAEMON" and [r["address"] for r in bounce["recipients"]] == ["carol@example.org"]
    qr.set_script(ALLOW_ALL)
    assert qr("run").code == 0  # the bounce waits behind the gate like any relay mail: the next run sends it
    [returned] = smtp_sink.wait_for(1)
    assert (returned.mail_from, returned.rcpt_tos) == ("<>", ["carol@example.org"])
    assert b"held, then returned" in returned.data


@pytest.mark.parametrize("version, can", [("3.4.14", False), ("3.5.0", True), ("3.7.11", True), ("", False)])
def test_postfix_can_return_mail_to_its_sender_from_3_5_on(mocker, version, can):
    """``postconf -h mail_version`` decides: forced expiration (postsuper -f) came with Postfix 3.5.

    postconf is mocked: there is no older Postfix to run here (the real one is tested above).
    """
    names = "\n".join(["/var/spool/postfix", "/usr/sbin", "deferred, defer", "1", "smtp", "5d", "MAILER-DAEMON"])
    mocker.patch.object(postfix_mod, "find_postconf", return_value="/usr/sbin/postconf")
    mocker.patch.object(postfix_mod.subprocess, "run", side_effect=[
        subprocess.CompletedProcess([], 0, names + "\n", ""), subprocess.CompletedProcess([], 0, version + "\n", "")])
    backend = postfix_mod.PostfixBackend(PostfixSettings())

    if can:
        assert backend.cannot_return is None
    else:
        assert backend.cannot_return == (f"Postfix {version or '(version unknown)'} has no command for it (forced "
                                         "expiration, postsuper -f, came with Postfix 3.5)")


def test_exim_returns_a_freeze_past_max_hold_age_to_its_sender(tmp_path, exim, exim_sink):
    """exim -Mg: Exim gives up on the frozen message and queues its bounce, which the next run delivers."""
    mta = EximHarness(exim, exim_sink)
    qr = Qrunner(tmp_path, mta, ASKED)
    queue_id = mta.queue_message("frozen, then returned")
    assert qr("run").code == 0 and mta.where(queue_id) == HELD
    time.sleep(2)
    configure(qr, max_hold_age=1, on_hold_expiry="bounce")

    result = qr("run")

    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=expire to=return-path" in result.stderr
    assert f"{queue_id} cancelled by root" in exim.log_text()
    [bounce] = re.findall(rf"^\S+ \S+ (\S+) <= <> R={queue_id} .* Q=qrunner for alice@qrunner-test.localdomain$",
                          exim.log_text(), re.M)
    assert [(m["id"], m["sender"], m["recipients"]) for m in exim.queue()] == \
        [(bounce, "", ["alice@qrunner-test.localdomain"])]  # exim -bp: only the bounce is left, in the named queue
    qr.set_script(ALLOW_ALL)
    assert qr("run").code == 0
    assert bounce not in exim.queue_ids()
    mailbox = exim.mailbox_text()
    assert "Return-path: <>" in mailbox and "frozen, then returned" in mailbox
    assert exim_sink.messages == []  # nothing was delivered to the relay
