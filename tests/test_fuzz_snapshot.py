"""Snapshot lines fuzzed with hypothesis through the real ``qrunner plan --queue-file`` (issue 14, point 2).

Every JSON shape, depth and size, every type in every field, strings with any code point or escape: hypothesis
writes snapshot files whose lines are ``postqueue -j`` objects (as the format says they must be), the same with one
field given an arbitrary JSON value (any depth, huge integers, NaN and the infinities, lone-surrogate ``\\uXXXX``
escapes, any code point raw or escaped), a field left out or one added, a raw token put where a field's value goes
(a number of 5,000 digits, ``NaN``, nesting 100,000 deep), and whole lines that are not objects (any JSON value,
any text, any bytes). Each file is planned by ``qrunner.cli.main`` in-process, as tests/test_cli_plan.py does, in
table or JSON form. What a line must give comes from the format as qrunner(8) and ``qrunner plan --help`` state it
(:func:`expected`), not from qrunner's reader:

- no traceback, and a documented exit code: 65 when a line is bad, else 0 or 1;
- each bad line named, file and line number, in one sentence of its own; every good line still planned, once;
- no control character printed raw, on stdout (the table, the JSON) or stderr (the log lines, which keep only a
  tab): a queue id with one is a bad line and is never echoed, and a header's text reaches the table escaped.

In the normal suite about 2,000 generated lines (40 files of up to 100); ``make reliability`` (QRUNNER_LONG=1)
20,000.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_helpers import no_default_config, run_cli, write_script  # noqa: F401

pytestmark = [pytest.mark.usefixtures("no_default_config"), pytest.mark.reliability]

LONG = os.environ.get("QRUNNER_LONG") == "1"
FILES = 400 if LONG else 40
LINES = 100  # at most, per file: under the 100 bad lines a plan names one by one

FUZZ = settings(max_examples=FILES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

POLICY = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  a.Priority = (math.floor(size) % 100) + 1
  a.Reason = "from " .. tostring(from) .. " about " .. tostring(headers.subject) .. " in " .. tostring(f)
  if math.floor(size) % 3 == 0 then a.SkipSend = true end
  return a
end
"""
HINT = "each line must be one JSON object as 'postqueue -j' prints it."

# -- what a line must give, from the format as documented -----------------------------------------------------

QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # letters, digits, '.', '_', '-'; as Postfix and Exim write
MAX_EPOCH = 253402300799  # arrival_time: epoch seconds up to the end of year 9999
MAX_SIZE = 2 ** 53  # message_size: bytes, as a Lua number holds them exactly


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value) -> bool:
    """Every string in it is text, or bytes that are not UTF-8 as ``\\udc80``-``\\udcff``: no other lone surrogate."""
    todo = [value]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            if any(0xD800 <= ord(c) <= 0xDFFF and not 0xDC80 <= ord(c) <= 0xDCFF for c in value):
                return False
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
    return True


class Either(str):
    """A good line nested so deep (hundreds of levels) that whether JSON takes it depends on the stack it is read
    on: planned under this queue id, or named as nested too deeply; never a traceback."""


def expected(raw: bytes):
    """None for a blank line (passed over), the queue id a good line is planned under, or False for a bad line."""
    text = raw.decode("utf-8", "surrogateescape").strip()  # bytes that are not UTF-8 are \udcXX, as documented
    if not text:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return False
    if not isinstance(record, dict):
        return False
    queue_id = _judged(record)
    deep = "[" * 500 in text or '{"a":' * 500 in text
    return Either(queue_id) if queue_id and deep else queue_id


