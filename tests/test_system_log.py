"""The audit trail survives cron: run, flush and release always write to the system log, facility mail.

Each test starts a real logger in a private mount and pid namespace
(tests/log_daemons.py: Debian's rsyslogd, systemd-journald, or both) and
runs the real ``qrunner`` inside it, as cron runs it: stderr a pipe, ``-q``.
What the tests expect comes from the loggers themselves: rsyslog's files
(written with its own facility and severity names) and ``journalctl``.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from exim_instance import PREFIX as EXIM_PREFIX
from log_daemons import LogNamespace, log_daemon_missing_reason, system_log_env, wait_until
from memory_harness import MemoryHarness
from mta_available import skip_or_fail
from mta_harness import EximHarness, PostfixHarness, harness_for
from qrunner_e2e import Qrunner, make_message

POLICY = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  if subject:find("urgent") then a.Priority = 500 end
  if subject:find("boom") then error("boom in the policy") end
  if subject:find("long") then a.SkipSend = 1; a.Reason = "long " .. string.rep("x", 400000) end
  return a
end
"""
CLAMPED = "sender default: Priority 500 is outside 1..100, clamped to 100"

# How systemd connects a unit's stderr to the journal (StandardError=journal, SyslogIdentifier=qrunner,
# SyslogFacility=mail): a stream to journald with this header, and JOURNAL_STREAM naming it.
UNIT_STDERR = """
import os, socket, sys
stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
stream.connect("/run/systemd/journal/stdout")
# identifier, unit, priority (mail.info = 2 * 8 + 6), level prefix, then no forwarding to syslog, kmsg, console
stream.sendall(b"qrunner\\nqrunner.service\\n22\\n1\\n0\\n0\\n0\\n")
os.dup2(stream.fileno(), 1)
os.dup2(stream.fileno(), 2)
stat = os.fstat(stream.fileno())
os.environ["JOURNAL_STREAM"] = "%d:%d" % (stat.st_dev, stat.st_ino)
os.execv(sys.executable, [sys.executable, "-m", "qrunner"] + sys.argv[1:])
"""


@pytest.fixture
def log_namespace(tmp_path):
    """``log_namespace(kind)``: a started LogNamespace; a logger that does not start fails the test."""
    started = []

    def start(kind: str) -> LogNamespace:
        skip_or_fail(log_daemon_missing_reason(kind))
        namespace = LogNamespace(kind, str(tmp_path / f"log-{kind.replace('+', '-')}"))
        try:
            namespace.start()
        except RuntimeError as error:
            pytest.fail(str(error), pytrace=False)
        started.append(namespace)
        return namespace

    yield start
    for namespace in started:
        namespace.stop()


@pytest.fixture(params=["memory", "postfix", "exim"])
def cron_mta(request, tmp_path):
    """The MTA a cron run works on: the memory back end and both private MTAs, each gated.

    Named apart from test_run.py's ``mta``, so that conftest.py does not count these among the
    coverage gate's memory cases: they need root and the loggers, and must fail, not skip, without them.
    """
    return harness_for(request, tmp_path)


@pytest.fixture
def memory(tmp_path):
    """The memory back end, and qrunner configured with POLICY over it."""
    mta = MemoryHarness(str(tmp_path / "queue"))
    return mta, Qrunner(tmp_path, mta, POLICY)


def qrunner_entries(namespace: LogNamespace, *match: str) -> list:
    return namespace.journal("SYSLOG_IDENTIFIER=qrunner", *match)


