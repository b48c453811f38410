"""The queue file readers fuzzed with hypothesis, and checked against the MTA's own reader (issue 14, point 2).

Seeds are real files: messages queued in the test setup's Postfix and Exim (folded and 8-bit headers, a line longer
than Postfix's record limit, several recipients, DSN options), their queue files and ``-H`` files copied as the MTA
wrote them. Hypothesis mutates them (bytes flipped, inserted, deleted, duplicated, cut; a header record's text
replaced with any bytes, its record kept well formed) and also tries plain random bytes. Two properties:

- nothing ever raises but the documented error: the header sources never raise; ``iter_records``, ``read_route``
  and ``read_sender`` never raise; ``read_envelope`` and ``iter_content`` raise only QueueFileError;
  ``read_header_file`` only SpoolFormatError; and the fast and the general Postfix header readers agree whenever the
  fast one answers, as do Exim's quick listing and header readers (``quick_envelope``, ``quick_header_fields``)
  and the general ``read_header_file``;
- for a fixed corpus of mutations, every file the MTA's own tool reads gives what the tool gives: ``postcat -h FILE``
  for Postfix; for Exim, the message's header fields as Exim itself parses the ``-H`` file (``exim -Mset ID -be
  '$message_headers_raw'``, with the mutated file in the spool: ``exim -Mvh`` only copies the file out unparsed).

In the normal suite 2,000 examples per property; ``make reliability`` (QRUNNER_LONG=1) runs 20,000.
"""

from __future__ import annotations

import os
import random
import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrunner.mta import exim_spool
from qrunner.mta.exim_spool import EximSpoolHeaders, SpoolFormatError, parse_recipient_line, read_header_file
from qrunner.mta.postfix_envelope import QueueFileError, iter_content, read_envelope, read_route, read_sender
from qrunner.mta.postfix_queuefile import PostfixQueueFileHeaders, _fast_header_fields, _read_header_fields
from qrunner.mta.postfix_records import iter_records
from test_hostile_queue_files import _record, _records

LONG = os.environ.get("QRUNNER_LONG") == "1"
EXAMPLES = 20000 if LONG else 2000  # thousands in the suite too (a few seconds)
ORACLE_FILES = 300 if LONG else 60

FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Raw messages (folded lines, 8-bit bytes, a line past Postfix's 2048-byte record limit), with their recipients.
_HEAD = b"From: alice@qrunner-test.localdomain\nSubject: %s\nMessage-ID: <%s@qrunner-test.localdomain>\n"
MESSAGES = [
    (_HEAD % (b"plain", b"m1") + b"To: bob@example.net\n\nbody\n", ("bob@example.net",)),
    (_HEAD % (b"folded and 8-bit", b"m2") + b"To: bob@example.net,\n\tcarol@example.org\nX-Folded: one\n two\n"
     b"\tthree\nX-Eight: caf\xc3\xa9 \xff\n\nbody\n", ("bob@example.net", "carol@example.org")),
    (_HEAD % (b"long line", b"m3") + b"To: dave@example.net\nX-Long: " + b"x" * 5000 + b"\n\nbody\n" * 20,
     ("dave@example.net",)),
]


# -- seeds from the real MTAs -----------------------------------------------------------


@pytest.fixture
def postfix_seeds(postfix):
    ids = []
    for message, to in MESSAGES:
        queue_id = postfix.submit("alice@qrunner-test.localdomain", list(to), message)
        ids.append(queue_id)
    postfix.wait_deferred(ids)
    seeds = []
    for queue_id in ids:
        [path] = [os.path.join(d, queue_id) for d, _dirs, files in os.walk(os.path.join(postfix.queue_directory,
                                                                                        "deferred"))
                  if queue_id in files]
        with open(path, "rb") as f:
            seeds.append(f.read())
    return postfix, seeds


@pytest.fixture
def exim_seeds(exim):
    ids = []
    for message, to in MESSAGES:
        ids.append(exim.submit("alice@qrunner-test.localdomain", list(to), message))
    # a frozen message (a "-frozen" option line) and one with DSN data on its recipient lines ("... #3")
    ids.append(exim.submit_smtp("alice@qrunner-test.localdomain", ["bob@example.net", "carol@example.net"],
                                MESSAGES[0][0], mail_params="RET=HDRS ENVID=fuzz-1",
                                rcpt_params={"bob@example.net": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org"}))
    exim.wait_queued(ids)
    exim.freeze(ids[1:2])
    seeds = []
    for message_id in ids:
        with open(exim.header_path(message_id), "rb") as f:
            seeds.append(f.read())
    return exim, ids, seeds


# -- mutations ---------------------------------------------------------------------------


def _mutate_bytes(data: bytes, rnd) -> bytes:
    """One to four byte-level mutations, drawn from ``rnd`` (a random.Random or a hypothesis drawer)."""
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.choice(["flip", "insert", "delete", "truncate", "duplicate", "set"])
        pos = rnd.randint(0, len(data))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << rnd.randint(0, 7)
        elif op == "set" and pos < len(data):
            data[pos] = rnd.choice([0, 0x0A, 0x20, 0x3A, 0x7F, 0x80, 0xFF, rnd.randint(0, 255)])
        elif op == "insert":
            data[pos:pos] = bytes(rnd.randint(0, 255) for _ in range(rnd.randint(1, 16)))
        elif op == "delete":
            del data[pos:pos + rnd.randint(1, 64)]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + rnd.randint(1, 256)]
    return bytes(data)


_TEXT = [b"a", b"Z", b":", b" ", b"\t", b"\n", b"\r", b"\xff", b"\xc3\xa9", b"\xed\xa0\x80", b"Subject: ", b"X-H:",
         b"\n ", b"\n\t"]


def _random_text(rnd, nul: bool = True) -> bytes:
    """Header-ish text: names, colons, folds, 8-bit and invalid UTF-8; NUL bytes unless ``nul`` is false
    (Exim calls a header with a NUL a spool format error, so the oracle corpus needs some without)."""
    alphabet = _TEXT + [b"\x00"] if nul else _TEXT
    return b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))


def _postfix_header_text(data: bytes, rnd, nul: bool = True) -> bytes:
    """A content record's text replaced, every record kept well formed (and the size record kept right)."""
    recs = _records(data)
    start = next(i for i, r in enumerate(recs) if r[0] == ord("M")) + 1
    end = next(i for i, r in enumerate(recs) if r[0] == ord("X"))
    out = [(t, body) for t, body, _o in recs]
    for _ in range(rnd.randint(1, 3)):
        i = rnd.randint(start, end - 1)
        out[i] = (rnd.choice([ord("N"), ord("N"), ord("L")]), _random_text(rnd, nul))
    blob = b"".join(_record(t, body) for t, body in out)
    xtra = sum(len(_record(t, body)) for t, body in out[:end])
    fields = recs[0][1].split()
    fields[0] = b"%d" % (xtra - int(fields[1]))
    size = b" ".join(b"%15d" % int(f) for f in fields)
    return blob[:2] + size + blob[2 + len(recs[0][1]):]


def _exim_header_text(data: bytes, rnd, nul: bool = True) -> bytes:
    """A header record of a ``-H`` file replaced by one with any text and a length that fits it."""
    cut = data.index(b"\n\n") + 2
    records, pos = [], cut
    while pos < len(data):
        digits = pos
        while data[digits:digits + 1].isdigit():
            digits += 1
        end = digits + 2 + int(data[pos:digits])
        records.append(data[pos:end])
        pos = end
    for _ in range(rnd.randint(1, 3)):
        text = _random_text(rnd, nul) + b"\n"
        flag = rnd.choice([b" ", b"*", b"P", b"T", b"F"])
        records[rnd.randint(0, len(records) - 1)] = b"%03d%s %s" % (len(text), flag, text)
    return data[:cut] + b"".join(records)


class _Drawer:
    """random.Random's face over hypothesis's ``data.draw``, so one mutation code serves both."""

    def __init__(self, data):
        self.data = data

    def randint(self, a, b):
        return self.data.draw(st.integers(a, b))

    def choice(self, seq):
        return self.data.draw(st.sampled_from(seq))


def _fuzz_input(data, seeds, structured):
    rnd = _Drawer(data)
    kind = rnd.choice(["bytes", "mutated", "structured", "structured+bytes"])
    if kind == "bytes":
        return data.draw(st.binary(max_size=4096))
    seed = rnd.choice(seeds)
    if kind != "mutated":
        seed = structured(seed, rnd)
    if kind != "structured":
        seed = _mutate_bytes(seed, rnd)
    return seed


# -- no input raises anything but the documented error ---------------------------------------


@pytest.mark.reliability
def test_postfix_readers_never_raise_on_fuzzed_queue_files(tmp_path, figures, postfix_seeds):
    _postfix, seeds = postfix_seeds
    path = str(tmp_path / "deferred-ABCDEF123")
    count = [0]

    @FUZZ
    @given(st.data())
    def check(data):
        blob = _fuzz_input(data, seeds, _postfix_header_text)
        with open(path, "wb") as f:
            f.write(blob)
        source = PostfixQueueFileHeaders(path, "ABCDEF123")
        fields = source.read()
        assert all(isinstance(x, bytes) for x in fields)
        assert source.problem is None or isinstance(source.problem, str)
        fast = _fast_header_fields(blob[:16384], 262144)
        if fast is not None:
            with open(path, "rb", buffering=0) as f:
                assert _read_header_fields(f, 262144)[0] == fast
        with open(path, "rb", buffering=0) as f:
            list(iter_records(f))
        read_route(path)
        read_sender(path)
        for reader in (read_envelope, lambda p: list(iter_content(p))):
            try:
                reader(path)
            except QueueFileError:
                pass
        count[0] += 1

    check()
    figures.record("inputs", "fuzzed Postfix queue files (random bytes and mutations of real ones)",
                   tried=count[0], survived=count[0])


@pytest.mark.reliability
def test_exim_readers_never_raise_on_fuzzed_header_files(tmp_path, figures, exim_seeds):
    _exim, ids, seeds = exim_seeds
    count = [0]
    quick_answers = [0]

    @FUZZ
    @given(st.data())
    def check(data):
        blob = _fuzz_input(data, seeds, _exim_header_text)
        path = str(tmp_path / (ids[0] + "-H"))
        with open(path, "wb") as f:
            f.write(blob)
        source = EximSpoolHeaders(path, ids[0])
        fields = source.read()
        assert all(isinstance(x, bytes) for x in fields)
        assert source.problem is None or isinstance(source.problem, str)
        try:
            full = read_header_file(path)
            sizes = read_header_file(path, read_headers=False)
        except SpoolFormatError:
            full = None
        else:
            assert (full.header_size, full.recipients, full.sender) == (sizes.header_size, sizes.recipients,
                                                                        sizes.sender)
            full.pending_recipients, full.arrival, full.frozen_at  # noqa: B018 - must not raise either
        for recipients in (True, False):
            quick = exim_spool.quick_envelope(blob, ids[0], recipients)
            if quick is not None:  # the quick reader answers only where the general one reads the file whole
                quick_answers[0] += 1
                assert full is not None and full.problem is None, blob
                assert quick[:-1] == (full.sender, full.arrival, full.frozen,
                                      tuple(r.address for r in full.recipients) if recipients else (),
                                      full.non_recipients, full.header_size), blob
                fields = exim_spool.quick_header_fields(blob, quick[-1], 262144)
                assert fields is None or fields == full.headers, blob
        try:
            exim_spool.parse_header_file(blob)
        except SpoolFormatError:
            pass
        for line in blob.split(b"\n"):
            parse_recipient_line(line)
        count[0] += 1

    check()
    assert quick_answers[0] > 0, "the quick Exim readers never answered: the agreement above was never checked"
    figures.record("inputs", "fuzzed Exim -H files (random bytes and mutations of real ones)",
                   tried=count[0], survived=count[0])


# -- every file the MTA's own tool reads gives what the tool gives -------------------------------

# Where postcat -h meets a record that is no text line in the header part (the content offset points into the
# middle of a record, a type byte is damaged), it prints the record with its rec_type_name() label
# (src/global/rec_type.c) instead: such a file is one Postfix reads as damaged, not as headers.
_POSTCAT_RECORD_LABEL = re.compile(
    rb"^(unknown_record_type|message_size|message_arrival_time|queue_file_create_time|sender_fullname|"
    rb"content_filter|sender|done_recipient|canceled_recipient|recipient|original_recipient|warning_message_time|"
    rb"named_attribute|pointer_record|message_content|message_extracted|return_receipt|errors_to|priority|"
    rb"verp_delimiters|message_end|redirect_to|flags|dsn_return_type|dsn_envelope_id|dsn_original_recipient|"
    rb"dsn_notify_flags|regular_text|padding): ", re.M)


def _corpus(seeds, structured, n):
    rnd = random.Random(1401)
    out = []
    for i in range(n):
        seed = seeds[i % len(seeds)]
        if i % 3 != 2:
            seed = structured(seed, rnd, nul=i % 4 == 0)
        if i % 3 != 0:
            seed = _mutate_bytes(seed, rnd)
        out.append(seed)
    return list(seeds) + out


@pytest.mark.reliability
def test_postfix_header_reading_matches_postcat_on_mutated_files(tmp_path, figures, postfix_seeds):
    postfix, seeds = postfix_seeds
    compared = 0
    corpus = _corpus(seeds, _postfix_header_text, ORACLE_FILES)
    for n, blob in enumerate(corpus):
        path = str(tmp_path / f"queue-file-{n}")
        with open(path, "wb") as f:
            f.write(blob)
        tool = subprocess.run(["postcat", "-c", postfix.config_directory, "-h", path], capture_output=True, timeout=60)
        if tool.returncode != 0 or tool.stderr or _POSTCAT_RECORD_LABEL.search(tool.stdout):
            continue  # postcat cannot read it, or shows it is damaged: no oracle (the no-crash property covers it)
        # postcat prints each record's text and a newline after the last record of a line: compared as printed,
        # since a record holding a newline of its own (Postfix never writes one) makes the lines ambiguous
        fields = PostfixQueueFileHeaders(path, "ABCDEF123").read()
        assert b"".join(x + b"\n" for x in fields) == tool.stdout, f"corpus file {n}: {blob!r}: {tool.stdout!r}"
        compared += 1
    assert compared >= len(seeds) + len(corpus) // 4, "too few mutated files postcat could read to compare"
    figures.record("inputs", "mutated Postfix queue files compared with postcat -h", tried=compared,
                   survived=compared)


def _records_end_in_newlines(blob: bytes) -> bool:
    """Every header record of a ``-H`` file ends with its newline (as every file Exim writes): the test's own reader,
    after spool_in.c: a digit, then ``fscanf("%d%c ")`` (the length, the flag, any run of white space)."""
    pos = blob.index(b"\n\n") + 2
    while pos < len(blob):
        m = re.compile(rb"(\d+)(.)[ \t\n\v\f\r]*", re.S).match(blob, pos)
        if m is None:
            return False
        end = m.end() + int(m.group(1))
        if blob[end - 1:end] != b"\n":
            return False
        pos = end
    return True


@pytest.mark.reliability
def test_exim_header_reading_matches_exim_on_mutated_files(tmp_path, figures, exim_seeds):
    exim, ids, seeds = exim_seeds
    message_id = ids[0]
    exim.move(message_id, "")  # -Mset reads only the default queue
    target = exim.header_path(message_id, "")
    stat = os.stat(target)
    first_line = seeds[0][:seeds[0].index(b"\n") + 1]
    compared = mutated = 0
    corpus = _corpus(seeds, _exim_header_text, ORACLE_FILES)
    for n, blob in enumerate(corpus):
        # the file must name the message it is filed as: else both Exim and qrunner refuse it at once
        blob = first_line + blob[blob.index(b"\n") + 1:] if b"\n" in blob else first_line
        with open(target, "wb") as f:
            f.write(blob)
        os.chown(target, stat.st_uid, stat.st_gid)
        os.chmod(target, stat.st_mode & 0o7777)
        tool = exim.run(["-Mset", message_id, "-be", "$message_headers_raw"], check=False)
        if tool.returncode != 0 or b"Failed to load message" in tool.stdout + tool.stderr:
            continue
        ours = read_header_file(target, journal=False)
        if ours.problem is not None:
            # Exim read a file qrunner calls damaged: only a cut or malformed last header may differ
            assert not ours.headers_complete, f"corpus file {n}: {blob!r}"
            continue
        if not _records_end_in_newlines(blob):
            continue  # Exim joins header texts as stored: a text without its newline runs into the next one
        # -be prints the value and a newline; the value is each live header's text, its newline included
        assert b"".join(x + b"\n" for x in ours.headers) + b"\n" == tool.stdout, \
            f"corpus file {n}: {blob!r}: Exim parsed {tool.stdout!r}"
        compared += 1
        mutated += n >= len(seeds)
    assert mutated >= 1, "no mutated file Exim could read was compared (the seeds alone do not count)"
    figures.record("inputs", "mutated Exim -H files compared with Exim's own parse", tried=compared,
                   survived=compared)
