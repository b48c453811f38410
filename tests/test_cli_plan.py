"""``qrunner plan --queue-file`` and ``qrunner check``: output, exit codes, errors.

Most tests run ``qrunner.cli.main([...])`` in-process with capsys; the few
where a real process boundary matters (standard input, what reaches file
descriptor 1, the time zone of a fresh process) run ``python -m qrunner``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from policy_helpers import (REPO_ROOT, SCRIPTS_DIR, no_default_config, plan_json, record,  # noqa: F401
                            run_cli, run_qrunner, set_tz, write_script, write_snapshot)

pytestmark = pytest.mark.usefixtures("no_default_config")

DECISION_KEYS = ["queue_id", "action", "priority", "sender_id", "sender_name", "reason", "errors"]

PRIORITY_BY_FILENAME = """
function CheckFile(f, a, size)
  if f == "skip" then a.SkipSend = true a.Reason = "held for test" return a end
  if f == "noreason" then a.SkipSend = 1 return a end
  if f == "error" then error("broken on purpose") end
  a.Priority = tonumber(f) or 50
  return a
end
"""


@pytest.fixture
def script(tmp_path):
    return write_script(tmp_path, PRIORITY_BY_FILENAME)


def plan(capsys, tmp_path, script_path, records, *extra):
    snapshot = write_snapshot(tmp_path, records)
    return plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script_path, *extra])


# -- JSON -------------------------------------------------------------------------


def test_json_is_exactly_as_specified(capsys, tmp_path, script):
    records = [
        record("HELD2", arrival=500, filename="skip"),
        record("LOW", arrival=100, filename="1"),
        record("HIGH", arrival=400, filename="100"),
        record("HELD1", arrival=50, filename="noreason"),
        record("MID_B", arrival=200, filename="50"),
        record("MID_A", arrival=200, filename="50"),
        record("EARLY", arrival=150, filename="50"),
    ]
    code, decisions, err = plan(capsys, tmp_path, script, records)
    assert code == 0
    assert all(list(d) == DECISION_KEYS for d in decisions)
    assert decisions == [
        {"queue_id": "HIGH", "action": "send", "priority": 100, "sender_id": 0, "sender_name": "default",
         "reason": "", "errors": []},
        {"queue_id": "EARLY", "action": "send", "priority": 50, "sender_id": 0, "sender_name": "default",
         "reason": "", "errors": []},
        {"queue_id": "MID_A", "action": "send", "priority": 50, "sender_id": 0, "sender_name": "default",
         "reason": "", "errors": []},
        {"queue_id": "MID_B", "action": "send", "priority": 50, "sender_id": 0, "sender_name": "default",
         "reason": "", "errors": []},
        {"queue_id": "LOW", "action": "send", "priority": 1, "sender_id": 0, "sender_name": "default",
         "reason": "", "errors": []},
        {"queue_id": "HELD1", "action": "skip", "priority": 50, "sender_id": None, "sender_name": None,
         "reason": "skipped by sender default, no reason given", "errors": []},
        {"queue_id": "HELD2", "action": "skip", "priority": 50, "sender_id": None, "sender_name": None,
         "reason": "held for test", "errors": []},
    ]


def test_json_output_is_one_object_on_one_line(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--format", "json"])
    assert code == 0
    assert out.endswith("\n") and out.count("\n") == 1
    assert list(json.loads(out)) == ["decisions"]


def test_an_empty_snapshot_plans_nothing(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    assert (code, decisions) == (0, [])


def test_a_policy_error_gives_exit_1_and_is_listed(capsys, tmp_path, script):
    records = [record("OK", arrival=1, filename="70"), record("BAD", arrival=2, filename="error"),
               record("OK2", arrival=3, filename="skip")]
    code, decisions, err = plan(capsys, tmp_path, script, records)
    assert code == 1
    by_id = {d["queue_id"]: d for d in decisions}
    assert [d["queue_id"] for d in decisions] == ["OK", "BAD", "OK2"]
    assert by_id["OK"]["action"] == "send" and by_id["OK"]["priority"] == 70
    bad = by_id["BAD"]
    assert bad["action"] == "skip" and bad["sender_id"] is None
    assert len(bad["errors"]) == 1 and "broken on purpose" in bad["errors"][0]
    assert f"{script}:5:" in bad["errors"][0]  # the whole path, however long
    assert bad["reason"].startswith("policy error:")
    assert "broken on purpose" in err and "Traceback" not in err


def test_on_script_error_send_sends_the_failing_message_at_50(capsys, tmp_path, script):
    records = [record("BAD", filename="error")]
    code, decisions, err = plan(capsys, tmp_path, script, records, "--on-script-error", "send")
    assert code == 1
    assert decisions[0]["action"] == "send" and decisions[0]["priority"] == 50
    assert decisions[0]["sender_name"] == "default" and "broken on purpose" in decisions[0]["errors"][0]


def test_every_line_is_decided_whatever_its_queue_name(capsys, tmp_path, script):
    records = [record("D", arrival=1, queue_name="deferred"), record("H", arrival=2, queue_name="hold"),
               record("A", arrival=3, queue_name="active"), record("I", arrival=4, queue_name="incoming")]
    records[2]["recipients"][0].pop("delay_reason")  # active mail has none
    code, decisions, err = plan(capsys, tmp_path, script, records)
    assert code == 0 and [d["queue_id"] for d in decisions] == ["D", "H", "A", "I"]


def test_snapshot_fields_reach_the_script(capsys, tmp_path, set_tz):
    set_tz("UTC")
    script = write_script(tmp_path, """
    function CheckFile(Filename, Actions, Size, CreationTime, ReturnPath, Recipients, HeaderData, HeaderLines)
      Actions.SkipSend = true
      Actions.Reason = table.concat({Filename, Size, CreationTime, "<" .. ReturnPath .. ">", table.concat(Recipients, ","),
        tostring(HeaderData.subject), #HeaderLines}, "|")
      return Actions
    end""")
    records = [record("WITH", arrival=1_764_050_000, size=4321, sender="", recipients=["a@x", "b@y"],
                      headers=["Subject: hi", "X-A: 1"], filename="/q/WITH"),
               record("BARE", arrival=1_764_050_001, size=7)]
    code, decisions, err = plan(capsys, tmp_path, script, records)
    assert [d["reason"] for d in decisions] == [
        "/q/WITH|4321|20251125055320|<>|a@x,b@y|hi|2",
        "|7|20251125055321|<alice@example.org>|bob@example.net|nil|0",
    ]


# -- several senders --------------------------------------------------------------

BY_SENDER = """
function CheckFile(f, a)
  if f ~= sendername then a.SkipSend = true a.Reason = "not for " .. sendername end
  a.Priority = 10 + senderid
  return a
end
"""


def test_several_senders_on_the_command_line(capsys, tmp_path):
    script = write_script(tmp_path, BY_SENDER)
    records = [record("TO_B", arrival=1, filename="b"), record("TO_A", arrival=2, filename="a"),
               record("NOBODY", arrival=3, filename="z")]
    code, decisions, err = plan(capsys, tmp_path, script, records, "--sender", "7:b", "--sender", "3:a")
    assert code == 0
    assert [(d["queue_id"], d["action"], d["priority"], d["sender_id"], d["sender_name"]) for d in decisions] == [
        ("TO_B", "send", 17, 7, "b"), ("TO_A", "send", 13, 3, "a"), ("NOBODY", "skip", 17, None, None)]
    assert decisions[2]["reason"] == "a: not for a; b: not for b"  # ascending id: a (3) ran first


def test_sender_ids_must_be_unique(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script,
                                      "--sender", "0:a", "--sender", "0:b"])
    assert code == 64 and out == "" and "0" in err


# -- the table ------------------------------------------------------------------


def test_table_format_lists_sends_then_skips_with_a_summary(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [
        record("Q_SKIP", arrival=1, filename="skip"), record("Q_LOW", arrival=2, filename="5"),
        record("Q_HIGH", arrival=3, filename="95"), record("Q_ERR", arrival=4, filename="error")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["QUEUE", "ID", "ACTION", "PRIO", "SENDER", "REASON"]
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows] == ["Q_HIGH", "Q_LOW", "Q_SKIP", "Q_ERR"]
    assert rows[0].split()[:4] == ["Q_HIGH", "send", "95", "default"]
    assert rows[2].split()[:2] == ["Q_SKIP", "hold"] and rows[2].rstrip().endswith("held for test")
    assert "broken on purpose" in rows[3]
    # aligned: every column starts at the same offset on every line
    for column in ("ACTION", "PRIO", "SENDER"):
        offset = lines[0].index(column)
        assert all(row[offset - 2:offset] == "  " and row[offset] != " " for row in rows)
    assert lines[-1] == "4 messages: 2 to send (default 2), 2 to hold; policy errors: default 1"


def test_table_summary_counts_per_sender(capsys, tmp_path):
    script = write_script(tmp_path, BY_SENDER)
    snapshot = write_snapshot(tmp_path, [record("1", arrival=1, filename="a"), record("2", arrival=2, filename="b"),
                                         record("3", arrival=3, filename="b"), record("4", arrival=4, filename="c")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script,
                                      "--sender", "0:a", "--sender", "1:b"])
    assert code == 0
    summary = out.splitlines()[-1]
    assert summary.startswith("4 messages: 3 to send (") and summary.endswith("), 1 to hold; no policy errors")
    assert summary.split("(")[1].split(")")[0].split(", ") == ["a 1", "b 2"]  # in sender id order


# -- standard input, and what reaches stdout ---------------------------------------


def test_queue_file_dash_reads_standard_input(tmp_path, script):
    lines = "".join(json.dumps(r) + "\n" for r in [record("STDIN1", arrival=1, filename="20"),
                                                   record("STDIN2", arrival=2, filename="80")])
    result = run_qrunner(["plan", "--queue-file", "-", "--script", script, "--format", "json"],
                         input=lines.encode())
    assert result.returncode == 0, result.stderr
    decisions = json.loads(result.stdout)["decisions"]
    assert [(d["queue_id"], d["priority"]) for d in decisions] == [("STDIN2", 80), ("STDIN1", 20)]


def test_print_reaches_the_log_on_stderr_never_stdout(tmp_path):
    script = write_script(tmp_path, """
    print("PRINTED-AT-TOP")
    function Start() print("PRINTED-IN-START") end
    function CheckFile(f, a) print("PRINTED-IN-CHECKFILE") return a end""")
    snapshot = write_snapshot(tmp_path, [record("P1")])
    for args in (["plan", "--format", "json"], ["plan"], ["check"]):
        result = run_qrunner(args + ["--queue-file", snapshot, "--script", script])
        assert result.returncode == 0, result.stderr
        assert b"PRINTED" not in result.stdout
        for text in (b"PRINTED-AT-TOP", b"PRINTED-IN-START", b"PRINTED-IN-CHECKFILE"):
            assert text in result.stderr


def test_print_in_process_goes_to_stderr(capsys, tmp_path):
    script = write_script(tmp_path, 'function CheckFile(f, a) print("hello from lua") return a end')
    snapshot = write_snapshot(tmp_path, [record("P1")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--format", "json"])
    assert code == 0 and "hello from lua" not in out and "hello from lua" in err


# -- --now and the time zone --------------------------------------------------------

CLOCK = """
function CheckFile(f, a, size, created)
  a.SkipSend = true
  a.Reason = os.date("%Y-%m-%d %H:%M:%S") .. "|" .. os.time() .. "|" .. created
  return a
end"""


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_now_and_creation_time_are_local_time_in_tz(tmp_path, zone):
    script = write_script(tmp_path, CLOCK)
    snapshot = write_snapshot(tmp_path, [record("T", arrival=1_764_050_000)])  # 2025-11-25 05:53:20 UTC
    result = run_qrunner(["plan", "--queue-file", snapshot, "--script", script, "--format", "json",
                          "--now", "2026-07-01T09:30:00"], env={"TZ": zone})
    assert result.returncode == 0, result.stderr
    shown, epoch, created = json.loads(result.stdout)["decisions"][0]["reason"].split("|")
    assert shown == "2026-07-01 09:30:00"
    offsets = {"UTC": 0, "America/New_York": -4 * 3600, "Asia/Kolkata": 5 * 3600 + 1800}  # July offsets
    assert int(epoch) == 1_782_898_200 - offsets[zone]  # 2026-07-01 09:30:00 UTC
    created_expected = {"UTC": "20251125055320", "America/New_York": "20251125005320",
                        "Asia/Kolkata": "20251125112320"}
    assert created == created_expected[zone]


@pytest.mark.parametrize("value", ["2026-11-25 09:00:00", "09:00", "2026-13-01T00:00:00", "tomorrow", ""])
def test_a_malformed_now_is_bad_usage(capsys, tmp_path, script, value):
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--now", value])
    assert code == 64 and out == ""
    assert "--now" in err and "Traceback" not in err


# -- the seed's examples ---------------------------------------------------------

SEED_SIZES = [
    record("SMALL", arrival=1_764_050_000, size=4_000_000),
    record("OVER5M", arrival=1_764_050_060, size=5_000_001),
    record("EXACT10M", arrival=1_764_050_120, size=10_000_000),
    record("OVER10M", arrival=1_764_050_180, size=10_000_001),
    record("HUGE", arrival=1_764_050_240, size=12_500_000),
]


def seed_plan(capsys, tmp_path, example, *extra):
    snapshot = write_snapshot(tmp_path, SEED_SIZES)
    return plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", SCRIPTS_DIR / example, *extra])


def test_seed_example_1_at_10_holds_mail_over_10_million_bytes(capsys, tmp_path):
    code, decisions, err = seed_plan(capsys, tmp_path, "seed_example1.lua", "--now", "2026-11-25T10:00:00")
    assert code == 0
    assert [(d["queue_id"], d["action"], d["priority"]) for d in decisions] == [
        ("SMALL", "send", 50), ("OVER5M", "send", 1), ("EXACT10M", "send", 1),
        ("OVER10M", "skip", 1), ("HUGE", "skip", 1)]
    assert decisions[3]["reason"] == "skipped by sender default, no reason given"
    assert decisions[3]["sender_id"] is None


@pytest.mark.parametrize("now", ["2026-11-25T20:00:00", "2026-11-25T07:30:00", "2026-11-25T19:00:00"])
def test_seed_example_1_outside_office_hours_sends_everything(capsys, tmp_path, now):
    # 07:30 sends: the code tests time.hour > 7 (the seed's prose says 7am).
    code, decisions, err = seed_plan(capsys, tmp_path, "seed_example1.lua", "--now", now)
    assert code == 0
    assert [(d["queue_id"], d["action"], d["priority"]) for d in decisions] == [
        ("SMALL", "send", 50), ("OVER5M", "send", 1), ("EXACT10M", "send", 1),
        ("OVER10M", "send", 1), ("HUGE", "send", 1)]


def test_seed_example_1_at_08_holds_again(capsys, tmp_path):
    code, decisions, err = seed_plan(capsys, tmp_path, "seed_example1.lua", "--now", "2026-11-25T08:00:00")
    assert [d["queue_id"] for d in decisions if d["action"] == "skip"] == ["OVER10M", "HUGE"]


def test_seed_example_2_routes_big_mail_through_sender_0(capsys, tmp_path):
    snapshot = write_snapshot(tmp_path, [
        record("BIG", arrival=1, size=60_000), record("TINY", arrival=2, size=1_000),
        record("EDGE", arrival=3, size=50_000), record("JUSTOVER", arrival=4, size=50_001)])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script",
                                              SCRIPTS_DIR / "seed_example2.lua", "--sender", "0:bulk",
                                              "--sender", "1:smarthost"])
    assert code == 0
    assert [(d["queue_id"], d["action"], d["sender_id"], d["sender_name"]) for d in decisions] == [
        ("BIG", "send", 0, "bulk"), ("TINY", "send", 1, "smarthost"), ("EDGE", "send", 1, "smarthost"),
        ("JUSTOVER", "send", 0, "bulk")]


def test_seed_example_2_with_only_sender_1_holds_big_mail(capsys, tmp_path):
    snapshot = write_snapshot(tmp_path, [record("BIG", arrival=1, size=60_000), record("TINY", arrival=2, size=10)])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script",
                                              SCRIPTS_DIR / "seed_example2.lua", "--sender", "1:smarthost"])
    assert [(d["queue_id"], d["action"], d["reason"]) for d in decisions] == [
        ("TINY", "send", ""), ("BIG", "skip", "skipped by sender smarthost, no reason given")]


# -- exit codes and error messages ---------------------------------------------------


def assert_failed(code, out, err, expected_code, *fragments):
    assert code == expected_code, err
    assert out == ""
    assert err.startswith("qrunner: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("sender", ["default", "x:name", "0", "0:", ":name", "-1:neg", "0: "])
def test_a_malformed_sender_is_bad_usage(capsys, tmp_path, script, sender):
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--sender", sender])
    assert_failed(code, out, err, 64, "--sender")


@pytest.mark.parametrize("args", [
    ["plan", "--queue-file", "QUEUE", "--bogus"],
    ["plan", "--queue-file", "QUEUE", "--format", "xml"],
    ["plan", "--queue-file", "QUEUE", "--on-script-error", "ignore"],
    ["plan", "--queue-file", "QUEUE", "--lua", "6.0"],
    ["frobnicate"],
    [],
])
def test_bad_usage_exits_64(capsys, tmp_path, script, args):
    snapshot = write_snapshot(tmp_path, [record("A")])
    args = [str(snapshot) if a == "QUEUE" else a for a in args]
    code, out, err = run_cli(capsys, args + (["--script", str(script)] if args and args[0] == "plan" else []))
    assert_failed(code, out, err, 64)


@pytest.mark.reliability
@pytest.mark.parametrize("line, number, fragment", [
    ("{not json", 2, "not valid JSON"),
    ('["a list"]', 2, "not a JSON object"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "a@b"}', 2, "'recipients'"),
    ('{"queue_id": "", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": []}', 2, "'queue_id'"),
    ('{"queue_id": "A\\nB: action=send", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": []}', 2,
     "'queue_id' must be letters, digits"),
    ('{"queue_id": "-d", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": []}', 2, "'queue_id'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": [], "x": '
     + "[" * 100000 + "]" * 100000 + "}", 2, "nested too deeply"),
    ('{"queue_id": "X", "arrival_time": ' + "9" * 5000 + ', "message_size": 5, "sender": "", "recipients": []}', 2,
     "a number with more digits than any field can hold"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "\\ud800x", "recipients": []}', 2,
     "'sender' holds a \\uXXXX escape of a lone surrogate"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": [], '
     '"headers": ["Subject: \\ud83d"]}', 2, "'headers' holds"),
    ('{"queue_id": "../x", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": []}', 2, "'queue_id'"),
    ('{"queue_id": "A B", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": []}', 2, "'queue_id'"),
    ('{"queue_id": "X", "arrival_time": "now", "message_size": 5, "sender": "", "recipients": []}', 2,
     "'arrival_time'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": -5, "sender": "", "recipients": []}', 2,
     "'message_size'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": [{"addr": "x"}]}', 2,
     "'recipients'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": [], "headers": "S: x"}',
     2, "'headers'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 5, "sender": "", "recipients": [], "filename": 7}', 2,
     "'filename'"),
    ('{"queue_id": "X", "arrival_time": 1e20, "message_size": 5, "sender": "", "recipients": []}', 2,
     "'arrival_time'"),
    ('{"queue_id": "X", "arrival_time": NaN, "message_size": 5, "sender": "", "recipients": []}', 2,
     "'arrival_time'"),
    ('{"queue_id": "X", "arrival_time": 1, "message_size": 1e300, "sender": "", "recipients": []}', 2,
     "'message_size'"),
])
def test_a_malformed_snapshot_line_exits_65_naming_the_line(capsys, tmp_path, script, figures, line, number, fragment):
    """One sentence naming the line; the other lines still planned, as a run goes on for the other messages."""
    snapshot = write_snapshot(tmp_path, [record("GOOD"), line, record("LATER", arrival=2)])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    assert_bad_lines(code, err, snapshot, [number], fragment)
    assert sorted(d["queue_id"] for d in decisions) == ["GOOD", "LATER"]
    figures.record("inputs", f"malformed snapshot line: {fragment}", tried=1, survived=1)


def assert_bad_lines(code, err, snapshot, numbers, fragment=""):
    """Exit 65, each bad line named in one sentence of its own (file and line number), no traceback."""
    assert code == 65, err
    assert "Traceback" not in err
    named = [line for line in err.splitlines() if re.search(re.escape(f"{snapshot}:") + r"\d+: ", line)]
    assert [line.split(f"{snapshot}:")[1].split(":")[0] for line in named] == [str(n) for n in numbers], err
    assert all(line.endswith("each line must be one JSON object as 'postqueue -j' prints it.") for line in named)
    assert fragment in err, (fragment, err)


@pytest.mark.parametrize("depth", [900, 950, 990])
def test_a_recipient_value_nested_hundreds_deep_is_planned_or_named_never_a_traceback(capsys, tmp_path, script,
                                                                                        depth):
    """Deep enough to pass JSON's own limit and then break a reader that walks it by recursion (it did, with a
    RecursionError): whether JSON takes it depends on the stack it is read on; either way one sentence or a plan."""
    line = dict(record("DEEP"), recipients=[{"address": "bob@example.net", "x": "@"}])
    text = json.dumps(line).replace('"@"', "[" * depth + "]" * depth)
    snapshot = write_snapshot(tmp_path, [record("GOOD"), text])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    if code == 65:
        assert_bad_lines(code, err, snapshot, [2], "JSON nested too deeply")
        assert [d["queue_id"] for d in decisions] == ["GOOD"]
    else:
        assert code == 0 and sorted(d["queue_id"] for d in decisions) == ["DEEP", "GOOD"], err


def test_blank_lines_are_skipped_and_line_numbers_still_count_them(capsys, tmp_path, script):
    snapshot = tmp_path / "queue.jsonl"
    snapshot.write_text(json.dumps(record("A")) + "\n\n{oops\n" + json.dumps(record("B", arrival=2)) + "\n\n{oops\n")
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    assert_bad_lines(code, err, snapshot, [3, 6])
    assert sorted(d["queue_id"] for d in decisions) == ["A", "B"]


def test_a_file_of_nothing_but_bad_lines_names_a_hundred_then_counts_the_rest(capsys, tmp_path, script):
    """A wrong file given (a binary, a log): not a flood of sentences, and nothing planned."""
    snapshot = write_snapshot(tmp_path, ["not json"] * 250)
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script])
    assert_bad_lines(code, err, snapshot, list(range(1, 101)))
    assert f"{snapshot}: 150 more bad lines were not planned either;" in err and decisions == []


def test_a_malformed_line_on_stdin_names_stdin(tmp_path, script):
    result = run_qrunner(["plan", "--queue-file", "-", "--script", script, "--format", "json"],
                         input=(json.dumps(record("A")) + "\nnot json\n").encode())
    assert result.returncode == 65
    assert [d["queue_id"] for d in json.loads(result.stdout)["decisions"]] == ["A"]
    assert b"<stdin>:2: not valid JSON" in result.stderr and b"Traceback" not in result.stderr


def test_a_missing_snapshot_exits_66(capsys, tmp_path, script):
    missing = tmp_path / "no-such-queue.jsonl"
    code, out, err = run_cli(capsys, ["plan", "--queue-file", missing, "--script", script])
    assert_failed(code, out, err, 66, str(missing))


def test_a_directory_as_snapshot_exits_66(capsys, tmp_path, script):
    code, out, err = run_cli(capsys, ["plan", "--queue-file", tmp_path, "--script", script])
    assert_failed(code, out, err, 66, str(tmp_path))


LOAD_FAILURES = {
    "syntax": ("function CheckFile(f, a)\n  return a\nend\n\nlocal x = = 1\n", ["relayout.lua:5:"]),
    "no_checkfile": ("function Checkfile(f, a) return a end\n", ["CheckFile"]),
    "top_level_error": ("function CheckFile(f, a) return a end\nlocal t = nil\nprint(t.x)\n", ["relayout.lua:3:"]),
    "start_error": ("function CheckFile(f, a) return a end\nfunction Start()\n\n error('no start')\nend\n",
                    ["no start", "relayout.lua:4:", "Start()"]),
    "start_timeout": ("function CheckFile(f, a) return a end\nfunction Start() while true do end end\n",
                      ["Start()", "did not finish"]),
}


@pytest.mark.parametrize("command", ["plan", "check"])
@pytest.mark.parametrize("kind", sorted(LOAD_FAILURES))
def test_a_script_that_does_not_load_exits_78_with_nothing_on_stdout(capsys, tmp_path, command, kind):
    text, fragments = LOAD_FAILURES[kind]
    script = write_script(tmp_path, text)
    config = tmp_path / "qrunner.toml"
    config.write_text("script_timeout = 0.3\n")
    snapshot = write_snapshot(tmp_path, [record("A"), record("B", arrival=2)])
    code, out, err = run_cli(capsys, ["--config", config, command, "--queue-file", snapshot, "--script", script])
    assert_failed(code, out, err, 78, str(script), *fragments)


def test_a_missing_script_exits_78(capsys, tmp_path):
    snapshot = write_snapshot(tmp_path, [record("A")])
    missing = tmp_path / "missing.lua"
    for command in ("plan", "check"):
        code, out, err = run_cli(capsys, [command, "--queue-file", snapshot, "--script", missing])
        assert_failed(code, out, err, 78, str(missing), "not found")


def test_the_default_script_path_is_used_without_script(capsys, tmp_path):
    if os.path.exists("/etc/qrunner/relayout.lua"):
        pytest.skip("a policy is installed at the default path on this machine")
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot])
    assert_failed(code, out, err, 78, "/etc/qrunner/relayout.lua")


def test_load_failure_in_a_real_process_prints_nothing_on_stdout(tmp_path):
    script = write_script(tmp_path, "function CheckFile(f, a)\n  if then\nend\n")
    snapshot = write_snapshot(tmp_path, [record("A")])
    result = run_qrunner(["plan", "--queue-file", snapshot, "--script", script, "--format", "json"])
    assert result.returncode == 78 and result.stdout == b""
    assert b"relayout.lua:2:" in result.stderr and b"Traceback" not in result.stderr


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, ["plan", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code in ("64", "65", "66", "75", "78"):
        assert f"  {code} " in out


# -- check ---------------------------------------------------------------------------


def test_check_without_a_snapshot_reports_the_script_loads(capsys, tmp_path):
    script = write_script(tmp_path, BY_SENDER)
    code, out, err = run_cli(capsys, ["check", "--script", script, "--sender", "0:a", "--sender", "1:b"])
    assert code == 0
    assert str(script) in out and "loads" in out and "0:a" in out and "1:b" in out


def test_check_loads_every_sender(capsys, tmp_path):
    script = write_script(tmp_path, "if senderid == 1 then error('sender one cannot load') end\n"
                                    "function CheckFile(f, a) return a end\n")
    code, out, err = run_cli(capsys, ["check", "--script", script, "--sender", "0:a", "--sender", "1:b"])
    assert_failed(code, out, err, 78, "sender one cannot load")


def test_check_with_a_snapshot_lists_per_message_errors(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record("FINE", arrival=1, filename="40"),
                                         record("BROKEN", arrival=2, filename="error"),
                                         record("HELD", arrival=3, filename="skip")])
    code, out, err = run_cli(capsys, ["check", "--queue-file", snapshot, "--script", script])
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("BROKEN: ") and "broken on purpose" in lines[0] and "relayout.lua:5:" in lines[0]
    assert "3 messages checked, 1 with policy errors" in lines[1]


def test_check_with_a_clean_snapshot_exits_0(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record("FINE", arrival=1, filename="40"), record("HELD", filename="skip")])
    code, out, err = run_cli(capsys, ["check", "--queue-file", snapshot, "--script", script])
    assert code == 0
    assert out.splitlines() == [f"{script}: 2 messages checked, 0 with policy errors"]


def test_check_with_a_bad_snapshot_exits_65_or_66(capsys, tmp_path, script):
    code, out, err = run_cli(capsys, ["check", "--queue-file", tmp_path / "absent", "--script", script])
    assert_failed(code, out, err, 66)
    bad = write_snapshot(tmp_path, ["{", record("FINE", filename="error")])
    code, out, err = run_cli(capsys, ["check", "--queue-file", bad, "--script", script])
    assert_bad_lines(code, err, bad, [1])
    assert out.startswith("FINE: ") and "1 messages checked, 1 with policy errors" in out  # the good line checked


def test_check_names_the_lua_version(capsys, tmp_path, script):
    code, out, err = run_cli(capsys, ["check", "--script", script, "--lua", "5.1"])
    assert code == 0 and "5.1" in out


@pytest.mark.parametrize("lua", ["5.1", "5.2", "5.3", "5.4", "5.5", "luajit"])
def test_plan_runs_on_the_chosen_lua(capsys, tmp_path, lua):
    script = write_script(tmp_path, "function CheckFile(f, a) a.SkipSend = true a.Reason = _VERSION "
                                    ".. (jit and ' jit' or '') return a end")
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, decisions, err = plan_json(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--lua", lua])
    assert code == 0
    expected = {"5.1": "Lua 5.1", "5.2": "Lua 5.2", "5.3": "Lua 5.3", "5.4": "Lua 5.4", "5.5": "Lua 5.5",
                "luajit": "Lua 5.1"}[lua]
    assert decisions[0]["reason"] == expected


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record(f"M{i}", arrival=i) for i in range(3000)])
    env = dict(os.environ, QRUNNER_CONFIG=os.devnull, PYTHONPATH=str(REPO_ROOT))
    pipeline = subprocess.run(
        f"{sys.executable} -m qrunner plan --queue-file {snapshot} --script {script} | head -1",
        shell=True, capture_output=True, env=env, timeout=120)
    assert pipeline.stdout.startswith(b"QUEUE ID")
    assert b"Traceback" not in pipeline.stderr and b"BrokenPipe" not in pipeline.stderr


def test_log_options_work_after_the_command_too(capsys, tmp_path, script):
    snapshot = write_snapshot(tmp_path, [record("A")])
    code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "-q"])
    assert code == 0 and "QUEUE ID" in out