def test_a_quiet_cron_run_writes_every_action_and_warning_to_rsyslogs_mail_log(tmp_path, log_namespace, cron_mta):
    rsyslog = log_namespace("rsyslog")
    qr = Qrunner(tmp_path, cron_mta, POLICY)
    held = cron_mta.queue_message("please hold")
    sent = cron_mta.queue_message("urgent")

    # Over a real MTA qrunner joins only the namespace's mounts: the MTA's daemons run outside.
    run = rsyslog.qrunner(qr, "-q", "run", pid_namespace=False)

    assert (run.code, run.stderr) == (0, "")  # cron mails nothing to root
    cron_mta.wait_gone(sent)
    tag = f"qrunner[{run.pid}]:"
    lines = [f'{tag} {held}: action=hold sender=default priority=50 reason="subject says hold"',
             f"{tag} {sent}: action=send sender=default priority=100",
             f"{tag} run: listed=2 sent=1 held=1 released=0 errors=0 seconds="]
    rsyslog.wait_until(lambda: lines[-1] in rsyslog.file("mail.log"), "the run's summary in mail.log")
    mail_log = rsyslog.file("mail.log")
    for line in lines:
        assert sum(line in row for row in mail_log.splitlines()) == 1, (line, mail_log)
    assert f"{sent}: {CLAMPED}" in mail_log
    # Facility and severity as rsyslog itself parsed them: every line of the run at mail.
    rows = [row.split(" ", 1) for row in rsyslog.file("all.log").splitlines() if row.split()[1] == tag]
    assert {where for where, _ in rows} <= {"mail.info", "mail.warning", "mail.err"}, rows
    assert [where for where, text in rows if text.startswith((lines[0], lines[1]))] == ["mail.info", "mail.info"]
    assert [where for where, text in rows if text == f"{tag} {sent}: {CLAMPED}"] == ["mail.warning"]
    # `grep QUEUEID /var/log/mail.log` (README) follows one message through qrunner's lines.
    grep = subprocess.run(["grep", held, rsyslog.directory + "/mail.log"], capture_output=True, text=True)
    assert grep.stdout.count(f"{held}: action=hold") == 1

    if isinstance(cron_mta, PostfixHarness):
        # Postfix's side of the same message, in its own log (here its maillog_file, as postlogd writes it).
        wait_until(lambda: re.search(rf"postfix[^:]*/smtp\[\d+\]: {sent}: to=<bob@example.net>.* status=sent",
                                     cron_mta.instance.log_text()), f"Postfix's status=sent line for {sent}")
    if isinstance(cron_mta, EximHarness):
        # With Exim, qrunner's lines are in the system log, never in Exim's mainlog; exigrep follows Exim's side.
        mainlog = cron_mta.instance.log_text()
        assert "action=" not in mainlog and "qrunner[" not in mainlog
        exigrep = subprocess.run([f"{EXIM_PREFIX}/usr/sbin/exigrep", sent, cron_mta.instance.mainlog],
                                 capture_output=True, text=True)
        assert f"{sent} => bob@example.net" in exigrep.stdout and f"{sent} Completed" in exigrep.stdout
        assert held not in exigrep.stdout


def test_journald_stores_each_line_once_with_facility_mail_and_its_priority(log_namespace, memory):
    journald = log_namespace("journald")
    mta, qr = memory
    held = mta.queue_message("please hold")
    sent = mta.queue_message("urgent")
    failed = mta.queue_message("boom")

    quiet = journald.qrunner(qr, "-q", "run")
    verbose = journald.qrunner(qr, "-v", "run")
    flush = journald.qrunner(qr, "-q", "flush", "--ignore-policy", held)
    mta.set(gated=False)
    ungated = journald.qrunner(qr, "-q", "run")

    assert (quiet.code, verbose.code, flush.code, ungated.code) == (1, 1, 0, 1), quiet.stderr + flush.stderr
    # -q leaves on stderr (what cron mails to root) the errors, and the one warning it never quiets: no gate.
    [error] = quiet.stderr.splitlines()
    assert f"{failed}: sender default: policy error" in error and "boom in the policy" in error
    assert flush.stderr == ""
    assert "memory queue is not gated" in ungated.stderr.splitlines()[0]
    journald.wait_until(lambda: any("not gated" in e["MESSAGE"] for e in qrunner_entries(journald)),
                        "the gate warning")
    entries = qrunner_entries(journald)
    assert {(e["SYSLOG_FACILITY"], e["_TRANSPORT"]) for e in entries} == {("2", "journal")}
    assert all(e["SYSLOG_PID"] == e["_PID"] for e in entries)
    priority = {e["MESSAGE"]: e["PRIORITY"] for e in entries}
    assert priority[f'{held}: action=hold sender=default priority=50 reason="subject says hold"'] == "6"
    assert priority[f"{sent}: action=send sender=default priority=100"] == "6"
    assert priority[f"{sent}: {CLAMPED}"] == "4"
    assert [p for m, p in priority.items() if "memory queue is not gated" in m] == ["4"]
    assert [p for m, p in priority.items() if m.startswith(f"{failed}: sender default: policy error")] == ["3"]
    assert priority[f"flush --ignore-policy: the policy is overridden by the admin for {held}"] == "4"
    assert priority[f"{held}: action=release"] == "6"
    # Debug lines reach the system log with -v only (the -v run keeps the hold: action=keep).
    debug = [e for e in entries if e["PRIORITY"] == "7"]
    assert f"{held}: action=keep" in " ".join(e["MESSAGE"] for e in debug)
    assert all(" -v run" in e["_CMDLINE"] for e in debug), [e["_CMDLINE"] for e in debug]
    # Nothing twice: one entry per line and run.
    counts = Counter((e["_PID"], e["MESSAGE"]) for e in entries)
    assert max(counts.values()) == 1, counts.most_common(3)
    # The README's journalctl lines: one message's story (by identifier or by facility), the warnings.
    followed = [e["MESSAGE"] for e in journald.journal("-t", "qrunner", "--grep", held)]
    assert [m for m in followed if m.startswith(f"{held}: action=")] == [
        f'{held}: action=hold sender=default priority=50 reason="subject says hold"',
        f'{held}: action=keep sender=default reason="subject says hold"',
        f"{held}: action=release", f"{held}: action=send sender=default priority=50 policy=overridden"]
    assert [e["MESSAGE"] for e in journald.journal("--facility=mail", "--grep", held)] == followed
    assert {e["PRIORITY"] for e in journald.journal("-t", "qrunner", "-p", "warning")} == {"3", "4"}


