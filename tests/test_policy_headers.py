"""HeaderData and HeaderLines: contents, case rules, iteration on every Lua, laziness.

DESIGN.md section 2: HeaderData maps name -> value (first occurrence wins,
case-insensitive lookup, names as written under pairs(), values unfolded and
stripped); HeaderLines holds the raw fields, continuation lines joined by
"\\n". Headers are read only when the script first touches either table.
"""

from __future__ import annotations

import pytest

from policy_helpers import (LUA_VERSIONS, RecordingHeaders, by_id, decide, message, reads,  # noqa: F401
                            worker_imports_tests)

# Lua versions whose tables honour __len/__pairs: there the headers are read
# only on first touch. On 5.1, 5.2 and LuaJIT qrunner reads them before each
# call (DESIGN.md "Lua facts"), so only correctness is checked there.
LAZY_VERSIONS = ("5.3", "5.4", "5.5")

HEADERS = [
    "Received: from a.example.org\n\tby b.example.net; Tue, 25 Nov 2025 05:53:20 +0000",
    "Subject:   Quarterly report  ",
    "From: Alice <alice@example.org>",
    "X-Long: part one\n\tpart two\n  part three   ",
    "SUBJECT: a second subject",
    "x-mailer: Mutt",
    "this line is not a header field",
    "To:bob@example.net",
]


def run(tmp_path, body, headers=HEADERS, lua="5.4"):
    script = "function CheckFile(f, a, s, c, r, rc, HeaderData, HeaderLines)\n%s\n a.SkipSend = true return a end" % body
    (d,) = decide(tmp_path, script, [message("Q1", headers=headers)], lua=lua)
    assert d.errors == (), d.errors
    return d.reason


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headerdata_lookup_is_case_insensitive_and_first_occurrence_wins(tmp_path, lua):
    reason = run(tmp_path, """
      a.Reason = table.concat({HeaderData.subject, HeaderData["Subject"], HeaderData["SUBJECT"],
        HeaderData["sUbJeCt"], HeaderData["X-Mailer"], HeaderData.from, tostring(HeaderData.missing),
        tostring(HeaderData[1])}, "|")""", lua=lua)
    assert reason == "Quarterly report|Quarterly report|Quarterly report|Quarterly report|Mutt|" \
                     "Alice <alice@example.org>|nil|nil"


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headerdata_values_are_unfolded_and_stripped(tmp_path, lua):
    reason = run(tmp_path, """
      a.Reason = table.concat({"[" .. HeaderData["X-Long"] .. "]", "[" .. HeaderData.received .. "]",
        "[" .. HeaderData.to .. "]"}, "|")""", lua=lua)
    assert reason == ("[part one\tpart two  part three]|"
                      "[from a.example.org\tby b.example.net; Tue, 25 Nov 2025 05:53:20 +0000]|"
                      "[bob@example.net]")


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headerdata_pairs_yields_names_as_written(tmp_path, lua):
    reason = run(tmp_path, """
      local names = {}
      for k, v in pairs(HeaderData) do names[#names + 1] = k .. "=" .. v end
      table.sort(names)
      a.Reason = table.concat(names, "|")""", lua=lua)
    assert reason.split("|") == sorted([
        "Received=from a.example.org\tby b.example.net; Tue, 25 Nov 2025 05:53:20 +0000",
        "Subject=Quarterly report", "From=Alice <alice@example.org>", "X-Long=part one\tpart two  part three",
        "x-mailer=Mutt", "To=bob@example.net",
    ])


# Fields at the edges of the rules: blanks before the colon, names that are
# no names, empty and blank values, CR and LF in odd places, 8-bit names
# (compared in ASCII only), and long blank runs (the Lua side must stay
# linear: no hook stops a backtracking pattern inside C).
EDGE_FIELDS = [
    b"Name \t: spaced before the colon", b" Leading: space in the name", b"No colon here", b": no name",
    b"A\tB: tab in the name", b"Empty:", b"Blank: \t\r ", b"Crlf: one\r\n\ttwo\r\n three \t\r",
    b"Lone-Cr: a\rb\r", b"Cr-Cr-Lf: a\r\r\nb", b"Dup: first", b"DUP: second", b"dup: third",
    b"\xc4rger: eight-bit name", b"\xe4rger: another eight-bit name", b"Colons: a: b: c",
    b"Spaces: " + b" " * 100000 + b"x" + b" " * 100000, b"X-Trailing-Lf: value\n",
]


