"""A dry run (and ``plan``) prints the whole plan, recovery included, and changes and logs nothing as done.

Over the memory back end, so it runs on any machine; the system log is a
real datagram socket standing in for ``/dev/log``, and stderr is captured,
not a terminal, as under cron or a pipe.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from memory_harness import MemoryHarness
from qrunner_e2e import Qrunner

from qrunner import log as log_mod
from qrunner.cli import main

pytestmark = pytest.mark.memory

SCRIPT = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  print("the script looked at " .. (headers.subject or ""))
  if (headers.subject or ""):find("hold") then a.SkipSend = 1; a.Reason = "subject says hold" end
  return a
end
"""


@pytest.fixture
def syslog(tmp_path, monkeypatch):
    """A socket where qrunner's system log lines land, as /dev/log would take them (no journal socket)."""
    address = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.setblocking(False)
    monkeypatch.setattr(log_mod, "SYSLOG_ADDRESS", address)
    monkeypatch.setattr(log_mod, "JOURNAL_SOCKET", str(tmp_path / "no-journal"))  # this host's journal stays out
    monkeypatch.delenv(log_mod.TEST_NO_SYSTEM_LOG, raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    lines = []

    def received():
        time.sleep(0.1)
        while True:
            try:
                lines.append(server.recv(65536).decode())
            except BlockingIOError:
                return list(lines)

    yield received
    server.close()


def test_a_dry_run_from_cron_or_a_pipe_writes_nothing_to_the_mail_log(tmp_path, syslog, capsys):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, SCRIPT)
    held = mta.queue_message("hold me")
    mta.queue_message("go")
    before = mta.snapshot()
    config = ["--config", str(qr.config_path)]

    assert main(config + ["run", "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert main(config + ["plan"]) == 0
    plan = capsys.readouterr()

    assert syslog() == []
    assert "the script looked at hold me" in dry.err and "action=" not in dry.err
    assert held in dry.out and "subject says hold" in dry.out
    assert "the script looked at hold me" in plan.err and "action=" not in plan.err
    assert mta.snapshot() == before and mta.sink.messages == []
    assert not os.path.exists(os.path.join(qr.state_dir, "qrunner.sqlite"))

    assert main(config + ["run"]) == 0  # a real run does reach the mail log
    capsys.readouterr()
    logged = "".join(syslog())
    assert f"{held}: action=hold" in logged and "the script looked at hold me" in logged


def test_the_plan_holds_the_recovery_a_run_would_do_first(tmp_path, capsys):
    """A run killed after a sender's route accepted a copy: the next plan shows the delete and the copy's release,
    and does neither."""
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, "function CheckFile(f, a) return a end\n")
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\n'
                              '[[sender]]\nid = 1\nname = "backup"\ndefault = true\n')
    original = mta.queue_message("to isp")
    killed = qr.run_killed_at(f"{mta.backend_class}.remove", "run")
    assert killed.code < 0
    [copy] = [q for q in mta.snapshot() if q != original]  # the copy, on its listener's hold
    assert mta.where(copy) == "held" and mta.sink.messages == []

    dry = qr("run", "--dry-run")
    plan = qr("plan", "--format", "json")

    assert dry.code == 0 and plan.code == 0, dry.stderr + plan.stderr
    [row] = [line for line in dry.stdout.splitlines() if line.startswith(original)]
    assert row.split()[1] == "delete" and f"already handed to sender isp as {copy}" in row
    assert json.loads(plan.stdout)["recovery"] == [
        {"queue_id": original, "action": "delete",
         "reason": f"already handed to sender isp as {copy} by an interrupted run"},
        {"queue_id": copy, "action": "release",
         "reason": f"copy for sender isp of {original}: released to its route now that the original is gone"}]
    assert "action=" not in dry.stderr
    assert mta.where(original) == "held" and mta.where(copy) == "held"  # nothing was done

    run = qr("run")
    assert f"{original}: action=delete" in run.stderr and f"{copy}: action=release" in run.stderr
    assert original not in mta.snapshot()
    assert [(m.header("Subject"), m.route) for m in mta.sink.wait_for(1)] == [(b"to isp", "isp")]  # once