def test_plan_dry_run_check_and_status_write_nothing_to_the_system_log(log_namespace, memory):
    journald = log_namespace("journald")
    mta, qr = memory
    held = mta.queue_message("please hold")

    looks = [journald.qrunner(qr, *args) for args in (["plan"], ["run", "--dry-run"], ["check"], ["status"])]
    run = journald.qrunner(qr, "-q", "run")

    assert [r.code for r in looks] == [0, 0, 0, 0] and run.code == 0, [r.stderr for r in looks]
    journald.wait_until(lambda: qrunner_entries(journald), "the run's lines")
    entries = qrunner_entries(journald)
    assert {e["_CMDLINE"].split(" -m qrunner ")[1] for e in entries} == {"-q run"}  # the run's, and only the run's
    assert f'{held}: action=hold sender=default priority=50 reason="subject says hold"' in [
        e["MESSAGE"] for e in entries]


def test_under_a_systemd_unit_stderr_is_the_journal_and_no_line_is_logged_twice(tmp_path, log_namespace, memory):
    journald = log_namespace("journald")
    mta, qr = memory
    held = mta.queue_message("please hold")
    sent = mta.queue_message("go")
    unit = tmp_path / "unit_stderr.py"
    unit.write_text(UNIT_STDERR)
    env = system_log_env(qr)

    as_unit = journald.run([sys.executable, str(unit), "run"], env=env)  # ExecStart=qrunner run, no -q
    # JOURNAL_STREAM inherited by a process whose stderr went elsewhere (a pipe): stderr is not the journal.
    inherited = journald.run([sys.executable, "-m", "qrunner", "release", "--all"],
                             env=dict(env, JOURNAL_STREAM="1:2"))

    assert as_unit.code == 0 and inherited.code == 0
    assert f"{held}: action=release" in inherited.stderr
    journald.wait_until(lambda: any(e["MESSAGE"].startswith("release:") for e in qrunner_entries(journald)),
                        "the release summary")
    entries = qrunner_entries(journald)
    assert {e["_TRANSPORT"] for e in entries} == {"journal"}  # none came through the unit's stderr stream
    messages = [e["MESSAGE"] for e in entries]
    for line in (f'{held}: action=hold sender=default priority=50 reason="subject says hold"',
                 f"{sent}: action=send sender=default priority=50", f"{held}: action=release"):
        assert messages.count(line) == 1, (line, messages)


def test_journald_forwards_the_lines_to_rsyslogs_mail_log_once(log_namespace, memory):
    both = log_namespace("journald+rsyslog")
    mta, qr = memory
    held = mta.queue_message("please hold")

    run = both.qrunner(qr, "-q", "run")

    assert (run.code, run.stderr) == (0, "")
    both.wait_until(lambda: "run: listed=1" in both.file("mail.log"), "the run's summary in mail.log")
    [entry] = qrunner_entries(both, f"MESSAGE={held}: action=hold sender=default priority=50 "
                                    'reason="subject says hold"')
    line = f'qrunner[{entry["SYSLOG_PID"]}]: {held}: action=hold sender=default priority=50 reason="subject says hold"'
    assert both.file("mail.log").count(line) == 1
    assert f"mail.info {line}" in both.file("all.log")