# What HeaderData holds for EDGE_FIELDS, by the rules the README gives: the
# first of each name wins (compared without case, ASCII only), values
# unfolded (CR LF and LF removed, a lone CR kept) and stripped of blanks.
EDGE_EXPECTED = {
    b"Name": b"spaced before the colon", b"Empty": b"", b"Blank": b"", b"Crlf": b"one\ttwo three",
    b"Lone-Cr": b"a\rb", b"Cr-Cr-Lf": b"a\rb", b"Dup": b"first", b"\xc4rger": b"eight-bit name",
    b"\xe4rger": b"another eight-bit name", b"Colons": b"a: b: c", b"Spaces": b"x", b"X-Trailing-Lf": b"value",
}


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headerdata_follows_the_rules_on_edge_fields(tmp_path, lua):
    reason = run(tmp_path, """
      local shown = {}
      for k, v in pairs(HeaderData) do shown[#shown + 1] = k .. "=[" .. HeaderData[k] .. "]" end
      a.Reason = table.concat(shown, "|")""", headers=EDGE_FIELDS, lua=lua)
    expected = [n.decode("utf-8", "replace") + "=[" + v.decode("utf-8", "replace") + "]"
                for n, v in EDGE_EXPECTED.items()]
    assert sorted(reason.split("|")) == sorted(expected)


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headerlines_are_the_raw_fields_in_order(tmp_path, lua):
    reason = run(tmp_path, """
      local out = {}
      for i = 1, #HeaderLines do out[i] = HeaderLines[i] end
      a.Reason = table.concat(out, "\\0")""", lua=lua)
    assert reason.split("\0") == HEADERS


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_both_tables_iterate_on_every_lua(tmp_path, lua):
    reason = run(tmp_path, """
      local n_ipairs, n_pairs, n_data = 0, 0, 0
      for i, line in ipairs(HeaderLines) do n_ipairs = n_ipairs + 1 end
      for k, line in pairs(HeaderLines) do n_pairs = n_pairs + 1 end
      for k, v in pairs(HeaderData) do n_data = n_data + 1 end
      local k1, v1 = next(HeaderLines)
      local dk = next(HeaderData)
      a.Reason = table.concat({#HeaderLines, n_ipairs, n_pairs, n_data, tostring(k1), v1:sub(1, 9),
        type(dk), table.concat(HeaderLines, "~"):len()}, "|")""", lua=lua)
    joined = len("~".join(HEADERS))
    assert reason == f"8|8|8|6|1|Received:|string|{joined}"


