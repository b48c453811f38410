"""``qrunner explain QUEUE_ID``: one message's CheckFile arguments, each sender's answer, the plan's action and
qrunner's history of it (issue 11, point 3).

The facts about the message come from the MTA's own tools (``postqueue -j``,
exipick, the queue files found on disk; the memory queue's file), the new id
of a routed copy from Postfix's log (``orig_queue_id=``) or the memory
relay's record, and the action from ``plan --format json`` of the same queue.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sqlite3
import time

import pytest

from memory_harness import MemoryHarness
from mta_harness import HELD, WAITING
from qrunner_e2e import Qrunner

ME = re.escape(getpass.getuser())  # who ran each command, as explain's history says it
from test_dry_run import syslog  # noqa: F401  (fixture: a stand-in for /dev/log)
from test_senders import listener_ports, relays, sinks  # noqa: F401  (fixtures: the senders' routes)
from two_senders import SENDER, submit, two_senders

from qrunner.cli import main

# Counts its calls: a message's answer depends on the messages offered before it in the same pass.
POLICY = """
calls = 0
function CheckFile(f, a, size, created, from, rcpts, h)
  calls = calls + 1
  local subject = h.subject or ""
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  if subject:find("boom") then error("boom in the script") end
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "held at call " .. calls; return a end
  if sendername == "isp" and h["X-Route"] ~= "isp" then a.SkipSend = 1; a.Reason = "not for isp (call " .. calls .. ")" end
  return a
end
"""


@pytest.fixture(params=["memory", "postfix", "exim"])
def routed(request, tmp_path):
    return two_senders(request, tmp_path, POLICY)


def explain(qr, queue_id, *args):
    result = qr("explain", queue_id, "--format", "json", *args)
    return result, (json.loads(result.stdout) if result.stdout else None)


def planned(qr, queue_id):
    """The live plan's decision for one message, as ``plan --format json`` gives it."""
    result = qr("plan", "--format", "json")
    assert result.code == 0, result.stderr
    [row] = [d for d in json.loads(result.stdout)["decisions"] if d["queue_id"] == queue_id]
    return row


def routed_copy_id(mta, original):
    """The id the sender's route gave the message: Postfix's log and the memory relay say; Exim keeps the id."""
    if mta.name == "postfix":
        found = re.search(r"(\w+): client=\S+, orig_queue_id=%s\b" % original, mta.instance.log_text())
        return found.group(1) if found else None
    if mta.name == "memory":
        [delivered] = [m for m in mta.sink.wait_for(1) if m.route == "isp"]
        return delivered.queue_id
    return None


