"""The policy engine through its API: DESIGN.md section 2, "The policy contract".

``PolicyEngine(PolicySettings(...)).decide(messages, senders)`` is the whole
job; each test writes a small script, runs it over a few messages and looks
at the decisions (and at what the engine logs).
"""

from __future__ import annotations

import time

import pytest

from policy_helpers import (BASE_ARRIVAL, DEFAULT, LUA_VERSIONS, by_id, decide, message, policy_log, set_tz,  # noqa: F401
                            settings)
from qrunner.config import Sender
from qrunner.exceptions import ScriptLoadError
from qrunner.plan import dispatch_order, held_in_arrival_order, report_order
from qrunner.policy import PolicyEngine

TWO = (Sender(0, "isp"), Sender(1, "backup"))
THREE = (Sender(0, "first"), Sender(1, "second"), Sender(2, "third"))

# Report every argument back through Reason, so one skip shows what the script saw.
ECHO_ARGUMENTS = r"""
function CheckFile(Filename, Actions, Size, CreationTime, ReturnPath, Recipients, HeaderData, HeaderLines)
  local parts = {}
  for i = 1, #Recipients do parts[#parts + 1] = Recipients[i] end
  Actions.SkipSend = true
  Actions.Reason = table.concat({
    type(Filename), Filename, type(Size), string.format("%d", Size), type(CreationTime), CreationTime,
    type(ReturnPath), ReturnPath, type(Recipients), tostring(#Recipients), tostring(Recipients[0]),
    table.concat(parts, ","), type(HeaderData), type(HeaderLines),
    type(Actions.SkipSend), tostring(Actions.Priority), "[" .. tostring(Actions.Reason) .. "]"}, "|")
  return Actions
end
"""

# Actions as given, read before the script changes them.
ECHO_ACTIONS = r"""
function CheckFile(f, a)
  local keys = {}
  for k in pairs(a) do keys[#keys + 1] = k end
  table.sort(keys)
  local seen = table.concat(keys, ",") .. "|" .. tostring(a.SkipSend) .. "|" .. tostring(a.Priority) .. "|[" .. a.Reason .. "]"
  a.SkipSend = true
  a.Reason = seen
  return a
end
"""


def fields(decision):
    return decision.reason.split("|")


# -- arguments -------------------------------------------------------------------


def test_arguments_have_the_documented_types_and_contents(tmp_path):
    m = message("Q1", size=123456, sender="alice@example.org", filename="/var/spool/postfix/deferred/Q/Q1",
                recipients=["bob@example.net", "carol@example.com", "dave@example.org"])
    (d,) = decide(tmp_path, ECHO_ARGUMENTS, [m])
    f = fields(d)
    assert f[0:2] == ["string", "/var/spool/postfix/deferred/Q/Q1"]
    assert f[2:4] == ["number", "123456"]
    assert f[4] == "string" and len(f[5]) == 14 and f[5].isdigit()
    assert f[6:8] == ["string", "alice@example.org"]
    # A list table, 1-based: # counts the recipients, [0] is nothing, order kept.
    assert f[8:12] == ["table", "3", "nil", "bob@example.net,carol@example.com,dave@example.org"]
    assert f[12:14] == ["table", "table"]


def test_actions_table_arrives_with_its_three_defaults(tmp_path):
    (d,) = decide(tmp_path, ECHO_ACTIONS, [message("Q1")])
    assert d.reason == "Priority,Reason,SkipSend|false|50|[]"


def test_filename_is_empty_when_not_known(tmp_path):
    (d,) = decide(tmp_path, ECHO_ARGUMENTS, [message("Q1", filename="")])
    assert fields(d)[0:2] == ["string", ""]


def test_return_path_is_empty_for_a_bounce(tmp_path):
    (d,) = decide(tmp_path, ECHO_ARGUMENTS, [message("Q1", sender="")])
    assert fields(d)[6:8] == ["string", ""]