@pytest.mark.parametrize("lua", LUA_VERSIONS)
@pytest.mark.parametrize("first_touch", [
    "a.Reason = tostring(#HeaderLines)",
    "local n = 0 for _ in ipairs(HeaderLines) do n = n + 1 end a.Reason = tostring(n)",
    "local n = 0 for _ in pairs(HeaderLines) do n = n + 1 end a.Reason = tostring(n)",
    "local n, k = 0, next(HeaderLines) while k do n = n + 1 k = next(HeaderLines, k) end a.Reason = tostring(n)",
    "local n = 0 for _ in pairs(HeaderData) do n = n + 1 end a.Reason = tostring(n)",
    "a.Reason = tostring(next(HeaderData) ~= nil)",
    "a.Reason = HeaderData.subject",
    "a.Reason = HeaderLines[2]",
    "a.Reason = tostring(#table.concat(HeaderLines, '~'))",
])
def test_the_first_touch_of_either_table_sees_every_header(tmp_path, lua, first_touch):
    headers = ["Subject: hello", "X-Two: 2", "X-Three: 3"]
    reason = run(tmp_path, first_touch, headers=headers, lua=lua)
    assert reason in ("3", "true", "hello", "X-Two: 2", str(len("Subject: hello~X-Two: 2~X-Three: 3")))


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_fields_read_by_name_one_at_a_time_then_the_whole_table_give_what_one_look_gives(tmp_path, lua):
    """A read by name fills HeaderData only up to that field: later fields, earlier ones, the same field by
    another case, a missing name, then the whole table (pairs, next, rawget), and HeaderLines, all as if read
    at once; the second SUBJECT never wins."""
    reason = run(tmp_path, """
      local got = {HeaderData.subject, HeaderData.received, HeaderData.SUBJECT, tostring(HeaderData.nothing),
                   HeaderData["X-Mailer"], HeaderData.subject, rawget(HeaderData, "From"), rawget(HeaderData, "To")}
      local names = {}
      for k, v in pairs(HeaderData) do names[#names + 1] = k .. "=" .. v end
      table.sort(names)
      local n = 0 for _ in next, HeaderData do n = n + 1 end
      got[#got + 1] = table.concat(names, ";")
      got[#got + 1] = tostring(n)
      got[#got + 1] = tostring(#HeaderLines) .. ":" .. HeaderLines[5]
      a.Reason = table.concat(got, "|")""", lua=lua)
    received = "from a.example.org\tby b.example.net; Tue, 25 Nov 2025 05:53:20 +0000"
    fields = sorted([f"Received={received}", "Subject=Quarterly report", "From=Alice <alice@example.org>",
                     "X-Long=part one\tpart two  part three", "x-mailer=Mutt", "To=bob@example.net"])
    assert reason.split("|") == ["Quarterly report", received, "Quarterly report", "nil", "Mutt", "Quarterly report",
                                 "Alice <alice@example.org>", "bob@example.net", ";".join(fields), "6",
                                 "8:SUBJECT: a second subject"]


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_field_read_by_name_after_a_field_further_down_was_read_is_still_found(tmp_path, lua):
    reason = run(tmp_path, """
      a.Reason = table.concat({HeaderData.to, HeaderData.from, HeaderData["x-long"], tostring(HeaderData.missing),
                               HeaderData.Received ~= nil and "r" or "-"}, "|")""", lua=lua)
    assert reason == "bob@example.net|Alice <alice@example.org>|part one\tpart two  part three|nil|r"


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_what_a_script_writes_into_headerdata_stays_whatever_it_read_before_or_after(tmp_path, lua):
    """A field changed after a read by name, a field set before the table was filled, a field removed, a name
    of the script's own: none is undone when the table fills later (pairs)."""
    reason = run(tmp_path, """
      local f = HeaderData.from
      HeaderData.Subject = "[x] " .. HeaderData.subject
      HeaderData.To = nil
      HeaderData["X-Mine"] = "mine"
      local names = {}
      for k, v in pairs(HeaderData) do if k ~= "Received" and k ~= "X-Long" then names[#names + 1] = k .. "=" .. v end end
      table.sort(names)
      a.Reason = f .. "|" .. HeaderData.subject .. "|" .. tostring(HeaderData.to) .. "|" .. table.concat(names, ";")""",
                 lua=lua)
    assert reason == ("Alice <alice@example.org>|[x] Quarterly report|nil|From=Alice <alice@example.org>;"
                      "Subject=[x] Quarterly report;X-Mine=mine;x-mailer=Mutt")


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_field_the_script_sets_before_reading_it_keeps_the_scripts_value(tmp_path, lua):
    reason = run(tmp_path, """
      local before = HeaderData.from
      HeaderData.Subject = "mine"
      a.Reason = before .. "|" .. HeaderData.subject .. "|" .. HeaderData.SUBJECT""", lua=lua)
    assert reason == "Alice <alice@example.org>|mine|mine"


