"""Long commands show a progress bar at a terminal, and nowhere else (issue 11, point 9).

The terminal is a real pseudo-terminal (the pty module) on qrunner's
stderr; the queue is the memory back end's, with a policy slow enough
that deciding it lasts longer than the bar's one-second delay.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios

import pytest

from memory_harness import MemoryHarness
from qrunner_e2e import Qrunner

MESSAGES = 150

# About 15 ms of work per message: deciding the queue lasts a few seconds.
SLOW = """
function CheckFile(f, a)
  local t = os.clock()
  while os.clock() - t < 0.015 do end
  return a
end
"""


@pytest.fixture
def memory(tmp_path):
    harness = MemoryHarness(str(tmp_path / "queue"))
    for i in range(MESSAGES):
        harness.queue.submit("alice@qrunner-test.localdomain", ["bob@example.net"], b"Subject: m%d\n\nx\n" % i)
    return harness


def on_a_terminal(qr, *args, env=None):
    """Run qrunner with stderr on a pseudo-terminal; (exit code, what the terminal showed, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([*qr.start_command(), *args], stdout=subprocess.PIPE, stderr=slave,
                            env=dict(qr._env(), **(env or {})))
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end closed: qrunner ended
            break
        if not chunk:
            break
        shown += chunk
    out = proc.stdout.read().decode()
    os.close(master)
    return proc.wait(), shown.decode(errors="replace"), out


def test_a_long_plan_shows_a_bar_with_counts_and_rate_on_a_terminal(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, SLOW)
    code, shown, out = on_a_terminal(qr, "plan")
    assert code == 0, shown
    assert "policy, sender default" in shown and re.search(rf"\d+/{MESSAGES} \[", shown), shown
    assert "msg/s" in shown
    assert out.count("send") >= MESSAGES  # the plan itself still goes to stdout, whole


def test_log_lines_go_above_the_bar_whole(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, SLOW)
    code, shown, _ = on_a_terminal(qr, "run")
    assert code == 0, shown
    assert "policy, sender default" in shown
    lines = [segment for line in shown.replace("\r\n", "\n").split("\n") for segment in line.split("\r")]
    actions = [line for line in lines if "action=send" in line]
    assert len(actions) == MESSAGES, shown[-2000:]
    assert all(re.fullmatch(r"(\x1b\[[0-9;]*[A-Za-z])*qrunner\[\d+\]: \S+: action=send sender=default priority=50\s*",
                            line) for line in actions), actions[:3]


@pytest.mark.parametrize("how", ["quiet", "systemd", "not a terminal"])
def test_no_bar_with_q_under_systemd_or_without_a_terminal(tmp_path, memory, how):
    qr = Qrunner(tmp_path, memory, SLOW)
    if how == "not a terminal":
        result = qr("plan")
        code, shown = result.code, result.stderr
    else:
        args = ("-q", "plan") if how == "quiet" else ("plan",)
        code, shown, _ = on_a_terminal(qr, *args, env={"INVOCATION_ID": "0123"} if how == "systemd" else None)
    assert code == 0, shown
    assert "policy, sender" not in shown and "msg/s" not in shown, shown