def test_an_entry_too_big_for_one_datagram_reaches_the_journal_whole(log_namespace, memory):
    journald = log_namespace("journald")
    mta, qr = memory
    held = mta.queue_message("long reason")

    run = journald.qrunner(qr, "-q", "run")

    assert (run.code, run.stderr) == (0, "")
    journald.wait_until(lambda: qrunner_entries(journald, "--all"), "the run's lines")
    [entry] = [e for e in qrunner_entries(journald, "--all") if e["MESSAGE"].startswith(f"{held}: action=hold")]
    assert entry["MESSAGE"].endswith('x' * 400000 + '"') and entry["PRIORITY"] == "6"


def test_no_system_log_is_not_an_error_and_a_dead_one_is_said_once(log_namespace, memory):
    bare = log_namespace("none")
    mta, qr = memory
    mta.queue_message("please hold")
    mta.queue_message("go")

    nothing = bare.qrunner(qr, "-q", "run")
    # A /dev/log left behind by a syslog daemon that is gone: the socket is there, nobody reads it.
    stale = bare.run([sys.executable, "-c", "import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
                                            ".bind('/dev/log')"])
    mta.queue_message("hold this too")
    dead = bare.qrunner(qr, "-q", "run")

    assert (nothing.code, nothing.stderr) == (0, "")
    assert stale.code == 0, stale.stderr
    assert dead.code == 0
    assert dead.stderr == ("qrunner: warning: the system log /dev/log did not take qrunner's lines "
                           "(Connection refused); this run's actions are missing from the mail log.\n")



def test_a_failed_cron_run_leaves_its_sentence_in_the_mail_log_once(log_namespace, memory):
    """Exit 78 from cron: root's mail gets the sentence on stderr, and the mail log keeps the trail."""
    rsyslog = log_namespace("rsyslog")
    mta, qr = memory
    mta.queue_message("x")
    qr.set_script("function CheckFile(f, a)\n  if then\nend\n")

    run = rsyslog.qrunner(qr, "-q", "run")

    assert run.code == 78 and run.stderr.count("relayout.lua:2:") == 1, run.stderr
    rsyslog.wait_until(lambda: "relayout.lua:2:" in rsyslog.file("mail.log"), "the error in mail.log")
    assert rsyslog.file("mail.log").count("relayout.lua:2:") == 1
    plan = rsyslog.qrunner(qr, "plan")  # a command that changes nothing leaves nothing there, even failing
    assert plan.code == 78 and rsyslog.file("mail.log").count("relayout.lua:2:") == 1


def test_under_the_unit_a_failed_run_is_stored_once_as_an_error(tmp_path, log_namespace, memory):
    """stderr is the journal there: the sentence goes by the native socket, at err, not as an info line."""
    journald = log_namespace("journald")
    mta, qr = memory
    qr.set_script("function CheckFile(f, a)\n  if then\nend\n")
    unit = tmp_path / "unit_stderr.py"
    unit.write_text(UNIT_STDERR)

    as_unit = journald.run([sys.executable, str(unit), "run"], env=system_log_env(qr))

    assert as_unit.code == 78
    journald.wait_until(lambda: qrunner_entries(journald), "the error in the journal")
    [entry] = [e for e in qrunner_entries(journald) if "relayout.lua:2:" in e["MESSAGE"]]
    assert (entry["PRIORITY"], entry["_TRANSPORT"], entry["SYSLOG_FACILITY"]) == ("3", "journal", "2")