def _judged(record: dict):
    """A decoded object: its queue id when it is a good line, else False."""
    checks = {
        "queue_id": lambda v: isinstance(v, str) and QUEUE_ID.fullmatch(v) is not None,
        "arrival_time": lambda v: _number(v) and 0 <= v <= MAX_EPOCH,
        "message_size": lambda v: _number(v) and 0 <= v <= MAX_SIZE,
        "sender": lambda v: isinstance(v, str),
        "recipients": lambda v: isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("address"), str)
                                                            for r in v),
    }
    optional = {"headers": lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v),
                "filename": lambda v: isinstance(v, str), "queue_name": lambda v: isinstance(v, str)}
    if not all(key in record and ok(record[key]) for key, ok in checks.items()):
        return False
    if not all(ok(record[key]) for key, ok in optional.items() if key in record):
        return False
    if not all(_text(record[key]) for key in ("queue_id", "sender", "recipients", "headers", "filename",
                                              "queue_name") if key in record):
        return False
    return record["queue_id"]


# -- the lines ----------------------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # any code point, lone surrogates included
TEXT = st.one_of(st.text(max_size=12), st.text(max_size=12), ANY_TEXT,
                 st.sampled_from(["", "MAILER-DAEMON", "a@b", "\udcff\udc80", "x\nSubject: forged", "\x1b[31m"]))
# Raw tokens where a value goes: numbers past any field (and past Python's 4,300-digit limit), NaN-like text, deep
# nesting (far under and far past what JSON parsers take), broken escapes.
TOKENS = st.one_of(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-0", "0e0", "1E400", "1e-400",
                     "9" * 5000, "-" + "9" * 4400, "1" + "0" * 4299, "123456789012345678901234567890",
                     '"\\ud800"', '"\\udfff\\ud800"', '"\\udc80"', '"\\u0000"', '"\\x41"', '"\\u12"', "nan", "inf",
                     "0x10", "01", "+1", ".5", "1.", "true", "null", '"\\u000a: action=send"']),
    st.builds(lambda n, inner: "[" * n + inner + "]" * n, st.sampled_from([1, 3, 30, 100, 900, 980, 5000, 100000]),
              st.sampled_from(["", "1", '"x"', "{}"])),
    st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.sampled_from([2, 50, 950, 5000, 100000])),
)
PLACEHOLDER = "\x00raw-token\x00"
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 53 - 2, max_value=2 ** 70),
              st.floats(), TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
GOOD_IDS = st.from_regex(QUEUE_ID, fullmatch=True)
IDS = st.one_of(GOOD_IDS, GOOD_IDS, GOOD_IDS,
                st.sampled_from(["-d", "--all", "../x", "A B", "A\nB: action=send", "A\x1b[2J", "A\rB", "A\x85",
                                 "A\x7f", "\tA", "A\u2028B", "A\udc80", "x" * 65]),
                ANY_TEXT)
HEADERS = st.lists(st.one_of(st.builds(lambda v: "Subject: " + v, TEXT), TEXT), max_size=3)
RECORDS = st.fixed_dictionaries(
    {"queue_name": st.sampled_from(["deferred", "hold", "active", "incoming"]) | TEXT, "queue_id": IDS,
     "arrival_time": st.integers(0, MAX_EPOCH) | st.floats(0, MAX_EPOCH) | st.sampled_from([-1, MAX_EPOCH + 1]),
     "message_size": st.integers(0, MAX_SIZE) | st.floats(0, MAX_SIZE) | st.sampled_from([-1, MAX_SIZE + 1]),
     "sender": TEXT,
     "recipients": st.lists(st.fixed_dictionaries({"address": TEXT}, optional={"delay_reason": TEXT}), max_size=3)},
    optional={"headers": HEADERS, "filename": TEXT, "forced_expire": st.booleans()})
FIELDS = ["queue_name", "queue_id", "arrival_time", "message_size", "sender", "recipients", "headers", "filename"]