def test_size_is_a_plain_number_the_script_can_compare(tmp_path):
    script = """
    function CheckFile(f, a, size)
      if size > 10000000 then a.SkipSend = true a.Reason = "big " .. (size + 1) end
      return a
    end"""
    big, small = message("BIG", size=10_000_001, arrival=1), message("SMALL", size=10_000_000, arrival=2)
    decisions = by_id(decide(tmp_path, script, [big, small]))
    assert decisions["BIG"].send is False and decisions["BIG"].reason == "big 10000002"
    assert decisions["SMALL"].send is True


@pytest.mark.parametrize("zone, expected", [
    ("UTC", "20251125055320"),
    ("America/New_York", "20251125005320"),  # UTC-5 in November
    ("Asia/Tokyo", "20251125145320"),  # UTC+9
])
def test_creation_time_is_the_arrival_in_the_local_time_zone(tmp_path, set_tz, zone, expected):
    set_tz(zone)
    (d,) = decide(tmp_path, ECHO_ARGUMENTS, [message("Q1", arrival=1_764_050_000)])  # 2025-11-25 05:53:20 UTC
    assert fields(d)[4:6] == ["string", expected]


def test_recipients_with_no_one_left_is_an_empty_list(tmp_path):
    (d,) = decide(tmp_path, ECHO_ARGUMENTS, [message("Q1", recipients=[])])
    assert fields(d)[8:12] == ["table", "0", "nil", ""]


# -- SkipSend ----------------------------------------------------------------------

# The script sets SkipSend to the Lua expression the message's filename holds.
SET_SKIP = """
function CheckFile(f, a)
  a.SkipSend = load("return " .. f)()
  a.Reason = "held by test"
  return a
end"""


@pytest.mark.parametrize("value, skipped", [
    ("1", True), ("true", True), ("-1", True), ("0.5", True), ("2", True), ("math.huge", True),
    ("0", False), ("false", False), ("nil", False),
])
def test_skipsend_values(tmp_path, value, skipped):
    (d,) = decide(tmp_path, SET_SKIP, [message("Q1", filename=value)])
    assert d.errors == ()
    assert d.send is (not skipped)
    assert d.action == ("skip" if skipped else "send")
    assert d.reason == ("held by test" if skipped else "")


@pytest.mark.parametrize("value, shown", [("0/0", "NaN"), ("'yes'", "string"), ("'1'", "string"), ("{}", "table"),
                                          ("print", "function")])
def test_skipsend_of_another_type_is_a_policy_error_and_holds(tmp_path, value, shown):
    (d,) = decide(tmp_path, SET_SKIP, [message("Q1", filename=value)])
    assert d.send is False
    assert len(d.errors) == 1 and "SkipSend" in d.errors[0] and shown in d.errors[0]
    assert d.reason.startswith("policy error:") and "SkipSend" in d.reason


def test_skipsend_error_under_on_script_error_send_sends_at_50(tmp_path):
    (d,) = decide(tmp_path, SET_SKIP.replace("a.Reason", "a.Priority = 90 a.Reason"),
                  [message("Q1", filename="'yes'")], on_script_error="send")
    assert d.send is True and d.priority == 50
    assert d.sender == DEFAULT[0] and "SkipSend" in d.errors[0]


# -- what CheckFile returns -------------------------------------------------------


def test_returning_nothing_uses_the_mutated_actions(tmp_path):
    script = 'function CheckFile(f, a) a.SkipSend = 1 a.Priority = 80 a.Reason = "mutated" end'
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.reason, d.errors) == (False, "mutated", ())
    script = 'function CheckFile(f, a) a.Priority = 80 end'
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.priority) == (True, 80)


def test_returning_the_same_table(tmp_path):
    script = 'function CheckFile(f, a) a.Priority = 77 return a end'
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.priority, d.errors) == (True, 77, ())


def test_returning_a_new_table_is_used_instead_of_actions(tmp_path):
    script = 'function CheckFile(f, a) a.SkipSend = true a.Reason = "old" return {SkipSend = false, Priority = 90} end'
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.priority, d.reason) == (True, 90, "")


@pytest.mark.parametrize("returned, send, priority, reason", [
    ("{}", True, 50, ""),
    ("{Priority = 20}", True, 20, ""),
    ("{SkipSend = true}", False, 50, "skipped by sender default, no reason given"),
    ("{SkipSend = 1, Reason = 'night only'}", False, 50, "night only"),
])
def test_a_new_tables_missing_fields_take_their_defaults(tmp_path, returned, send, priority, reason):
    script = "function CheckFile(f, a) a.Priority = 99 a.Reason = 'from actions' return %s end" % returned
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.priority, d.reason, d.errors) == (send, priority, reason, ())