def test_explain_shows_the_arguments_the_answers_the_plan_and_the_history(routed):
    mta, qr = routed
    held = submit(mta, "please hold", headers=[("X-Ticket", "42")])
    for_isp = submit(mta, "p80 urgent", headers=[("X-Route", "isp")])
    plain = submit(mta, "p20 plain", to=("bob@example.net", "carol@example.net"))
    before = mta.snapshot()

    result, report = explain(qr, plain)

    assert result.code == 0, result.stderr
    assert report["checkfile"] == {
        "Filename": mta.filename(plain), "Size": mta.size(plain),
        "CreationTime": time.strftime("%Y%m%d%H%M%S", time.localtime(mta.arrival(plain))),
        "ReturnPath": SENDER, "Recipients": ["bob@example.net", "carol@example.net"],
        "HeaderLines": report["checkfile"]["HeaderLines"]}
    assert "Subject: p20 plain" in report["checkfile"]["HeaderLines"]
    # The third call of the pass: explain decided the whole queue, oldest first, as a run does.
    assert [(s["sender_name"], s["asked"], s["action"], s["priority"], s["reason"]) for s in report["senders"]] == [
        ("isp", True, "skip", 20, "not for isp (call 3)"), ("backup", True, "send", 20, "")]
    [step] = report["steps"]
    assert (step["action"], step["priority"], step["sender"], step["position"], step["of"]) == ("send", 20, "backup",
                                                                                               2, 2)
    decision = planned(qr, plain)
    assert (decision["action"], decision["priority"], decision["sender_name"]) == ("send", 20, "backup")
    assert report["hold"] is None and report["history"] == []

    result, report = explain(qr, held)
    assert [s["reason"] for s in report["senders"]] == ["held at call 1", "held at call 1"]
    assert [(s["action"], s["reason"]) for s in report["steps"]] == [
        ("hold", "isp: held at call 1; backup: held at call 1")]
    assert "X-Ticket: 42" in report["checkfile"]["HeaderLines"]
    text = qr("explain", held)
    assert text.code == 0 and "  hold: isp: held at call 1; backup: held at call 1" in text.stdout
    assert "    X-Ticket: 42" in text.stdout and "history: none recorded" in text.stdout
    assert mta.snapshot() == before  # explain changed nothing
    assert "action=" not in result.stderr + text.stderr

    run = qr("run")

    assert run.code == 0, run.stderr
    assert mta.where(held) == HELD
    result, report = explain(qr, held)
    assert result.code == 0, result.stderr
    assert report["state"] == "held" and report["hold"]["reason"] == "isp: held at call 1; backup: held at call 1"
    assert [s["action"] for s in report["steps"]] == ["keep"]
    [entry] = report["history"]
    assert (entry["action"], entry["command"], entry["sender"]) == ("hold", "run", "isp,backup")
    assert entry["reason"] == "isp: held at call 1; backup: held at call 1"
    run_id = entry["run_id"]

    mta.wait_gone(for_isp)
    result, report = explain(qr, for_isp)
    assert result.code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"qrunner: {for_isp}: not in the queue (delivered, deleted, or never there); what qrunner recorded of it "
        "is above.")
    [entry] = report["history"]
    assert (entry["run_id"], entry["command"], entry["sender"], entry["priority"]) == (run_id, "run", "isp", 80)
    assert entry["new_queue_id"] == routed_copy_id(mta, for_isp)
    assert entry["action"] == ("send" if mta.name == "exim" else "route")

    released = qr("release", held)

    assert released.code == 0, released.stderr
    assert mta.where(held) == WAITING
    result, report = explain(qr, held)
    assert report["hold"] is None
    assert [(e["action"], e["command"]) for e in report["history"]] == [("hold", "run"), ("release", "release")]
    assert report["history"][1]["run_id"] > run_id and report["history"][1]["reason"] == "released by the admin"
    text = qr("explain", held).stdout
    assert re.search(rf"run {run_id} \(run, by {ME}\) +hold +sender=isp,backup priority=50 reason=", text), text
    assert re.search(rf"run \d+ \(release, by {ME}\) +release +reason=\"released by the admin\"", text), text
    assert {e["invoked_by"] for e in report["history"]} == {getpass.getuser()}  # who ran each command


@pytest.fixture
def memory(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, POLICY)
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    return mta, qr


def test_an_id_never_in_the_queue_is_one_sentence_and_exit_1(memory):
    mta, qr = memory
    mta.queue_message("p20 plain")

    text = qr("explain", "M00000077")
    result, report = explain(qr, "M00000077")

    assert text.code == 1 and text.stdout == ""
    assert text.stderr == ("qrunner: M00000077: not in the queue (delivered, deleted, or never there); qrunner has "
                           "no record of it either.\n")
    assert result.code == 1 and report == {"queue_id": "M00000077", "in_queue": False, "history": []}
    bad = qr("explain", "../etc/passwd")
    assert bad.code == 64 and bad.stderr == "qrunner: '../etc/passwd' is not a memory queue id like M00000001.\n"


def test_explain_changes_nothing_and_logs_nothing(tmp_path, memory, syslog, capsys):  # noqa: F811
    mta, qr = memory
    queue_id = mta.queue_message("please hold")
    before = mta.snapshot()

    code = main(["--config", str(qr.config_path), "explain", queue_id])

    out = capsys.readouterr().out
    assert code == 0 and f"{queue_id}: in the queue (waiting), arrived" in out
    assert "  hold: isp: held at call 1; backup: held at call 1" in out
    assert syslog() == []
    assert mta.snapshot() == before
    assert not os.path.exists(os.path.join(qr.state_dir, "qrunner.sqlite"))


