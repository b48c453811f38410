"""Damaged queue files in a real queue: ``plan`` and ``run`` say which message, go on, lose nothing (issue 14, 2).

Each case queues two messages in the real Postfix or Exim of the test setup, damages the file of one of them in the
MTA's own queue the way disks, crashes and hostile senders do (cut short, corrupted, emptied, a 10 MB header block,
100,000 header lines, NUL bytes, invalid UTF-8, a line without a colon, the file vanishing while qrunner reads it), and
runs the real command. What must hold, checked with the MTA's own tools (``postqueue -j``, ``postcat``, ``exim -bp``,
``exim -Mvh``) and the sink: no traceback; one sentence in the log that names the damaged message; the other message
delivered; the damaged one still in the queue (and, when qrunner holds it, with its record and reason in ``status``)
or, where the case removed it, gone without a trace of a crash.

Postfix's own listing (``postqueue -j``, through showq) leaves out a queue file whose envelope it cannot read (showq
logs it to Postfix's log, and qmgr moves such a file to the ``corrupt`` queue): qrunner never sees those, so the
Postfix cases damage the message content. qrunner reads Exim's ``-H`` files itself, so the Exim cases damage the
envelope too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mta_harness import HELD, harness_for
from qrunner_e2e import Qrunner, Result

# Holds the message for damaged@example.net whatever its headers say; prints what it saw of the headers.
SCRIPT = """
function CheckFile(f, a, size, created, from, rcpts, hd, hl)
  print(string.format("seen %d fields, subject %s", #hl, tostring(hd.subject)))
  if rcpts[1] == "damaged@example.net" then a.SkipSend = true; a.Reason = "the damaged one waits" end
  return a
end
"""

# ``python VANISH_RUN ARGV_TO_REMOVE... -- QRUNNER_ARGS...``: qrunner, with the message removed by the MTA's own
# command after the listing and before the policy reads its headers.
VANISH_RUN = """
import subprocess, sys
from qrunner import policy
split = sys.argv.index("--")
remove, args = sys.argv[1:split], sys.argv[split + 1:]
decide = policy.PolicyEngine.decide
def decide_after_removal(self, *a, **k):
    subprocess.run(remove, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return decide(self, *a, **k)
policy.PolicyEngine.decide = decide_after_removal
from qrunner.cli import main
sys.exit(main(args))
"""

BIG_BLOCK = [b"X-Big-%05d: %s" % (n, b"b" * 1000) for n in range(10000)]  # about 10 MB of header text
MANY_LINES = [b"X-L: %d" % n for n in range(100000)]

# How the headers of the damaged message change: extra header lines after the Subject.
EXTRA_LINES = {
    "nul-bytes": [b"X-Nul: a\x00b\x00"],
    "invalid-utf8": [b"X-Bad: \xff\xfe\xc3( \xed\xa0\x80"],
    "line-without-colon": [b"This line has no colon at all"],
    "huge-header-block": BIG_BLOCK,
    "many-header-lines": MANY_LINES,
}
CONTENT_DAMAGE = sorted(EXTRA_LINES) + ["truncated-in-headers", "corrupted-in-headers", "vanished"]
ENVELOPE_DAMAGE = ["empty", "truncated-in-envelope", "garbage-envelope"]


@pytest.fixture
def mta(request, tmp_path):
    return harness_for(request, tmp_path)


# -- writing damaged files ----------------------------------------------------------------


def _records(data: bytes):
    """(type, data, offset) of each Postfix record: a reader of the test's own, not qrunner's."""
    pos, out = 0, []
    while pos < len(data):
        rtype, length, shift, pos = data[pos], 0, 0, pos + 1
        while True:
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        out.append((rtype, data[pos:pos + length], pos))
        pos += length
    return out


def _record(rtype: int, data: bytes) -> bytes:
    length, head = len(data), bytearray([rtype])
    while True:
        if length < 0x80:
            head.append(length)
            break
        head.append((length & 0x7F) | 0x80)
        length >>= 7
    return bytes(head) + data


def postfix_with_headers(data: bytes, extra) -> bytes:
    """The queue file with ``extra`` header lines after the Subject; the size record's content size kept right."""
    recs = _records(data)
    out, content_offset, xtra_offset = [], None, None
    for rtype, body, _offset in recs:
        if rtype == ord("M"):
            content_offset = sum(len(r) for r in out) + 2  # the M record is empty: 2 bytes
        if rtype == ord("X"):
            xtra_offset = sum(len(r) for r in out)
        out.append(_record(rtype, body))
        if rtype == ord("N") and body.startswith(b"Subject:"):
            out += [_record(ord("N"), line) for line in extra]
            # a line longer than Postfix's 2048-byte line limit would be L records; ours are shorter
    blob = b"".join(out)
    size_rec = recs[0][1]
    fields = size_rec.split()
    assert int(fields[1]) == content_offset, "the envelope did not change, so neither did the content offset"
    fields[0] = b"%d" % (xtra_offset - content_offset)
    new_size = b" ".join(b"%15d" % int(f) for f in fields)
    assert len(new_size) == len(size_rec)
    return blob[:2] + new_size + blob[2 + len(size_rec):]


def exim_with_headers(data: bytes, extra) -> bytes:
    """The ``-H`` file with ``extra`` header records after the Subject (each a length, a flag, a space, the text)."""
    cut = data.index(b"\n\n") + 2
    out, pos = [data[:cut]], cut
    while pos < len(data):
        digits = pos
        while data[digits:digits + 1].isdigit():
            digits += 1
        length = int(data[pos:digits])
        end = digits + 2 + length
        out.append(data[pos:end])
        if data[digits + 2:end].startswith(b"Subject:"):
            out += [b"%03d  %s\n" % (len(line) + 1, line) for line in extra]
        pos = end
    return b"".join(out)


def header_part(mta, data: bytes) -> int:
    """Where the header part starts in the file: Postfix's M record, Exim's blank line."""
    if mta.name == "postfix":
        return next(offset for rtype, _body, offset in _records(data) if rtype == ord("M"))
    return data.index(b"\n\n") + 2


def damage(mta, path: str, how: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    stat = os.stat(path)
    if how in EXTRA_LINES:
        data = (postfix_with_headers if mta.name == "postfix" else exim_with_headers)(data, EXTRA_LINES[how])
    elif how == "truncated-in-headers":
        data = data[:header_part(mta, data) + 40]
    elif how == "corrupted-in-headers":
        start = header_part(mta, data)  # the first header's record length (Postfix) or length digits (Exim)
        if mta.name == "postfix":
            data = data[:start + 1] + b"\xff" * 5 + data[start + 6:]
        else:
            data = data[:start] + b"abc" + data[start + 3:]
    elif how == "empty":
        data = b""
    elif how == "truncated-in-envelope":
        data = data[:data.index(b"\n", data.index(b"\n") + 1) + 5]
    elif how == "garbage-envelope":
        first = data.index(b"\n") + 1
        data = data[:first] + b"\x00\xff garbage \x80\n" * 3 + data[first:]
    with open(path, "r+b") as f:  # in place: owner, mode and inode stay the MTA's
        f.write(data)
        f.truncate()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a deferred file's mtime is its retry time


def queue_file(mta, queue_id: str) -> str:
    return mta.filename(queue_id) if mta.name == "postfix" else mta.instance.header_path(queue_id)


def tool_field_count(mta, queue_id: str) -> int:
    """How many header fields the MTA's own tool shows for the message."""
    if mta.name == "postfix":
        lines = mta.instance.postcat_headers(queue_id)
        return sum(1 for line in lines if line[:1] not in (b" ", b"\t"))
    return len(mta.instance.headers_mvh(queue_id))


def listed(mta, queue_id: str):
    """Where the MTA's own listing has the message (None: not there).

    ``exim -bp`` lists a message whose ``-H`` file it cannot read as its id alone on a line, then "*** spool format
    error: size=N ***": still in the queue, neither waiting nor frozen as far as anyone can tell.
    """
    where = mta.where(queue_id)
    if where is None and mta.name == "exim":
        bp = mta.instance.run([f"-qG{mta.instance.queue_name}", "-bp"]).stdout.decode("utf-8", "replace")
        lines = bp.splitlines()
        if any(line.split() == [queue_id] and "spool format error" in after
               for line, after in zip(lines, lines[1:])):
            return "spool format error"
    return where


def remove_argv(mta, queue_id: str):
    i = mta.instance
    if mta.name == "postfix":
        return ["postsuper", "-c", i.config_directory, "-d", queue_id]
    return i.argv + [f"-qG{i.queue_name}", "-Mrm", queue_id]


def run_qrunner(qr, mta, how, bad, *args):
    if how != "vanished":
        return qr(*args)
    wrapper = qr.tmp_path / "vanish_run.py"
    wrapper.write_text(VANISH_RUN)
    proc = subprocess.run([sys.executable, str(wrapper)] + remove_argv(mta, bad) + ["--"] + list(args),
                          env=qr._env(), capture_output=True, text=True, timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# -- the cases ------------------------------------------------------------------------------


def _cases():
    for mta_name in ("postfix", "exim"):
        for how in CONTENT_DAMAGE + (ENVELOPE_DAMAGE if mta_name == "exim" else []):
            yield pytest.param(mta_name, how, id=f"{mta_name}-{how}")


@pytest.mark.reliability
@pytest.mark.parametrize("mta, how", list(_cases()), indirect=["mta"])
def test_a_damaged_queue_file_is_named_the_others_go_nothing_is_lost(tmp_path, figures, mta, how):
    qr = Qrunner(tmp_path, mta, SCRIPT)
    good = mta.queue_message("good one")
    bad = mta.queue_message("bad one", to=("damaged@example.net",))
    path = queue_file(mta, bad)
    if how != "vanished":
        damage(mta, path, how)

    if how in EXTRA_LINES or how in ENVELOPE_DAMAGE:  # the plan, first: it changes nothing
        plan = qr("plan")
        assert plan.code == 0, plan.stderr
        assert "Traceback" not in plan.stderr
        assert [line.split()[:2] for line in plan.stdout.splitlines() if line.startswith(good)] == [[good, "send"]]
        assert listed(mta, bad) != HELD

    result = run_qrunner(qr, mta, how, bad, "run")

    assert "Traceback" not in result.stderr, result.stderr
    assert result.code in (0, 1), result.stderr
    mta.sink.wait_for(1)
    mta.wait_gone(good)
    log_lines = result.stderr.splitlines()
    snapshot = {queue_id: (listed(mta, queue_id),) for queue_id in (good, bad)}
    snapshot = {queue_id: where for queue_id, where in snapshot.items() if where[0] is not None}
    if how == "vanished":
        assert bad not in snapshot
    else:
        assert bad in snapshot, f"the damaged message left the queue: {result.stderr}"
        assert any(bad in line for line in log_lines), result.stderr
    if how in ENVELOPE_DAMAGE:
        [warning] = [line for line in log_lines if bad in line]
        assert "cannot be read" in warning and path in warning and "-Mrm" in warning
        assert snapshot[bad][0] != HELD
    elif how in EXTRA_LINES:
        # the policy saw the fields the MTA's own tool shows, up to qrunner's 256 KiB cap, and held the message
        [seen] = [line for line in log_lines if bad in line and "seen " in line]
        fields = int(seen.split("seen ")[1].split()[0])
        expected = tool_field_count(mta, bad)
        if how in ("huge-header-block", "many-header-lines"):
            assert 0 < fields < expected and any("longer than 262144 bytes" in line for line in log_lines)
        else:
            assert fields == expected and "subject bad one" in seen
        if snapshot[bad][0] == HELD:
            status = qr("status").stdout
            assert any(line.startswith(bad) and "the damaged one waits" in line for line in status.splitlines()), \
                status
        else:  # Exim refuses a header with a NUL byte ("Spool format error"): its words, the message stays queued
            assert any(line.startswith("qrunner[") and f"{bad}: exim -Mf did not act on it: " in line
                       for line in log_lines), result.stderr
    elif how in ("truncated-in-headers", "corrupted-in-headers"):
        assert any(bad in line and "headers" in line and path in line for line in log_lines), \
            result.stderr
        if snapshot[bad][0] == HELD:  # Exim may refuse to freeze a file it cannot read: then it stays waiting
            assert any(line.startswith(bad) for line in qr("status").stdout.splitlines())
    figures.record("inputs", f"damaged queue file in a real {mta.name} queue: {how}", tried=1, survived=1, lost=0)


@pytest.mark.reliability
@pytest.mark.parametrize("mta", ["exim"], indirect=True)
def test_a_hold_whose_spool_file_is_damaged_keeps_its_record_until_the_file_is_repaired(tmp_path, figures, mta):
    """A message missing from the listing would count as gone and its hold record would go: a damaged one must not."""
    qr = Qrunner(tmp_path, mta, SCRIPT)
    bad = mta.queue_message("bad one", to=("damaged@example.net",))
    assert qr("run").code == 0
    assert mta.where(bad) == HELD
    path = queue_file(mta, bad)
    with open(path, "rb") as f:
        intact = f.read()
    damage(mta, path, "garbage-envelope")

    result = qr("run")

    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert listed(mta, bad) == "spool format error"
    assert any(f"{bad}: Exim's spool file {path} cannot be read" in line for line in result.stderr.splitlines())
    assert "hold record dropped" not in result.stderr
    status = qr("status").stdout
    assert any(line.startswith(bad) and "the damaged one waits" in line for line in status.splitlines()), status

    with open(path, "r+b") as f:  # the admin repairs it
        f.write(intact)
        f.truncate()
    result = qr("run")

    assert result.code == 0 and "cannot be read" not in result.stderr, result.stderr
    assert mta.where(bad) == HELD
    assert any(line.startswith(bad) and "the damaged one waits" in line for line in qr("status").stdout.splitlines())
    figures.record("inputs", "a held message's Exim spool file damaged, then repaired: record kept", tried=1,
                   survived=1, lost=0)