def test_outside_a_call_a_kept_header_table_asks_qrunner_for_nothing():
    """Lua may touch a kept table while no call is under way (a finalizer as the state closes): the parent is then
    waiting for another answer on the connection, so nothing is asked of it and the table is empty."""
    import mmap

    from qrunner import policy_worker

    sent, asked = [], []

    class Outbox:
        def send(self, message):
            sent.append(message)

    class Headers:
        def get(self, index):
            asked.append(index)
            return [b"Subject: asked"], None

    settings = {"lua": "5.4", "timeout": 2, "memory_mb": 16, "now": None, "sender_id": 0, "sender_name": "default",
                "script_text": b"function CheckFile(f, a, s, c, r, rc, h) kept = h return a end",
                "script_name": "kept.lua"}
    state = policy_worker._load(Outbox(), settings, mmap.mmap(-1, policy_worker.PROGRESS.size), Headers())
    assert state is not None, sent
    state.current_index = None
    assert len(state._fetch_headers(3)) == 0
    state.current_index, state.current_has_headers = 5, True
    assert state._fetch_headers(3)[1] == b"Subject: asked"  # within a call: an earlier message's, by its index
    assert asked == [3]


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_a_message_without_headers_gives_empty_tables(tmp_path, lua):
    reason = run(tmp_path, """
      local n = 0 for _ in pairs(HeaderData) do n = n + 1 end
      a.Reason = #HeaderLines .. "|" .. n .. "|" .. tostring(HeaderData.subject)""", headers=[], lua=lua)
    assert reason == "0|0|nil"


def test_headers_of_each_message_are_its_own(tmp_path):
    script = "function CheckFile(f, a, s, c, r, rc, hd, hl) a.SkipSend = 1 a.Reason = hd.subject .. '/' .. #hl return a end"
    ms = [message("A", arrival=1, headers=["Subject: first"]),
          message("B", arrival=2, headers=["Subject: second", "X-Other: x"]),
          message("C", arrival=3, headers=["Subject: third"])]
    decisions = by_id(decide(tmp_path, script, ms))
    assert [decisions[q].reason for q in "ABC"] == ["first/1", "second/2", "third/1"]


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_tables_a_script_keeps_from_an_earlier_call_hold_that_messages_headers(tmp_path, lua):
    """A script may keep a message's tables and look at them while deciding a later one (say, to compare
    subjects): untouched until then, they still fill with their own message's headers, not the later one's."""
    script = """
    local kept
    function CheckFile(f, a, s, c, r, rc, hd, hl)
      if kept == nil then kept = {hd, hl} a.Reason = 'kept' return a end
      a.SkipSend = 1
      a.Reason = tostring(kept[1].subject) .. '/' .. tostring(hd.subject) .. '/' .. tostring(kept[2][1]) .. '/' ..
                 tostring(kept[1]["X-Only-A"])
      return a
    end"""
    ms = [message("A", arrival=1, headers=["Subject: first", "X-Only-A: a"]),
          message("B", arrival=2, headers=["Subject: second"]),
          message("C", arrival=3, headers=["Subject: third"])]
    decisions = by_id(decide(tmp_path, script, ms, lua=lua))
    assert decisions["B"].reason == "first/second/Subject: first/a"
    assert decisions["C"].reason == "first/third/Subject: first/a"
    assert decisions["A"].errors == () and decisions["B"].errors == ()


def test_headers_with_8bit_bytes_reach_the_script_unchanged(tmp_path):
    script = "function CheckFile(f, a, s, c, r, rc, hd) a.SkipSend = 1 a.Reason = hd.subject .. '|' .. #hd.subject return a end"
    (d,) = decide(tmp_path, script, [message("A", headers=["Subject: Grüße".encode("utf-8")])])
    assert d.reason == "Grüße|7"


# -- laziness --------------------------------------------------------------------


@pytest.mark.parametrize("lua", LAZY_VERSIONS)
def test_headers_are_not_read_by_a_script_that_never_looks(tmp_path, worker_imports_tests, lua):
    log = tmp_path / "reads.log"
    script = "function CheckFile(f, a, size, c, r, rc, HeaderData, HeaderLines) a.Priority = 60 return a end"
    ms = [message(q, arrival=i, headers=RecordingHeaders(log, q, ["Subject: s"])) for i, q in enumerate("ABC")]
    decisions = decide(tmp_path, script, ms, lua=lua)
    assert [d.priority for d in decisions] == [60, 60, 60]
    assert reads(log) == []


