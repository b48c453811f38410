"""Tests for qrunner.mta.postfix_queuefile (and the record reader under it, qrunner.mta.postfix_records).

Part (a) builds queue files by hand, record by record, to reach what a real
Postfix writes only in special cases (pointer records in both directions,
long lines, damage). Part (b) checks the reader against the real thing: a
private Postfix instance, whose ``postcat -hq`` output is the reference.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import struct
import threading
from typing import List, Optional

import pytest

from mta_available import skip_or_fail
from qrunner.mta.postfix_queuefile import PostfixQueueFileHeaders, QueuePaths, fields_from_lines, is_queue_id
from qrunner.mta.postfix_records import iter_records

# The fixtures postfix, smtp_sink and postfix_available come from
# tests/postfix_fixtures.py, loaded by tests/conftest.py.


@pytest.fixture(scope="session")
def postcat():
    """The header lines ``postcat -h FILE`` prints (Postfix's reference), as a function of the file."""
    skip_or_fail(None if shutil.which("postcat") else
                 "Postfix is not installed (no postcat); run tests/setup/install-postfix.sh as root")

    def header_lines(path: str) -> List[bytes]:
        out = subprocess.run(["postcat", "-h", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        lines = out.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        return lines

    return header_lines


# -- building queue files ---------------------------------------------------------


def rec(rtype: str, data: bytes) -> bytes:
    """One record: type byte, length in 7-bit groups (low first), data."""
    n = len(data)
    length = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            length.append(b | 0x80)
        else:
            length.append(b)
            break
    return rtype.encode() + bytes(length) + data


def ptr(offset: int) -> bytes:
    """A pointer record as cleanup writes it (REC_TYPE_PTR_FORMAT "%15ld")."""
    return rec("p", b"%15d" % offset)


ENVELOPE = (rec("T", b"1700000000 0") + rec("A", b"create_time=1700000000")
            + rec("S", b"sender@example.org") + rec("O", b"r@example.net")
            + rec("R", b"r@example.net"))


def queue_file(content: bytes, with_size: bool = True, envelope: bytes = ENVELOPE, extracted: bytes = b"") -> bytes:
    """A queue file with a size record pointing at ``content`` (the records after M).

    ``envelope`` and ``extracted`` are the records of the envelope part
    (after the size record) and of the extracted part (between X and E).
    """
    tail = content + rec("X", b"") + extracted + rec("E", b"")
    if not with_size:
        return envelope + rec("M", b"") + tail
    # The size record is padded to a fixed width, so its length is known.
    size_len = len(rec("C", b"%15d %15d %15d %15d %15d %15d" % (0, 0, 0, 0, 0, 0)))
    offset = size_len + len(envelope) + len(rec("M", b""))
    size = rec("C", b"%15d %15d %15d %15d %15d %15d" % (len(content), offset, 1, 0, len(content), 0))
    assert len(size) == size_len
    return size + envelope + rec("M", b"") + tail


def content_offset(data: bytes) -> int:
    return data.index(rec("M", b"")) + 2


def lines(*ls: bytes) -> bytes:
    return b"".join(rec("N", x) for x in ls)


def write(tmp_path, data: bytes, name: str = "ABCDEF123") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def header_fields(path: str, **cap) -> List[bytes]:
    """The header fields as a policy gets them: through the listing's header source."""
    return PostfixQueueFileHeaders(path, os.path.basename(path), **cap).read()


# -- (a) synthetic files --------------------------------------------------------------


def test_plain_and_folded_headers(tmp_path):
    data = queue_file(lines(b"Subject: hello", b"X-Folded: a", b"\tb", b" c",
                            b"From: a@b", b"", b"body line", b"Not-A-Header: body"))
    assert header_fields(write(tmp_path, data)) == [
        b"Subject: hello", b"X-Folded: a\n\tb\n c", b"From: a@b"]


def test_without_size_record_scans_to_content(tmp_path):
    data = queue_file(lines(b"Subject: x", b"", b"b"), with_size=False)
    assert header_fields(write(tmp_path, data)) == [b"Subject: x"]


def test_long_line_as_L_records(tmp_path):
    chunk = b"y" * 2048
    content = (rec("L", b"X-Long: " + chunk) + rec("L", chunk) + rec("N", b"end")
               + rec("N", b" continued") + lines(b"Subject: s", b"", b"body"))
    assert header_fields(write(tmp_path, queue_file(content))) == [
        b"X-Long: " + chunk + chunk + b"end\n continued", b"Subject: s"]


def test_L_record_decides_line_start_only(tmp_path):
    # The second part of a continued line looks like a body line; it must
    # not end the headers because it does not start a line.
    content = rec("L", b"X-A: 1") + rec("N", b" not: a start") + lines(b"B: 2", b"")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"X-A: 1 not: a start", b"B: 2"]


def test_headers_end_at_non_header_line_without_blank(tmp_path):
    content = lines(b"A: 1", b"this is body text", b"B: 2")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1"]


def test_header_name_rules_follow_is_header(tmp_path):
    content = lines(b"Obsolete-Space : v", b"A: 1", b"Bad Name: x", b"C: 3")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"Obsolete-Space : v", b"A: 1"]


def test_padding_records_are_skipped(tmp_path):
    content = rec("N", b"A: 1") + rec("w", b"\0" * 12) + rec("N", b"\tcont") + lines(b"", b"b")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1\n\tcont"]


def test_pointer_forward_and_back_like_cleanup_milter(tmp_path):
    """A milter appended one header and inserted one before the second field.

    cleanup leaves a dummy pointer after the last header; to append it
    writes the new header at the end of the file followed by a pointer back,
    and points the dummy there. To insert, it overwrites a (padded) header
    record with a pointer to the end, where the new header, the overwritten
    one and a pointer back follow.
    """
    head = queue_file(b"")[: -len(rec("X", b"") + rec("E", b""))]
    # Content layout (offsets computed below):
    #   N "A: 1"; p -> INS; (w padding); N "C: 3"; p -> APP; N ""; N body; X; E
    #   INS: N "X-Inserted: yes"; N "B: 2"; p -> after_b
    #   APP: N "X-Appended: yes"; p -> after_dummy
    part1 = rec("N", b"A: 1")
    # Placeholders with the right size; fixed up once the offsets are known.
    p_ins_at = len(head) + len(part1)
    after_b = p_ins_at + len(ptr(0))
    part2 = rec("N", b"C: 3")
    p_app_at = after_b + len(part2)
    after_dummy = p_app_at + len(ptr(0))
    tail = lines(b"", b"body") + rec("X", b"") + rec("E", b"")
    ins_at = after_dummy + len(tail)
    ins = lines(b"X-Inserted: yes", b"B: 2") + ptr(after_b)
    app_at = ins_at + len(ins)
    app = rec("N", b"X-Appended: yes") + rec("N", b"\tfolded") + ptr(after_dummy)
    data = head + part1 + ptr(ins_at) + part2 + ptr(app_at) + tail + ins + app
    assert data.index(b"X-Inserted") == ins_at + 2
    assert header_fields(write(tmp_path, data)) == [
        b"A: 1", b"X-Inserted: yes", b"B: 2", b"C: 3", b"X-Appended: yes\n\tfolded"]


def test_dummy_pointer_is_ignored(tmp_path):
    content = lines(b"A: 1") + ptr(0) + lines(b"", b"body")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1"]


def test_pointer_loop_terminates(tmp_path):
    head = queue_file(b"")[: -len(rec("X", b"") + rec("E", b""))]
    at = len(head) + len(rec("N", b"A: 1"))
    data = head + rec("N", b"A: 1") + ptr(at) + lines(b"", b"b")
    assert header_fields(write(tmp_path, data)) == [b"A: 1"]


def test_pointer_loop_with_text_is_capped(tmp_path):
    head = queue_file(b"")[: -len(rec("X", b"") + rec("E", b""))]
    start = len(head)
    data = head + rec("N", b"A: 1") + ptr(start)
    got = header_fields(write(tmp_path, data), max_bytes=1000)
    assert sum(len(f) + 1 for f in got) <= 1000 + 5
    assert set(got) <= {b"A: 1", b"A:"}


def test_malformed_pointer_stops(tmp_path):
    content = lines(b"A: 1") + rec("p", b"12ab") + lines(b"B: 2", b"")
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1"]


def test_eight_bit_bytes_are_returned_raw(tmp_path):
    fields = [b"Subject: caf\xc3\xa9", b"X-Latin1: \xe9t\xe9", b"X-Bad: \xff\xfe\x00\x01"]
    data = queue_file(lines(*fields, b"", b"body \xff"))
    assert header_fields(write(tmp_path, data)) == fields


def test_cap_stops_reading_more_fields(tmp_path):
    many = [b"X-H%05d: %s" % (i, b"v" * 80) for i in range(5000)]
    data = queue_file(lines(*many, b"", b"body"))
    path = write(tmp_path, data)
    got = header_fields(path, max_bytes=10000)
    assert 0 < len(got) < 200
    assert sum(len(f) + 1 for f in got) <= 10000
    assert got[:-1] == many[:len(got) - 1]
    assert many[len(got) - 1].startswith(got[-1])
    default = header_fields(path)  # the default cap, 256 KiB, applies too
    assert 2500 < len(default) < 5000
    assert default[:-1] == many[:len(default) - 1]
    hs = PostfixQueueFileHeaders(path, "ABCDEF123", max_bytes=10000)
    assert hs.read() == got and "longer than 10000" in hs.problem


def test_cap_cuts_a_huge_single_line(tmp_path):
    chunk = b"z" * 2048
    content = rec("L", b"X-Big: ") + b"".join(rec("L", chunk) for _ in range(100)) + lines(b"", b"b")
    got = header_fields(write(tmp_path, queue_file(content)), max_bytes=5000)
    assert len(got) == 1 and got[0].startswith(b"X-Big: zz") and len(got[0]) < 5000


# A header part with every shape a cut can fall into: one-record lines, a
# long line (L records, the first with two length bytes, then its final N),
# a folded field, the empty line that ends the headers, a body.
TRUNCATED_CONTENT = [("N", b"A: 1"), ("N", b"B: 2"), ("L", b"C: " + b"q" * 300), ("N", b"end"),
                     ("N", b"D: 4"), ("N", b"\tfolded"), ("N", b""), ("N", b"body")]


def expected_after_cut(cut: int, spans, header_text: bytes):
    """The fields and the note a queue file cut at ``cut`` must yield.

    ``spans`` are (start, end, type, length bytes, header text it completes)
    for the size record and each content record; ``header_text`` is what
    postcat prints for the whole file. The fields are those of the header
    text whose records are complete before the cut (a long line cut after
    one of its L records keeps what those records hold, as postcat prints
    it); the note says where the cut fell.
    """
    size_end, content_start, blank_end = spans[0][1], spans[1][0], spans[-2][1]
    done = max([text for start, end, _t, _n, text in spans if end <= cut], default=0)
    prefix = header_text[:done].split(b"\n")
    if prefix[-1] == b"":
        prefix.pop()
    fields = fields_from_lines(prefix)
    if cut == 0:
        return fields, "the queue file holds no message content"
    if cut >= blank_end:
        return fields, None
    if size_end <= cut <= content_start:
        return fields, "the queue file ends inside the message headers"
    for start, end, rtype, length_bytes, _text in spans:
        if cut == end:
            return fields, ("the queue file ends inside a header line" if rtype == "L"
                            else "the queue file ends inside the message headers")
        if start < cut < end:
            if cut == start + 1:
                why = "file ends inside a record header"
            elif cut < start + 1 + length_bytes:
                why = "file ends inside a record length"
            else:
                why = "file ends inside a %r record" % rtype
            return fields, "the queue file is damaged: " + why
    raise AssertionError("cut %d is in no record" % cut)


def test_truncated_files_never_raise(tmp_path, postcat):
    """Cut at every byte, a queue file yields exactly the fields of its records complete before the cut."""
    data = queue_file(b"".join(rec(t, d) for t, d in TRUNCATED_CONTENT))
    header_text = b"".join(line + b"\n" for line in postcat(write(tmp_path, data, "whole")))
    assert fields_from_lines(header_text.split(b"\n")[:-1]) == [
        b"A: 1", b"B: 2", b"C: " + b"q" * 300 + b"end", b"D: 4\n\tfolded"]
    size_record_length = data.index(ENVELOPE)
    spans = [(0, size_record_length, "C", 1, 0)]
    offset, text, in_headers = content_offset(data), 0, True
    for rtype, payload in TRUNCATED_CONTENT:
        length_bytes = len(rec(rtype, payload)) - 1 - len(payload)
        in_headers = in_headers and (rtype, payload) != ("N", b"")
        if in_headers:
            text += len(payload) + (rtype == "N")  # postcat ends each N record's line with a newline
        spans.append((offset, offset + 1 + length_bytes + len(payload), rtype, length_bytes, text))
        offset = spans[-1][1]
    for cut in range(len(data)):
        path = write(tmp_path, data[:cut], "ABCDEF123")
        fields, note = expected_after_cut(cut, spans, header_text)
        source = PostfixQueueFileHeaders(path, "ABCDEF123")
        assert (cut, source.read(), source.problem) == (
            cut, fields, note and "ABCDEF123 (%s): %s" % (path, note))


def test_absurd_lengths_stop_cleanly(tmp_path):
    content = lines(b"A: 1") + b"N\xff\xff\xff\xff\x7f" + b"x" * 10
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1"]
    content = lines(b"A: 1") + b"N\xff\xff\xff\x7f" + b"x" * 10  # 2^28-1, file too short
    assert header_fields(write(tmp_path, queue_file(content))) == [b"A: 1"]


def test_iter_records(tmp_path):
    data = rec("C", b"1 2") + rec("N", b"x" * 200) + rec("p", b"0")
    path = write(tmp_path, data + b"N\x05ab")
    with open(path, "rb") as f:
        assert list(iter_records(f)) == [("C", b"1 2"), ("N", b"x" * 200), ("p", b"0")]
    with open(write(tmp_path, b"", "empty"), "rb") as f:
        assert list(iter_records(f)) == []
    with open(write(tmp_path, b"N\x81", "badlen"), "rb") as f:
        assert list(iter_records(f)) == []
    with open(write(tmp_path, b"N\x80\x80\x80\x80\x01", "toolong"), "rb") as f:
        assert list(iter_records(f)) == []


@pytest.mark.parametrize("name, data, note", [
    ("empty", b"", "the queue file holds no message content"),
    # "S" is a record type, and "u" a length of 117: more than the file holds
    ("text", b"Subject: not a queue file\n\nhello\n",
     "the queue file is damaged: file ends inside a 'S' record"),
    # a size record that holds no offsets, then empty records up to the end: no M record
    ("bad size record", b"C\x03abc" + b"\x00" * 50, "the queue file holds no message content"),
    # every byte has its high bit set: a length that never ends
    ("high bits", b"\xff" * 4096, "the queue file is damaged: too many length bytes in a '\xff' record"),
])
def test_empty_and_garbage_files(tmp_path, postcat, name, data, note):
    path = write(tmp_path, data)
    source = PostfixQueueFileHeaders(path, "ABCDEF123")
    assert postcat(path) == []
    assert (source.read(), source.problem) == ([], "ABCDEF123 (%s): %s" % (path, note))


# -- the HeaderSource --------------------------------------------------------------------


def test_header_source_reads_and_pickles(tmp_path):
    path = write(tmp_path, queue_file(lines(b"A: 1", b" 2", b"", b"b")))
    hs = PostfixQueueFileHeaders(path, "ABCDEF123", ["postcat", "-c", "/etc/postfix"])
    copy = pickle.loads(pickle.dumps(hs))
    assert copy == hs and copy.read() == [b"A: 1\n 2"] and copy.problem is None
    assert len(pickle.dumps(hs)) < 300


def test_header_source_missing_file_without_postcat(tmp_path):
    hs = PostfixQueueFileHeaders(str(tmp_path / "gone"), "ABCDEF123")
    assert hs.read() == []
    assert hs.problem == "headers of ABCDEF123 not read: cannot read %s: No such file or directory" % (
        tmp_path / "gone")


def test_header_source_falls_back_to_postcat(tmp_path):
    fake = ["sh", "-c", 'test "$1" = -hq && test "$2" = ABCDEF123 && '
                        "printf 'A: 1\\n\\tb\\nB: 2\\n'", "sh"]
    hs = PostfixQueueFileHeaders(str(tmp_path / "gone"), "ABCDEF123", fake)
    assert hs.read() == [b"A: 1\n\tb", b"B: 2"]
    assert hs.problem is None


def test_header_source_postcat_failure_explained(tmp_path):
    fake = ["sh", "-c", "echo 'postcat: fatal: open queue file ABCDEF123: No such file' >&2; exit 1",
            "sh"]
    hs = PostfixQueueFileHeaders(str(tmp_path / "gone"), "ABCDEF123", fake)
    assert hs.read() == []
    assert "No such file" in hs.problem and "\n" not in hs.problem
    hs = PostfixQueueFileHeaders("", "ABCDEF123", ["/nonexistent/postcat"])
    assert hs.read() == [] and hs.problem


def test_header_source_refuses_bad_queue_id_for_postcat(tmp_path, mocker):
    run = mocker.patch("subprocess.run")
    hs = PostfixQueueFileHeaders(str(tmp_path / "gone"), "-v", ["postcat"])
    assert hs.read() == [] and "not a Postfix queue id" in hs.problem
    run.assert_not_called()


def test_fields_from_lines():
    assert fields_from_lines([b" orphan", b"A: 1", b"\tx", b"B: 2"]) == [b" orphan", b"A: 1\n\tx", b"B: 2"]


# -- queue ids and paths ----------------------------------------------------------------------

SAFE = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"


def safe_encode(value: int, base: int, pad: int) -> str:
    out = ""
    while value:
        out = SAFE[value % base] + out
        value //= base
    return out.rjust(pad, "0")


def long_id(sec: int, usec: int, inum: int) -> str:
    """A long queue id built as mail_queue_enter() does."""
    return safe_encode(sec, 52, 6) + safe_encode(usec, 52, 4) + "z" + safe_encode(inum, 51, 0)


@pytest.mark.parametrize("qid", [
    "2D19A210594", "B7FA32109FE", "000000", "FFFFF" + "F" * 16,
    long_id(1700000000, 123456, 987654321), long_id(1700000000, 0, 1),
    long_id(1700000000, 999999, 2 ** 63), "4Z1yq03Hj7zQ5", long_id(52 ** 7, 5, 51 * 3),
])
def test_is_queue_id_accepts(qid):
    assert is_queue_id(qid)


@pytest.mark.parametrize("qid", [
    "", "ABCDE", "2d19a210594", "2D19A210594 ", " 2D19A210594", "2D19A210594\n",
    "FFFFF" + "F" * 17, "-h", "--", "../2D19A210594", "deferred/2/2D19A210594", "ALL",
    "2D19A21059G", "4Z1yq03Hj7zQ5a", "4Z1yq03Hjz7QZ", "4Z1yq03Hj7zQz", "4Z1yq03Hj7z",
    "4Z1yq03Hj7z/", "4Z1yq03HjAzQ5", None, 12345678,
])
def test_is_queue_id_rejects(qid):
    assert not is_queue_id(qid)


def test_queue_paths_short_ids():
    names = ["deferred", "defer"]
    assert QueuePaths("/q", names, 1).path("deferred", "2D19A210594") == "/q/deferred/2/2D19A210594"
    assert QueuePaths("/q/", names, 2).path("deferred", "2D19A210594") == "/q/deferred/2/D/2D19A210594"
    assert QueuePaths("/q", names, 1).path("hold", "2D19A210594") == "/q/hold/2D19A210594"
    assert QueuePaths("/q", "DEFERRED, defer", 1).path("Deferred", "2D19A210594") \
        == "/q/Deferred/2/2D19A210594"
    assert QueuePaths("/q", "deferred defer", 3).path("deferred", "2D19A210594") \
        == "/q/deferred/2/D/1/2D19A210594"


def test_queue_paths_long_ids_hash_on_hex_microseconds():
    qid = long_id(1700000000, 0xABCDE, 4242)
    assert QueuePaths("/q", ["deferred"], 1).path("deferred", qid) == "/q/deferred/A/" + qid
    assert QueuePaths("/q", ["deferred"], 2).path("deferred", qid) == "/q/deferred/A/B/" + qid
    small = long_id(1700000000, 0x1F, 7)  # "%05X" keeps the leading zeros
    assert QueuePaths("/q", ["deferred"], 3).path("deferred", small) == "/q/deferred/0/0/0/" + small
    # Deeper than the 5 hex digits: dir_forest() pads with "_".
    assert QueuePaths("/q", ["deferred"], 6).path("deferred", qid) \
        == "/q/deferred/A/B/C/D/E/_/" + qid
    # A "z" inside the seconds is not the separator: the last "z" is.
    tricky = "zzzzzz" + safe_encode(77, 52, 4) + "z" + "Q"
    assert is_queue_id(tricky)
    assert QueuePaths("/q", ["deferred"], 2).path("deferred", tricky) == "/q/deferred/0/0/" + tricky


def test_queue_paths_refuses_bad_input():
    for qid in ("../etc/passwd", "-h", "", "2D19A210594/x"):
        with pytest.raises(ValueError):
            QueuePaths("/q", ["deferred"], 1).path("deferred", qid)
    for name in ("../deferred", "", "de ferred", "hold/"):
        with pytest.raises(ValueError):
            QueuePaths("/q", ["deferred"], 1).path(name, "2D19A210594")
    with pytest.raises(ValueError):
        QueuePaths("/q", ["deferred"], 0).path("deferred", "2D19A210594")


# -- (b) against a real private Postfix ---------------------------------------------------------

MESSAGE = (
    b"From: Sender <sender@example.org>\n"
    b"To: r@example.net\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and raw caf\xc3\xa9\n"
    b"X-Latin1: \xe9t\xe9 \xe0 la plage\n"
    b"X-Folded: first\n"
    b"\tsecond\n"
    b"   third: looks like a header\n"
    b"X-Long: " + b"L" * 5000 + b"\n"
    b"X-Long-Folded: short\n"
    b" " + b"c" * 4500 + b"\n"
    b"X-Huge: " + (b"h" * 70 + b"\n ") * 1700 + b"end\n"
    b"X-After-Huge: still here?\n"
    b"Message-ID: <%s@qrunner.test>\n"
    b"\n"
    b"Body: not a header\n"
    b"body line\n"
)


def postfix_paths(instance) -> QueuePaths:
    """Queue file paths as the Postfix back end finds them, from the instance's own settings."""
    return QueuePaths(instance.queue_directory, instance.postconf("hash_queue_names"),
                      int(instance.postconf("hash_queue_depth")))


def reference_fields(instance, qid: str) -> List[bytes]:
    return fields_from_lines(instance.postcat_headers(qid))


def submit(instance, tag: bytes, message: bytes = MESSAGE) -> str:
    qid = instance.submit("sender@example.org", ["r@example.net"], message.replace(b"%s", tag))
    instance.wait_deferred([qid])
    return qid


def test_real_deferred_and_held_messages_match_postcat(postfix):
    paths = postfix_paths(postfix)
    q1 = submit(postfix, b"one")
    q2 = submit(postfix, b"two")
    postfix.hold([q2])
    postfix.wait_for_queue([q2], "hold")
    for qid, queue in ((q1, "deferred"), (q2, "hold")):
        path = paths.path(queue, qid)
        assert os.path.isfile(path), (queue, path)
        got = header_fields(path)
        expected = reference_fields(postfix, qid)
        assert got == expected
        by_name = {f.split(b":", 1)[0]: f for f in got}
        assert by_name[b"X-Latin1"] == b"X-Latin1: \xe9t\xe9 \xe0 la plage"
        assert by_name[b"Subject"].endswith(b"raw caf\xc3\xa9")
        assert by_name[b"X-Folded"] == b"X-Folded: first\n\tsecond\n   third: looks like a header"
        assert by_name[b"X-Long"] == b"X-Long: " + b"L" * 5000
        assert b"Body" not in by_name
        hs = PostfixQueueFileHeaders(path, qid)
        assert hs.read() == expected and hs.problem is None
    # A long line really is stored as L records (what this test is about).
    path = paths.path("deferred", q1)
    with open(path, "rb") as f:
        types = [t for t, _ in iter_records(f)]
    assert "L" in types[types.index("M"):]


def test_real_header_source_follows_a_moved_message(postfix):
    paths = postfix_paths(postfix)
    qid = submit(postfix, b"moved")
    deferred = paths.path("deferred", qid)
    hs = PostfixQueueFileHeaders(deferred, qid, ["postcat", "-c", postfix.config_directory])
    postfix.hold([qid])
    postfix.wait_for_queue([qid], "hold")
    assert not os.path.exists(deferred)
    assert hs.read() == reference_fields(postfix, qid)
    assert hs.problem is None
    postfix.delete([qid])
    assert hs.read() == [] and qid in hs.problem


def test_real_long_queue_ids_and_deeper_hashing(postfix):
    postfix.set(enable_long_queue_ids="yes", hash_queue_depth="2")
    qid = submit(postfix, b"long-id")
    assert is_queue_id(qid) and "z" in qid, qid
    paths = postfix_paths(postfix)
    assert paths.depth == 2
    path = paths.path("deferred", qid)
    assert os.path.isfile(path), (path, sorted(os.listdir(os.path.join(postfix.queue_directory, "deferred"))))
    assert header_fields(path) == reference_fields(postfix, qid)
    postfix.hold([qid])
    postfix.wait_for_queue([qid], "hold")
    assert os.path.isfile(paths.path("hold", qid))


# -- a minimal milter, so that cleanup writes real pointer records ------------------------------

SMFIF_ADDHDRS, SMFIF_CHGHDRS = 0x01, 0x10
# Ask Postfix not to send the stages we do not need (connect, helo, mail,
# rcpt, body, headers, end of headers, unknown, data).
SMFIP_SKIP_STAGES = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200


class HeaderMilter:
    """Speaks just enough of the milter protocol (version 6) to edit headers.

    At the end of each message it appends one header (``h``), inserts one
    at position 1 (``i``) and changes the first Subject (``m``): each makes
    cleanup write pointer records (cleanup_milter.c).
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.messages = 0
        self.errors: List[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self):
        self.sock.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn, n) -> Optional[bytes]:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    @staticmethod
    def _send(conn, cmd: bytes, data: bytes = b""):
        conn.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _session(self, conn):
        try:
            with conn:
                while True:
                    head = self._recv(conn, 4)
                    if head is None:
                        return
                    packet = self._recv(conn, struct.unpack(">I", head)[0])
                    if not packet:
                        return
                    cmd, data = packet[:1], packet[1:]
                    if cmd == b"O":
                        _version, actions, protocol = struct.unpack(">III", data[:12])
                        self._send(conn, b"O", struct.pack(
                            ">III", 6, actions & (SMFIF_ADDHDRS | SMFIF_CHGHDRS),
                            protocol & SMFIP_SKIP_STAGES))
                    elif cmd in (b"D", b"A"):
                        continue  # macros and abort get no reply
                    elif cmd == b"Q":
                        return
                    elif cmd == b"E":
                        self.messages += 1
                        self._send(conn, b"h", b"X-Milter-Appended\0appended by the test milter\0")
                        self._send(conn, b"i", struct.pack(">I", 1)
                                   + b"X-Milter-Inserted\0at position 1\n\tfolded\0")
                        self._send(conn, b"m", struct.pack(">I", 1)
                                   + b"Subject\0changed by the test milter\0")
                        self._send(conn, b"a")
                    else:
                        self._send(conn, b"c")
        except OSError as exc:
            self.errors.append(str(exc))


@pytest.fixture
def milter():
    m = HeaderMilter()
    yield m
    m.close()


def test_real_milter_pointer_records_match_postcat(postfix, milter):
    postfix.set(non_smtpd_milters="inet:127.0.0.1:%d" % milter.port,
                milter_default_action="tempfail")
    paths = postfix_paths(postfix)
    qid = submit(postfix, b"milter")
    assert milter.messages >= 1, postfix.log_text()[-2000:]
    path = paths.path("deferred", qid)
    with open(path, "rb") as f:
        pointers = [int(d) for t, d in iter_records(f) if t == "p"]
    assert any(p != 0 for p in pointers), pointers  # real (non-dummy) pointers
    got = header_fields(path)
    expected = reference_fields(postfix, qid)
    assert got == expected
    assert b"X-Milter-Appended: appended by the test milter" in got
    assert b"Subject: changed by the test milter" in got
    assert any(f.startswith(b"X-Milter-Inserted:") for f in got)
    assert not any(b"raw caf" in f for f in got)