@pytest.mark.parametrize("returned, kind", [("5", "number"), ("'send'", "string"), ("false", "boolean"),
                                            ("true", "boolean"), ("print", "function")])
def test_returning_a_non_table_is_a_policy_error(tmp_path, returned, kind):
    script = "function CheckFile(f, a) return %s end" % returned
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.send is False
    assert len(d.errors) == 1 and kind in d.errors[0]


# -- Priority ---------------------------------------------------------------------

SET_PRIORITY = """
function CheckFile(f, a)
  a.Priority = load("return " .. f)()
  return a
end"""


def test_priority_defaults_to_50(tmp_path):
    (d,) = decide(tmp_path, "function CheckFile(f, a) return a end", [message("Q1")])
    assert (d.send, d.priority) == (True, 50)
    (d,) = decide(tmp_path, "function CheckFile(f, a) a.Priority = nil return a end", [message("Q1")])
    assert (d.send, d.priority, d.errors) == (True, 50, ())


@pytest.mark.parametrize("value, expected, clamped", [
    ("1", 1, False), ("100", 100, False), ("64", 64, False), ("7.9", 7, False), ("99.99", 99, False),
    ("150", 100, True), ("0", 1, True), ("-5", 1, True), ("-math.huge", 1, True), ("math.huge", 100, True),
    ("100.5", 100, True),
])
def test_priority_is_clamped_and_rounded_down(tmp_path, policy_log, value, expected, clamped):
    (d,) = decide(tmp_path, SET_PRIORITY, [message("Q1", filename=value)])
    assert (d.send, d.priority, d.errors) == (True, expected, ())
    warnings = [line for line in policy_log.lines if "clamped" in line]
    if clamped:
        assert len(warnings) == 1 and "Q1" in warnings[0] and f"clamped to {expected}" in warnings[0]
    else:
        assert warnings == []


@pytest.mark.parametrize("value", ["0/0", "'x'", "'50'", "{}", "true"])
def test_priority_that_is_not_a_number_is_a_policy_error(tmp_path, value):
    (d,) = decide(tmp_path, SET_PRIORITY, [message("Q1", filename=value)])
    assert d.send is False
    assert len(d.errors) == 1 and "Priority" in d.errors[0]


def test_priority_not_a_number_is_an_error_even_when_skipped(tmp_path):
    script = "function CheckFile(f, a) a.SkipSend = true a.Reason = 'later' a.Priority = 'x' return a end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.send is False
    assert len(d.errors) == 1 and "Priority" in d.errors[0]
    assert "policy error" in d.reason


# -- Reason -----------------------------------------------------------------------


def test_reason_is_kept_only_for_a_skip(tmp_path):
    script = "function CheckFile(f, a) a.Reason = 'unused' return a end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.reason) == (True, "")


def test_a_numeric_reason_becomes_a_string(tmp_path):
    script = "function CheckFile(f, a) a.SkipSend = true a.Reason = 42 return a end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert (d.send, d.reason, d.errors) == (False, "42", ())


@pytest.mark.parametrize("value", ["{}", "true", "print"])
def test_a_reason_of_another_type_is_a_policy_error(tmp_path, value):
    script = "function CheckFile(f, a) a.SkipSend = true a.Reason = %s return a end" % value
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.send is False
    assert len(d.errors) == 1 and "Reason" in d.errors[0]


@pytest.mark.parametrize("reason", ["nil", "''"])
def test_a_skip_without_a_reason_names_the_sender(tmp_path, reason):
    script = "function CheckFile(f, a) a.SkipSend = 1 a.Reason = %s return a end" % reason
    (d,) = decide(tmp_path, script, [message("Q1")], senders=[Sender(3, "nightly")])
    assert d.reason == "skipped by sender nightly, no reason given"


# -- runtime errors ------------------------------------------------------------------