@pytest.mark.parametrize("lua", LAZY_VERSIONS)
def test_headers_are_read_on_first_touch_only(tmp_path, worker_imports_tests, lua):
    log = tmp_path / "reads.log"
    script = """
    function CheckFile(f, a, size, c, r, rc, HeaderData, HeaderLines)
      if size > 1000 then
        a.SkipSend = true
        a.Reason = HeaderData.subject .. "/" .. HeaderData.Subject .. "/" .. #HeaderLines .. "/" .. HeaderLines[1]
      end
      return a
    end"""
    ms = [message("SMALL1", arrival=1, size=10, headers=RecordingHeaders(log, "SMALL1", ["Subject: a"])),
          message("BIG", arrival=2, size=5000, headers=RecordingHeaders(log, "BIG", ["Subject: big one"])),
          message("SMALL2", arrival=3, size=10, headers=RecordingHeaders(log, "SMALL2", ["Subject: c"]))]
    decisions = by_id(decide(tmp_path, script, ms, lua=lua))
    assert decisions["BIG"].reason == "big one/big one/1/Subject: big one"
    assert decisions["SMALL1"].send and decisions["SMALL2"].send
    assert reads(log) == ["BIG"]  # once, though touched four times


@pytest.mark.parametrize("lua", LUA_VERSIONS)
def test_headers_read_from_a_source_are_read_at_most_once_per_call(tmp_path, worker_imports_tests, lua):
    log = tmp_path / "reads.log"
    script = """
    function CheckFile(f, a, size, c, r, rc, HeaderData, HeaderLines)
      local n = 0
      for _ in pairs(HeaderData) do n = n + 1 end
      a.SkipSend = true
      a.Reason = HeaderData.subject .. "/" .. n .. "/" .. #HeaderLines
      return a
    end"""
    ms = [message("A", headers=RecordingHeaders(log, "A", ["Subject: one", "X-Two: two"]))]
    (d,) = decide(tmp_path, script, ms, lua=lua)
    assert d.reason == "one/2/2"
    assert reads(log) == ["A"]


@pytest.mark.parametrize("lua", ["5.4", "5.1"])
def test_a_script_reading_every_messages_headers_reads_each_once_and_sees_its_own(tmp_path, lua):
    """Headers travel from qrunner to the worker in batches ahead of the script: still each message's own, once."""
    log = tmp_path / "reads.log"
    script = "function CheckFile(f, a, s, c, r, rc, HeaderData) a.SkipSend = 1 a.Reason = HeaderData.subject return a end"
    ids = [f"M{n:04d}" for n in range(700)]
    ms = [message(q, arrival=n, headers=RecordingHeaders(log, q, [f"Subject: about {q}"])) for n, q in enumerate(ids)]
    decisions = by_id(decide(tmp_path, script, ms, lua=lua))
    assert [decisions[q].reason for q in ids] == [f"about {q}" for q in ids]
    assert sorted(reads(log)) == ids


def test_a_script_reading_some_messages_headers_sees_the_right_ones(tmp_path):
    """Reading ahead stops paying when the script skips messages; each message it touches gets its own fields."""
    log = tmp_path / "reads.log"
    script = """
    function CheckFile(f, a, size, c, r, rc, HeaderData)
      if size % 3 == 0 then a.SkipSend = 1 a.Reason = HeaderData.subject end
      return a
    end"""
    ids = [f"M{n:04d}" for n in range(300)]
    ms = [message(q, arrival=n, size=n, headers=RecordingHeaders(log, q, [f"Subject: about {q}"]))
          for n, q in enumerate(ids)]
    decisions = by_id(decide(tmp_path, script, ms))
    assert [decisions[q].reason for q in ids if int(q[1:]) % 3 == 0] == [f"about {q}" for q in ids if int(q[1:]) % 3 == 0]
    assert all(decisions[q].send for q in ids if int(q[1:]) % 3)
    read = reads(log)
    assert len(read) == len(set(read))  # none read twice
    assert {q for q in ids if int(q[1:]) % 3 == 0} <= set(read)
