"""``qrunner check --cases FILE``: policy tests an admin keeps beside the script (issue 11, point 6).

No MTA: the cases file is the queue. Each test runs the real command
(``python -m qrunner``) and checks what an admin reads: the exit code and
the report's lines.
"""

from __future__ import annotations

import json
from pathlib import Path

from policy_helpers import REPO_ROOT, run_qrunner, write_script
from safe_tmp import shipped

SHIPPED_CASES = REPO_ROOT / "examples" / "relayout-cases.toml"
SHIPPED_SCRIPT = Path(shipped("relayout.lua"))  # a copy strict modes accept (tests/safe_tmp.py)


def check(*args):
    result = run_qrunner(["check"] + [str(a) for a in args])
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_the_shipped_policy_passes_its_shipped_cases():
    code, out, err = check("--script", SHIPPED_SCRIPT, "--cases", SHIPPED_CASES)
    assert (code, out) == (0, f"{SHIPPED_SCRIPT}: 5 cases, all as expected\n"), err


def test_a_changed_policy_fails_with_a_line_per_case_that_changed(tmp_path):
    changed = SHIPPED_SCRIPT.read_text().replace("size > 5000000", "size > 7000000").replace("hour < 19", "hour < 21")
    script = write_script(tmp_path, changed)

    code, out, err = check("--script", script, "--cases", SHIPPED_CASES)

    assert code == 1, err
    assert out.splitlines() == [
        "case 3 (over 10 MB goes in the evening, last): expected send, got hold "
        "(the script said: hold: over 10 MB: waits until 19:00)",
        "case 4 (over 5 MB goes by day, but last): expected priority 1, got 50 "
        "(the script said: send, priority 50, by default)",
        f"{script}: 5 cases, 2 changed behaviour",
    ]


def test_cases_that_share_a_clock_run_in_one_pass_in_file_order(tmp_path):
    """Scripts count across calls (globals persist within a pass): the cases see the queue's order."""
    script = write_script(tmp_path, "seen = 0\nfunction CheckFile(f, a)\n  seen = seen + 1\n"
                                    "  if seen > 2 then a.SkipSend = 1; a.Reason = 'only two per run' end\n"
                                    "  return a\nend\n")
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"now": "2026-11-25T10:00:00", "case": [
        {"name": "first", "expect": {"action": "send"}},
        {"name": "second", "expect": {"action": "send"}},
        {"name": "third", "expect": {"action": "hold", "reason": "only two per run"}},
        {"name": "another clock", "now": "2026-11-26T10:00:00", "expect": {"action": "send"}}]}))

    code, out, err = check("--script", script, "--cases", cases)

    assert (code, out) == (0, f"{script}: 4 cases, all as expected\n"), out + err


def test_senders_and_policy_errors_are_reported(tmp_path):
    script = write_script(tmp_path, "function CheckFile(f, a, s, c, rp)\n"
                                    "  if senderid == 0 and s > 100 then a.SkipSend = 1 end\n"
                                    "  if rp == 'boom@example.org' then error('boom') end\n  return a\nend\n")
    cases = tmp_path / "cases.toml"
    cases.write_text('[[case]]\nsize = 50\nexpect = { action = "send", sender = "backup" }\n'
                     '[[case]]\nsize = 500\nexpect = { action = "send", sender = "backup" }\n'
                     '[[case]]\nsender = "boom@example.org"\nexpect = { action = "send" }\n')

    code, out, err = check("--script", script, "--cases", cases, "--sender", "0:isp", "--sender", "1:backup")

    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "case 1: expected sender backup, got isp (the script said: send, priority 50, by isp)"
    assert lines[1].startswith("case 3: expected send, got hold; policy error: isp: ") and "boom" in lines[1]
    assert lines[-1] == f"{script}: 3 cases, 2 changed behaviour"


def test_a_malformed_cases_file_is_one_sentence_naming_the_case_and_the_key(tmp_path):
    cases = tmp_path / "cases.toml"
    for text, words in (
            ('[[case]]\nsize = "big"\nexpect = { action = "send" }\n', "case 1: size must be a whole number"),
            ('[[case]]\nexpect = { action = "later" }\n', 'case 1: expect.action must be "send" or "hold"'),
            ('[[case]]\nexpect = { action = "send", priority = 500 }\n', "case 1: expect.priority must be a whole "
                                                                     "number from 1 to 100"),
            ('[[case]]\nsizes = 1\nexpect = { action = "send" }\n', "case 1: unknown key 'sizes'"),
            ('[[case]]\nexpect = { action = "send" }\n[[case]]\nname = "x"\n', "case 2: expect must be a table"),
            ('now = "tomorrow"\n[[case]]\nexpect = { action = "send" }\n', "now 'tomorrow' is not a local time"),
            ("case = [\n", "not valid TOML"),
            ("x = 1\n", "no cases")):
        cases.write_text(text)
        code, out, err = check("--script", SHIPPED_SCRIPT, "--cases", cases)
        assert code == 65 and words in err and "Traceback" not in err and out == "", (text, err)
    missing = check("--script", SHIPPED_SCRIPT, "--cases", tmp_path / "nowhere.toml")
    assert missing[0] == 66 and "cases file not found" in missing[2]
    both = check("--script", SHIPPED_SCRIPT, "--cases", SHIPPED_CASES, "--queue-file", cases)
    assert both[0] == 64