def test_a_runtime_error_holds_that_message_only(tmp_path, policy_log):
    script = """
    function CheckFile(f, a, size)
      if size == 666 then error("cannot judge this one") end
      if size == 667 then local t = nil; return t.field end
      a.Priority = 70
      return a
    end"""
    ms = [message("OK1", arrival=1), message("BAD", arrival=2, size=666), message("NIL", arrival=3, size=667),
          message("OK2", arrival=4)]
    decisions = by_id(decide(tmp_path, script, ms))
    assert [decisions[q].send for q in ("OK1", "BAD", "NIL", "OK2")] == [True, False, False, True]
    assert decisions["OK1"].priority == decisions["OK2"].priority == 70
    bad = decisions["BAD"]
    assert "cannot judge this one" in bad.errors[0] and "relayout.lua:3:" in bad.errors[0]
    assert bad.reason.startswith("policy error:") and "cannot judge this one" in bad.reason
    assert decisions["NIL"].errors and "relayout.lua:4:" in decisions["NIL"].errors[0]
    assert any("BAD" in line and "cannot judge this one" in line for line in policy_log.lines)


def test_a_runtime_error_under_on_script_error_send_sends_at_50(tmp_path):
    script = "function CheckFile(f, a) a.Priority = 90 error('boom') end"
    (d,) = decide(tmp_path, script, [message("Q1")], on_script_error="send")
    assert (d.send, d.priority, d.sender) == (True, 50, DEFAULT[0])
    assert "boom" in d.errors[0] and d.reason == ""


def test_an_error_with_a_table_value_is_still_a_policy_error(tmp_path):
    script = "function CheckFile(f, a) error({code = 1}) end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.send is False and "table" in d.errors[0]


# -- globals, Start(), print --------------------------------------------------------


def test_senderid_and_sendername_are_set_before_the_top_level_runs(tmp_path):
    script = """
    local seen = type(senderid) .. ":" .. tostring(senderid) .. ":" .. type(sendername) .. ":" .. tostring(sendername)
    function CheckFile(f, a)
      a.SkipSend = true
      a.Reason = seen .. "/" .. senderid .. ":" .. sendername
      return a
    end"""
    (d,) = decide(tmp_path, script, [message("Q1")], senders=TWO)
    assert d.reason == "isp: number:0:string:isp/0:isp; backup: number:1:string:backup/1:backup"


def test_each_sender_has_its_own_lua_state_and_globals_persist_within_a_pass(tmp_path):
    script = """
    calls = 0
    function CheckFile(f, a)
      calls = calls + 1
      if other_sender_was_here then error("state shared between senders") end
      mine = sendername
      a.SkipSend = true
      a.Reason = tostring(calls)
      return a
    end
    other_sender_was_here = (mine ~= nil)
    """
    ms = [message(f"Q{i}", arrival=BASE_ARRIVAL + i) for i in range(4)]
    decisions = decide(tmp_path, script, ms, senders=TWO)
    assert [d.reason for d in decisions] == [f"isp: {i}; backup: {i}" for i in range(1, 5)]
    assert all(d.errors == () for d in decisions)


def test_start_runs_once_per_sender_before_the_first_checkfile(tmp_path):
    script = """
    starts, calls, order = 0, 0, ""
    function Start()
      starts = starts + 1
      order = order .. "S(" .. sendername .. ")"
    end
    function CheckFile(f, a)
      calls = calls + 1
      order = order .. "C"
      a.SkipSend = true
      a.Reason = starts .. " " .. order
      return a
    end"""
    ms = [message("A", arrival=1), message("B", arrival=2), message("C", arrival=3)]
    decisions = decide(tmp_path, script, ms, senders=TWO)
    assert [d.reason for d in decisions] == [
        "isp: 1 S(isp)C; backup: 1 S(backup)C",
        "isp: 1 S(isp)CC; backup: 1 S(backup)CC",
        "isp: 1 S(isp)CCC; backup: 1 S(backup)CCC",
    ]


def test_print_goes_to_the_log(tmp_path, policy_log):
    script = """
    print("top level", senderid)
    function Start() print("start of", sendername) end
    function CheckFile(f, a, size) print("checking", size, nil, true) return a end"""
    decide(tmp_path, script, [message("Q42", size=1234)])
    text = policy_log.text
    assert "top level\t0" in text
    assert "start of\tdefault" in text
    line = next(line for line in policy_log.lines if "checking" in line)
    assert "Q42" in line and "checking\t1234\tnil\ttrue" in line


