"""``qrunner status --check`` for Nagios-style monitoring, and ``qrunner --version`` (issue 11, point 10).

status --check over the memory back end (its queue file can be made to
fail, or ungated, on demand); --version against the real MTAs, compared
with what their own tools print.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from memory_harness import MemoryHarness
from mta_harness import EximHarness, PostfixHarness
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner


@pytest.fixture
def memory(tmp_path):
    return MemoryHarness(str(tmp_path / "queue"))


def check(qr, *extra):
    result = qr("status", "--check", *extra)
    assert result.stdout.count("\n") == 1 and result.stderr == "", result  # one line, for the monitor
    return result.code, result.stdout.strip()


def test_status_check_says_ok_warning_or_critical_in_one_line(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, SKIP_ALL)
    assert check(qr) == (2, "QRUNNER CRITICAL: no run has completed yet")

    memory.queue_message("held")
    assert qr("run").code == 0
    code, line = check(qr)
    assert code == 0 and line.startswith("QRUNNER OK: 1 holds; the last run ") and line.endswith("(run, ok)")

    code, line = check(qr, "--max-age", "0.001")
    assert code == 2 and line.startswith("QRUNNER CRITICAL: no run completed in the last 0 s")
    for bad in ("nan", "-5", "inf"):
        refused = qr("status", "--check", "--max-age", bad)
        assert refused.code == 64 and "is not a number of seconds above 0" in refused.stderr, refused

    memory.set(gated=False)
    code, line = check(qr)
    assert code == 1 and "not gated: the memory queue is not gated" in line
    memory.set(gated=True, queue_lifetime=1)
    time.sleep(1.1)
    assert check(qr) == (1, "QRUNNER WARNING: 1 holds near the MTA's queue lifetime")


def test_status_check_is_critical_after_a_failed_run_and_warns_after_policy_errors(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, 'function CheckFile(f, a, s, c, rp) if rp == "x@y" then error("boom") end '
                                'a.SkipSend = 1 return a end\n')
    memory.queue_message("one")
    memory.queue_message("two")
    memory.set(fail={"hold": "the MTA stopped"})
    assert qr("run").code == 69
    code, line = check(qr)
    assert code == 2 and line.startswith("QRUNNER CRITICAL: the last run (run) failed: the memory queue's hold")
    memory.set(fail={})
    assert qr("release", "--all").code == 0  # an admin's command in between hides no failed timer
    code, line = check(qr)
    assert code == 2 and line.startswith("QRUNNER CRITICAL: the last run (run) failed"), line

    memory.queue_message("three", sender="x@y")
    assert qr("run").code == 1
    code, line = check(qr)
    assert code == 1 and "the last run (run) ended exit 1: 1 with a policy error" in line


def test_version_names_lupa_the_configured_lua_and_the_mta(tmp_path, memory):
    qr = Qrunner(tmp_path, memory, ALLOW_ALL, extra_config='lua = "5.1"')
    lines = qr("--version").stdout.splitlines()
    import lupa

    assert lines[0].startswith("qrunner ")
    assert lines[1] == f'lupa {lupa.__version__}, Lua 5.1 (lua = "5.1")'
    assert lines[2] == f"MTA: the memory back end ({memory.directory})"


def test_version_says_which_postfix_as_postconf_does(tmp_path, postfix):
    qr = Qrunner(tmp_path, PostfixHarness(postfix, None), ALLOW_ALL)
    expected = subprocess.run(["postconf", "-c", postfix.config_directory, "-h", "mail_version"],
                              capture_output=True, text=True, check=True).stdout.strip()
    [line] = [ln for ln in qr("--version").stdout.splitlines() if ln.startswith("MTA: ")]
    assert line.startswith(f"MTA: Postfix {expected} ({postfix.config_directory}")


def test_version_says_which_exim_as_exim_bv_does(tmp_path, exim, exim_sink):
    qr = Qrunner(tmp_path, EximHarness(exim, exim_sink), ALLOW_ALL)
    first = subprocess.run(exim.argv + ["-bV"], capture_output=True, text=True).stdout.splitlines()[0]
    [line] = [ln for ln in qr("--version").stdout.splitlines() if ln.startswith("MTA: ")]
    assert line.startswith("MTA: Exim " + first.split("Exim version ")[1])