def test_a_message_the_policy_is_not_asked_about_says_why(memory):
    mta, qr = memory
    theirs = mta.queue_message("p20 plain")
    mta.admin_hold(theirs)

    text = qr("explain", theirs)
    result, report = explain(qr, theirs)

    assert text.code == 0 and result.code == 0
    assert "CheckFile's arguments (the policy is not asked about it):" in text.stdout
    assert "senders (in the order they run)" not in text.stdout
    assert "  left alone: on hold by someone else, not by qrunner; left alone" in text.stdout
    assert report["decision"] is None and [s["asked"] for s in report["senders"]] == [False, False]
    assert report["steps"] == [{"action": "left alone", "reason": "on hold by someone else, not by qrunner; left alone",
                                "priority": None, "sender": None, "position": None, "of": None, "until": None}]


def test_a_routed_copy_names_its_original_and_the_original_its_copy(memory):
    mta, qr = memory
    mta.set(routes_down=["isp"])  # the copy comes back deferred on its route and stays queued
    original = submit(mta, "p70 for isp", headers=[("X-Route", "isp")])
    assert qr("run").code == 0
    [copy] = [queue_id for queue_id in mta.snapshot() if queue_id != original]

    text = qr("explain", copy)
    result, report = explain(qr, copy)
    gone = qr("explain", original)

    assert text.code == 0, text.stderr
    assert "  left alone: a copy qrunner handed to sender isp; the MTA delivers it on that route" in text.stdout
    [entry] = report["history"]
    assert (entry["queue_id"], entry["action"], entry["new_queue_id"]) == (original, "route", copy)
    assert re.search(rf"run 1 \(run, by {ME}\) +route +{original} \(arrived [^)]*\) sender=isp priority=70 "
                     rf"new_queue_id={copy}", text.stdout), text.stdout
    assert gone.code == 1
    assert re.search(rf"route +{original} \(arrived [^)]*\) sender=isp priority=70 new_queue_id={copy}",
                     gone.stdout), gone.stdout


def test_policy_errors_waits_and_a_flush_are_explained(memory):
    mta, qr = memory
    broken = mta.queue_message("boom")
    deferred = mta.queue_message("p60 plain")
    held = mta.queue_message("please hold")
    mta.set(relay="down")
    assert qr("run").code == 1  # the policy error
    assert mta.where(deferred) == WAITING  # the relay sent it back; the memory MTA's retry time is set

    result, report = explain(qr, broken)
    assert result.code == 0  # the report is the output: the error is in it
    assert report["senders"][0]["error"].endswith("boom in the script")
    text = qr("explain", broken).stdout
    assert re.search(r"0:isp +policy error: .*boom in the script \(so: skip, priority 50\)", text), text

    result, report = explain(qr, deferred)
    [wait] = report["steps"]
    assert (wait["action"], wait["reason"], wait["sender"]) == ("wait", "the MTA's retry time", "backup")
    assert "  wait until " in qr("explain", deferred).stdout
    assert [(e["action"], e["sender"], e["priority"]) for e in report["history"]] == [("send", "backup", 60)]

    mta.set(relay="up")
    assert qr("flush", "--ignore-policy", held).code == 0
    result, report = explain(qr, held)
    assert result.code == 1
    assert [(e["action"], e["command"]) for e in report["history"]] == [
        ("hold", "run"), ("release", "flush"), ("send", "flush")]
    assert report["history"][2]["reason"] == "policy overridden by the admin"


def test_a_holds_history_outlives_history_days_while_it_is_held(memory):
    mta, qr = memory
    qr.config_path.write_text(qr.config_path.read_text().replace("script_timeout = 2", "script_timeout = 2\n"
                                                                 "history_days = 7"))
    held = mta.queue_message("please hold")
    sent = mta.queue_message("p30 plain")
    assert qr("run").code == 0
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        old = time.time() - 8 * 86400
        db.execute("UPDATE runs SET started = ?, finished = ?", (old, old))
        db.execute("UPDATE history SET at = ?", (old,))

    assert qr("run").code == 0  # prunes

    result, report = explain(qr, held)
    assert [(e["action"], e["run_id"], e["command"]) for e in report["history"]] == [("hold", 1, "run")]
    result, report = explain(qr, sent)
    assert result.code == 1 and report["history"] == []