def test_an_endless_print_loop_is_cut_short_in_the_log(tmp_path, policy_log):
    script = "function CheckFile(f, a) for i = 1, 5000 do print('line', i) end return a end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.send is True
    printed = [line for line in policy_log.lines if "line\t" in line]
    assert 0 < len(printed) < 5000
    assert any("suppressed" in line for line in printed)


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_print_of_many_lines_counts_each_line_and_none_passes_for_qrunners_own(tmp_path, figures, policy_log, lua):
    """One print with thousands of embedded newlines: each line counts towards the cap, each is logged on its
    own and marked as the script's, and a control character is shown, not written."""
    script = r"""function CheckFile(f, a)
      print(string.rep("Q1: action=send sender=default priority=50\n", 5000) .. "bell\7 and\r return")
      return a end"""
    (d,) = decide(tmp_path, script, [message("Q1")], lua=lua)
    assert d.send is True
    forged = [line for line in policy_log.lines if "action=send" in line]
    assert 0 < len(forged) <= 200 and all("\n" not in line for line in policy_log.lines)
    assert all(line.startswith("Q1: script (sender default): ") for line in forged)
    assert "suppressed" in forged[-1]
    figures.record("inputs", f"a print of many lines, Lua {lua}", tried=1, survived=1)


@pytest.mark.reliability
def test_control_characters_of_the_last_printed_line_are_shown_not_written(tmp_path, figures, policy_log):
    script = r"""function CheckFile(f, a) print("bell\7 and\r return\27[2J") return a end"""
    decide(tmp_path, script, [message("Q1")])
    [line] = [line for line in policy_log.lines if "bell" in line]
    assert line == "Q1: script (sender default): bell? and? return?[2J"
    figures.record("inputs", "control characters in a printed line", tried=1, survived=1)


@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_script_with_a_bom_and_a_first_hash_line_loads_as_lua_loads_it(tmp_path, figures, lua):
    script = "\ufeff#!/usr/bin/lua\nfunction CheckFile(f, a) a.Priority = 77 return a end\n"
    (d,) = decide(tmp_path, script, [message("Q1")], lua=lua)
    assert (d.send, d.priority) == (True, 77)
    broken = "#!/usr/bin/lua\n\nfunction CheckFile(f, a) return a +\n"
    with pytest.raises(ScriptLoadError) as info:
        decide(tmp_path, broken, [message("Q1")], lua=lua)
    assert "relayout.lua:4:" in info.value.message  # the file's own line numbers, the # line counted
    figures.record("inputs", f"a script with a BOM and a first # line, Lua {lua}", tried=1, survived=1)