@st.composite
def lines(draw) -> bytes:
    """One line of a snapshot file, as bytes (without its newline)."""
    kind = draw(st.sampled_from(["good", "good", "good", "value", "missing", "extra", "token", "whole", "text",
                                 "bytes", "blank"]))
    record = draw(RECORDS)
    if kind == "value":  # one field, any JSON value
        record[draw(st.sampled_from(FIELDS))] = draw(JSON_VALUES)
    elif kind == "missing":
        record.pop(draw(st.sampled_from(FIELDS)), None)
    elif kind == "extra":
        record[draw(TEXT)] = draw(JSON_VALUES)
    elif kind == "token":  # in a field, or in a recipient's object (whose every string is judged too)
        field = draw(st.sampled_from(FIELDS + ["a recipient's"]))
        if field == "a recipient's":
            record["recipients"] = [{"address": "bob@example.net", draw(TEXT): PLACEHOLDER}]
        else:
            record[field] = PLACEHOLDER
    elif kind == "whole":
        record = draw(JSON_VALUES | st.lists(RECORDS, max_size=2))
    elif kind == "text":
        return draw(st.text(st.characters(exclude_categories=(), exclude_characters="\n"), max_size=60)).encode(
            "utf-8", "surrogatepass")
    elif kind == "bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    elif kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t", b"\r"]))
    ascii_only = draw(st.booleans())  # escaped (\uXXXX) or raw code points (a lone surrogate as its 3 bytes)
    text = json.dumps(record, ensure_ascii=ascii_only)
    if kind == "token":
        text = text.replace(json.dumps(PLACEHOLDER, ensure_ascii=ascii_only), draw(TOKENS))
    return text.encode("utf-8", "surrogatepass")


def _raw_controls(text: str, allowed: str = "\n") -> list:
    """Control characters printed as themselves (a newline ends a line; a log line keeps a tab, log.shown)."""
    return sorted({repr(c) for c in text if c not in allowed and unicodedata.category(c) == "Cc"})


@pytest.mark.reliability
def test_generated_snapshot_lines_are_planned_or_named_never_a_traceback(capsys, tmp_path, figures):
    script = write_script(tmp_path, POLICY)
    snapshot = tmp_path / "queue.jsonl"
    counts = Counter()

    @FUZZ
    @given(st.lists(lines(), min_size=LINES // 2, max_size=LINES), st.sampled_from(["json", "table"]))
    def check(generated, fmt):
        snapshot.write_bytes(b"\n".join(generated) + b"\n")
        wanted = [expected(raw) for raw in generated]
        good = Counter(q for q in wanted if q and not isinstance(q, Either))
        bad = [number for number, q in enumerate(wanted, 1) if q is False]
        either = {number: q for number, q in enumerate(wanted, 1) if isinstance(q, Either)}

        code, out, err = run_cli(capsys, ["plan", "--queue-file", snapshot, "--script", script, "--format", fmt,
                                          "--now", "2026-11-25T10:00:00"])

        assert "Traceback" not in err, err
        named = [line for line in err.splitlines() if re.search(re.escape(f"{snapshot}:") + r"\d+: ", line)]
        numbers = [int(line.split(f"{snapshot}:")[1].split(":")[0]) for line in named]
        assert [n for n in numbers if n not in either] == bad, err
        assert all("nested too deeply" in line for n, line in zip(numbers, named) if n in either), err
        assert code in ((65,) if numbers else (0, 1)), (code, err)
        assert all(line.endswith(HINT) and line.count(HINT) == 1 for line in named), err
        good.update(q for n, q in either.items() if n not in numbers)
        if fmt == "json":
            assert out.count("\n") == 1, out
            assert Counter(d["queue_id"] for d in json.loads(out)["decisions"]) == good, err
        else:
            for queue_id in good:
                assert queue_id in out, (queue_id, out)
        assert not _raw_controls(out) and not _raw_controls(err, "\n\t"), (_raw_controls(out),
                                                                            _raw_controls(err, "\n\t"), out, err)
        counts["lines"] += len(generated)
        counts["bad"] += len(bad)

    check()
    assert counts["bad"] and counts["lines"] > counts["bad"]  # both kinds were tried
    figures.record("inputs", "generated snapshot lines (any JSON value in every field, whole lines that are not "
                   "objects) planned by qrunner plan", tried=counts["lines"], survived=counts["lines"])