def test_a_quiet_cron_run_that_finds_the_previous_one_running_mails_root_nothing(log_namespace, memory):
    rsyslog = log_namespace("rsyslog")
    mta, qr = memory
    os.makedirs(qr.state_dir, exist_ok=True)
    with open(os.path.join(qr.state_dir, "qrunner.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the previous run, still at work
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        quiet = rsyslog.qrunner(qr, "-q", "run")
        loud = rsyslog.qrunner(qr, "run")

    assert (quiet.code, quiet.stderr) == (75, "")  # cron mails nothing
    assert loud.code == 75 and f"PID {os.getpid()}" in loud.stderr  # by hand, it is said
    rsyslog.wait_until(lambda: rsyslog.file("mail.log").count("holds the lock") == 2, "both in mail.log")
    rows = [row.split(" ", 1)[0] for row in rsyslog.file("all.log").splitlines() if "holds the lock" in row]
    assert rows == ["mail.warning", "mail.warning"]


def test_each_action_is_a_structured_journal_entry_a_message_can_be_followed_by(log_namespace, memory):
    """journalctl -t qrunner QUEUE_ID=... finds one message's history, with qrunner's own fields (issue 11, point 2)."""
    journald = log_namespace("journald")
    mta, qr = memory
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    qr.set_script('function CheckFile(f, a, s, c, rp, r, h)\n'
                  '  if h.subject == "hold" then a.SkipSend = 1; a.Reason = "subject says hold" end\n'
                  '  if senderid == 0 and h.subject ~= "isp" then a.SkipSend = 1; a.Reason = "not for isp" end\n'
                  '  a.Priority = 70\n  return a\nend\n')
    held = mta.queue_message("hold", sender="carol@example.org")
    routed = mta.queue_message("isp")
    assert journald.qrunner(qr, "-q", "run").code == 0
    qr.set_script("function CheckFile(f, a) return a end\n")
    assert journald.qrunner(qr, "-q", "release", held).code == 0

    journald.wait_until(lambda: len(qrunner_entries(journald, f"QUEUE_ID={held}")) == 2, f"{held}'s two actions")
    hold, release = qrunner_entries(journald, f"QUEUE_ID={held}")
    assert hold["MESSAGE"] == f'{held}: action=hold sender=isp,backup priority=70 reason="isp: not for isp; ' \
                              'backup: subject says hold"'
    assert (hold["ACTION"], hold["QRUNNER_PRIORITY"], hold["QRUNNER_SENDER"], hold["ENVELOPE_SENDER"]) == \
        ("hold", "70", "isp,backup", "carol@example.org")
    assert hold["REASON"] == "isp: not for isp; backup: subject says hold" and hold["ARRIVAL"] == str(mta.arrival(held))
    assert (hold["SYSLOG_IDENTIFIER"], hold["SYSLOG_FACILITY"], hold["PRIORITY"]) == ("qrunner", "2", "6")
    assert release["ACTION"] == "release" and release["RUN_ID"] != hold["RUN_ID"]  # another run: the release command
    [route] = qrunner_entries(journald, f"QUEUE_ID={routed}", "ACTION=route")
    [copy] = [m.queue_id for m in mta.sink.wait_for(1)]
    assert (route["NEW_QUEUE_ID"], route["QRUNNER_SENDER"], route["RUN_ID"]) == (copy, "isp", hold["RUN_ID"])


def test_a_message_sent_past_max_hold_age_is_a_warning_in_the_journal(log_namespace, memory):
    """action=expire is a warning (issue 11, point 8): journalctl -p warning finds it, with qrunner's fields."""
    journald = log_namespace("journald")
    mta, qr = memory
    qr.config_path.write_text("max_hold_age = 600\n" + qr.config_path.read_text())
    old = mta.queue.submit("carol@example.org", ["bob@example.net"], make_message("please hold"),
                           arrival=time.time() - 3600)
    young = mta.queue_message("please hold")
    assert journald.qrunner(qr, "-q", "run").code == 0

    journald.wait_until(lambda: qrunner_entries(journald, "ACTION=hold"), "the young message's hold")
    [entry] = qrunner_entries(journald, f"QUEUE_ID={old}")
    assert (entry["ACTION"], entry["PRIORITY"], entry["QRUNNER_PRIORITY"], entry["ENVELOPE_SENDER"]) == \
        ("expire", "4", "50", "carol@example.org")
    assert entry["REASON"] == "past max_hold_age (10 min since arrival): sent by the MTA's own routing without " \
                              "asking the policy"
    assert [e["QUEUE_ID"] for e in journald.journal("-t", "qrunner", "-p", "warning")] == [old]
    assert [e["QUEUE_ID"] for e in qrunner_entries(journald, "ACTION=hold")] == [young]