@pytest.mark.reliability
def test_a_compiled_chunk_is_refused_naming_the_file(tmp_path, figures):
    script = tmp_path / "relayout.luac"
    script.write_bytes(b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08")
    with pytest.raises(ScriptLoadError) as info:
        with PolicyEngine(settings(script)) as engine:
            engine.decide([message("Q1")], DEFAULT)
    assert info.value.message.startswith(f"{script}: is compiled Lua") and ".lua source" in info.value.message
    figures.record("inputs", "a compiled (luac) script", tried=1, survived=1)


# -- arrival order, several senders -------------------------------------------------


def test_messages_are_offered_oldest_first(tmp_path):
    script = """
    seen = {}
    function CheckFile(f, a)
      seen[#seen + 1] = f
      a.SkipSend = true
      a.Reason = table.concat(seen, ",")
      return a
    end"""
    ms = [message("C", arrival=300, filename="c"), message("A", arrival=100, filename="a"),
          message("D", arrival=400, filename="d"), message("B", arrival=200, filename="b")]
    decisions = decide(tmp_path, script, ms)
    assert [d.queue_id for d in decisions] == ["A", "B", "C", "D"]
    assert decisions[-1].reason == "a,b,c,d"


def test_later_senders_see_only_what_the_earlier_ones_skipped(tmp_path):
    script = """
    seen = {}
    function CheckFile(f, a, size)
      seen[#seen + 1] = f
      if senderid == 0 and size > 100 then a.SkipSend = true a.Reason = "too big for " .. sendername end
      if senderid == 1 and size > 200 then a.SkipSend = true a.Reason = "also too big, saw " .. table.concat(seen, ",") end
      if senderid == 2 then a.SkipSend = 1 end
      a.Priority = 10 + senderid
      return a
    end"""
    ms = [message("SMALL", arrival=1, size=50, filename="small"),
          message("MID", arrival=2, size=150, filename="mid"),
          message("HUGE", arrival=3, size=500, filename="huge")]
    decisions = by_id(decide(tmp_path, script, ms, senders=THREE))
    small, mid, huge = decisions["SMALL"], decisions["MID"], decisions["HUGE"]
    assert (small.send, small.sender.name, small.priority) == (True, "first", 10)
    assert (mid.send, mid.sender.name, mid.priority) == (True, "second", 11)
    assert (huge.send, huge.sender) == (False, None)
    assert huge.reason == ("first: too big for first; second: also too big, saw mid,huge; "
                           "third: skipped by sender third, no reason given")
    assert [v.sender.name for v in huge.verdicts] == ["first", "second", "third"]
    assert [v.sender.name for v in small.verdicts] == ["first"]


def test_one_sender_reasons_have_no_prefix(tmp_path):
    script = "function CheckFile(f, a) a.SkipSend = true a.Reason = 'wait' return a end"
    (d,) = decide(tmp_path, script, [message("Q1")])
    assert d.reason == "wait"


def test_a_policy_error_counts_as_a_skip_for_the_next_sender_under_skip(tmp_path):
    script = """
    function CheckFile(f, a)
      if senderid == 0 then error("isp cannot say") end
      a.Priority = 80
      return a
    end"""
    (d,) = decide(tmp_path, script, [message("Q1")], senders=TWO)
    assert (d.send, d.sender.name, d.priority) == (True, "backup", 80)
    assert len(d.errors) == 1 and d.errors[0].startswith("isp: ") and "isp cannot say" in d.errors[0]


def test_a_policy_error_in_every_sender_holds_with_every_reason(tmp_path):
    script = "function CheckFile(f, a) error('broken for ' .. sendername) end"
    (d,) = decide(tmp_path, script, [message("Q1")], senders=TWO)
    assert (d.send, d.sender) == (False, None)
    assert d.reason.startswith("isp: policy error:") and "; backup: policy error:" in d.reason
    assert "broken for isp" in d.errors[0] and "broken for backup" in d.errors[1]


def test_under_on_script_error_send_the_failing_sender_sends_at_50(tmp_path):
    script = """
    seen = 0
    function CheckFile(f, a)
      seen = seen + 1
      if senderid == 0 then a.Priority = 99 error("isp cannot say") end
      a.SkipSend = true
      a.Reason = "backup saw " .. seen
      return a
    end"""
    (d,) = decide(tmp_path, script, [message("Q1")], senders=TWO, on_script_error="send")
    assert (d.send, d.sender.name, d.priority) == (True, "isp", 50)
    assert [v.sender.name for v in d.verdicts] == ["isp"]  # backup never saw it
    assert "isp cannot say" in d.errors[0]


# -- dispatch order ----------------------------------------------------------------


def test_dispatch_order_is_priority_then_arrival_then_queue_id(tmp_path):
    script = """
    function CheckFile(f, a)
      if f == "skip" then a.SkipSend = true a.Reason = "no" return a end
      a.Priority = tonumber(f)
      return a
    end"""
    ms = [
        message("E", arrival=500, filename="50"),
        message("B", arrival=200, filename="90"),
        message("Z", arrival=100, filename="50"),
        message("H2", arrival=700, filename="skip"),
        message("D", arrival=300, filename="50"),
        message("C", arrival=300, filename="50"),
        message("H1", arrival=50, filename="skip"),
        message("L", arrival=10, filename="1"),
        message("T", arrival=900, filename="100"),
    ]
    decisions = decide(tmp_path, script, ms)
    assert [d.queue_id for d in dispatch_order(decisions)] == ["T", "B", "Z", "C", "D", "E", "L"]
    assert [d.queue_id for d in held_in_arrival_order(decisions)] == ["H1", "H2"]
    assert [d.queue_id for d in report_order(decisions)] == ["T", "B", "Z", "C", "D", "E", "L", "H1", "H2"]


# -- the globals of later VPOP3 versions ------------------------------------------

LATER_VPOP3 = """
local defaults = table.concat({tostring(UseBATV), tostring(MaxMessagesPerConnection),
  tostring(MaxRecipientsPerConnection), tostring(MaxRecipientsPerMessage), "[" .. tostring(ConnectedServer) .. "]"}, ",")
UseBATV = true
MaxMessagesPerConnection = 10
MaxRecipientsPerConnection = 100
MaxRecipientsPerMessage = 50
function ServerConnected() error("ServerConnected must never be called") end
function ReturnCodeHandler(LastCommand, FullResponse, LastLine) error("ReturnCodeHandler must never be called") end
function CheckFile(f, a)
  MaxMessagesPerConnection = MaxMessagesPerConnection + 1
  a.SkipSend = true
  a.Reason = defaults .. "|" .. MaxMessagesPerConnection
  return a
end
"""


def test_later_vpop3_globals_exist_with_defaults_and_can_be_set(tmp_path):
    ms = [message("A", arrival=1), message("B", arrival=2)]
    decisions = decide(tmp_path, LATER_VPOP3, ms, senders=TWO)
    assert decisions[0].reason == "isp: false,0,0,0,[]|11; backup: false,0,0,0,[]|11"
    assert decisions[1].reason == "isp: false,0,0,0,[]|12; backup: false,0,0,0,[]|12"
    assert all(d.errors == () for d in decisions)  # the two functions were never called


def test_later_vpop3_extras_are_logged_once_per_run(tmp_path, policy_log):
    ms = [message("A", arrival=1), message("B", arrival=2), message("C", arrival=3)]
    decide(tmp_path, LATER_VPOP3, ms, senders=TWO)
    for name in ("UseBATV", "MaxMessagesPerConnection", "MaxRecipientsPerConnection", "MaxRecipientsPerMessage",
                 "ServerConnected", "ReturnCodeHandler"):
        mentions = [line for line in policy_log.lines if f"VPOP3's {name}," in line]
        assert len(mentions) == 1, (name, policy_log.lines)
    assert "smtp_destination_recipient_limit" in policy_log.text
    assert "connection_max_messages" in policy_log.text


def test_a_script_without_later_vpop3_features_logs_none(tmp_path, policy_log):
    decide(tmp_path, "function CheckFile(f, a) return a end", [message("A")], senders=TWO)
    assert "VPOP3's" not in policy_log.text


# -- the clock: --now --------------------------------------------------------------

CLOCK = """
function CheckFile(f, a)
  a.SkipSend = true
  a.Reason = table.concat({tostring(os.time()), os.date("%Y-%m-%d %H:%M:%S"), tostring(os.date("*t").hour),
    tostring(os.time({year = 2000, month = 1, day = 1, hour = 12})), os.date("%Y-%m-%d %H:%M", 86400)}, "|")
  return a
end"""


def test_now_fixes_the_clock_of_calls_without_a_time_argument(tmp_path, set_tz):
    set_tz("Europe/Berlin")
    now = int(time.mktime((2026, 11, 25, 9, 0, 0, 0, 0, -1)))
    (d,) = decide(tmp_path, CLOCK, [message("Q1")], now=now)
    real_2000 = int(time.mktime((2000, 1, 1, 12, 0, 0, 0, 0, -1)))
    assert d.reason.split("|") == [str(now), "2026-11-25 09:00:00", "9", str(real_2000), "1970-01-02 01:00"]


def test_without_now_the_script_sees_the_real_clock(tmp_path):
    before = time.time()
    (d,) = decide(tmp_path, CLOCK, [message("Q1")])
    after = time.time()
    seen = int(d.reason.split("|")[0])
    assert int(before) - 1 <= seen <= after + 1


# -- load failures --------------------------------------------------------------------


def load_error(tmp_path, script_text, **overrides) -> str:
    with pytest.raises(ScriptLoadError) as info:
        decide(tmp_path, script_text, [message("Q1")], **overrides)
    assert info.value.exit_code == 78
    return info.value.message


def test_syntax_error_names_the_file_and_line(tmp_path):
    text = load_error(tmp_path, "function CheckFile(f, a)\n  return a\n  if then\nend\n")
    assert "relayout.lua:3:" in text


def test_a_script_without_checkfile_does_not_load(tmp_path):
    text = load_error(tmp_path, "function checkfile(f, a) return a end\n")
    assert "CheckFile" in text


def test_checkfile_that_is_not_a_function_does_not_load(tmp_path):
    text = load_error(tmp_path, "CheckFile = 5\n")
    assert "CheckFile" in text


def test_an_error_in_the_top_level_does_not_load(tmp_path):
    text = load_error(tmp_path, "function CheckFile(f, a) return a end\n\nerror('top level broke')\n")
    assert "top level broke" in text and "relayout.lua:3:" in text


def test_an_error_in_start_does_not_load(tmp_path):
    text = load_error(tmp_path, "function CheckFile(f, a) return a end\nfunction Start()\n error('start broke')\nend\n")
    assert "start broke" in text and "Start()" in text and "relayout.lua:3:" in text


def test_a_loop_in_start_does_not_load(tmp_path):
    text = load_error(tmp_path, "function CheckFile(f, a) return a end\nfunction Start() while true do end end\n")
    assert "Start()" in text and "0.5 s" in text


def test_a_loop_in_the_top_level_does_not_load(tmp_path):
    text = load_error(tmp_path, "function CheckFile(f, a) return a end\nwhile true do end\n")
    assert "did not finish" in text


def test_a_missing_script_does_not_load(tmp_path):
    missing = tmp_path / "nowhere.lua"
    with pytest.raises(ScriptLoadError) as info:
        PolicyEngine(settings(missing))
    assert str(missing) in info.value.message and "not found" in info.value.message


def test_an_unreadable_script_does_not_load(tmp_path):
    with pytest.raises(ScriptLoadError) as info:
        PolicyEngine(settings(tmp_path))  # a directory
    assert str(tmp_path) in info.value.message


def test_a_load_failure_for_a_later_sender_names_it(tmp_path):
    script = "if senderid == 1 then error('no backup here') end function CheckFile(f, a) a.SkipSend = 1 return a end"
    text = load_error(tmp_path, script, senders=TWO)
    assert "no backup here" in text and "backup" in text


def test_no_start_function_is_fine(tmp_path):
    (d,) = decide(tmp_path, "function CheckFile(f, a) return a end", [message("Q1")])
    assert d.send is True


def test_a_script_that_replaces_checkfile_mid_pass(tmp_path):
    script = "function CheckFile(f, a) CheckFile = nil return a end"
    first, second = decide(tmp_path, script, [message("A", arrival=1), message("B", arrival=2)])
    assert first.send is True and first.errors == ()
    assert second.send is False and "CheckFile" in second.errors[0]


def test_an_empty_queue_decides_nothing_but_still_loads(tmp_path):
    assert decide(tmp_path, "function CheckFile(f, a) return a end", []) == []
    load_error(tmp_path, "syntax error here")



@pytest.mark.reliability
@pytest.mark.parametrize("lua", LUA_VERSIONS)
@pytest.mark.parametrize("tostring", ['error("no string for you")', "return {}"])
def test_an_error_object_whose_tostring_fails_is_a_policy_error_not_a_dead_worker(tmp_path, figures, policy_log, lua,
                                                                                    tostring):
    script = ("function CheckFile(f, a) if f == 'BAD' then error(setmetatable({}, {__tostring = function() "
              + tostring + " end})) end return a end")
    bad, after = decide(tmp_path, script, [message("BAD", arrival=1, filename="BAD"), message("AFTER", arrival=2)],
                        lua=lua)
    assert bad.errors == ("error object of type table: (its __tostring failed)",)
    assert after.send is True and after.errors == ()
    assert "worker died" not in policy_log.text and "fresh state" not in policy_log.text
    figures.record("inputs", f"an error object whose __tostring fails, Lua {lua}", tried=1, survived=1)
