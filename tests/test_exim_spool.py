"""Exim's spool read directly: -H files, ids, paths, locks; checked against a real Exim.

The unit tests build -H files the way spool_out.c writes them; the
end-to-end tests compare the reader with what the private Exim itself says
(``exim -Mvh``, ``exim -bp``, ``$message_size``, ``-Mf``) about the same
messages.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from qrunner.mta.exim_spool import (
    EximRecipient,
    LockTable,
    EximSpoolHeaders,
    SpoolFormatError,
    data_start_offset,
    find_spool_paths,
    file_system_type,
    is_locked,
    is_message_id,
    is_queue_name,
    list_queue,
    list_spool,
    locked_inodes,
    message_size,
    parse_header_file,
    parse_recipient_line,
    read_header_file,
    spool_paths,
)


OLD_ID = "1xW85O-0001T2-2A"
NEW_ID = "1xW85O-00000001T2a-002A"


# -- building -H files as spool_out.c writes them ------------------------------


def header_record(text: bytes, flag: bytes = b" ") -> bytes:
    """One header as spool_out.c writes it: %03d length (with the newline), flag, space."""
    if not text.endswith(b"\n"):
        text += b"\n"
    return b"%03d" % len(text) + flag + b" " + text


def make_h(message_id=OLD_ID, sender=b"a@example.org", options=(), tree=(b"XX",),
           recipients=(b"b@example.com",), headers=None, login=b"root 0 0",
           received=b"1795600329 0") -> bytes:
    if headers is None:
        headers = [header_record(b"Subject: hello")]
    lines = [message_id.encode() + b"-H", login, b"<" + sender + b">", received]
    lines += list(options)
    lines += list(tree)
    lines.append(b"%d" % len(recipients))
    lines += list(recipients)
    return b"\n".join(lines) + b"\n\n" + b"".join(headers)


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


LONG_VALUE = b"x" * 1200
FULL_HEADERS = [
    header_record(b"Received: from root by host with local (Exim 4.96)\n"
                  b"\t(envelope-from <a@example.org>)\n\tid 1xW85O-0001T2-2A;\n"
                  b"\tWed, 25 Nov 2026 09:52:09 +0000", b"P"),
    header_record(b"Subject: caf\xc3\xa9 \xff raw", b" "),
    header_record(b"X-Folded: one\n two\n\tthree", b" "),
    header_record(b"X-Long: " + LONG_VALUE, b" "),
    header_record(b"X-Removed: yes", b"*"),
    header_record(b"From: a@example.org", b"F"),
]


# What full_h() holds, as Exim reads it.
FULL_OPTIONS = {"received_time_usec": ".323645", "ident": "root", "helo_name": "evil host", "auth_id": "someone",
                "frozen": "1795600400", "manual_thaw": "", "localerror": "", "dsn_envid": "abc", "dsn_ret": "2",
                "N": ""}
FULL_NON_RECIPIENTS = frozenset({"b@example.com", "d@example.com", "f@example.com"})
FULL_RECIPIENTS = (
    EximRecipient("b@example.com", orcpt="rfc822;orig@example.com", dsn_flags=12),
    EximRecipient("c@example.com", dsn_flags=2),
    EximRecipient("d@example.com"),
    EximRecipient("e@example.com", errors_to="err@example.org", pno=3),
    EximRecipient("f@example.com"),
    EximRecipient("g host@example.com", pno=2),
)
FULL_FIELDS = [  # the live headers: X-Removed is flagged deleted
    b"Received: from root by host with local (Exim 4.96)\n"
    b"\t(envelope-from <a@example.org>)\n\tid 1xW85O-0001T2-2A;\n"
    b"\tWed, 25 Nov 2026 09:52:09 +0000",
    b"Subject: caf\xc3\xa9 \xff raw",
    b"X-Folded: one\n two\n\tthree",
    b"X-Long: " + LONG_VALUE,
    b"From: a@example.org",
]


def options_before(name: str):
    """The options of full_h() whose lines come before option ``name``."""
    names = list(FULL_OPTIONS)
    return {k: FULL_OPTIONS[k] for k in names[:names.index(name)]}


def full_h() -> bytes:
    return make_h(
        options=[
            b"-received_time_usec .323645",
            b"-ident root",
            b"--helo_name evil host",
            b"--(pgsql)auth_id someone",
            # an ACL variable: its value follows on the next lines, counted
            # in bytes, and may look like anything (here: option and tree lines)
            b"-aclm _note 12", b"-frozen 1\nXX",
            b"-aclc 0 0", b"",
            b"-frozen 1795600400",
            b"-manual_thaw",
            b"-localerror",
            b"-dsn_envid abc",
            b"-dsn_ret 2",
            b"-N",
        ],
        tree=[b"YY d@example.com", b"NN b@example.com", b"NN f@example.com"],
        recipients=[
            b"b@example.com rfc822;orig@example.com 23,12  0,-1#3",
            b"c@example.com  0,2  0,-1#3",
            b"d@example.com",
            b"e@example.com  0,0 err@example.org 15,3#3",
            b"f@example.com",
            b"g host@example.com 2",
        ],
        headers=FULL_HEADERS)


# -- the -H reader on synthetic files -------------------------------------------


def test_full_header_file(tmp_path):
    path = write(tmp_path / (OLD_ID + "-H"), full_h())
    hf = read_header_file(path)
    assert hf.problem is None and hf.headers_complete
    assert hf.message_id == OLD_ID and hf.path == path
    assert (hf.login, hf.uid, hf.gid) == ("root", 0, 0)
    assert hf.sender == "a@example.org"
    assert (hf.received_time, hf.warning_count) == (1795600329, 0)
    assert hf.arrival == pytest.approx(1795600329.323645)
    assert hf.frozen and hf.frozen_at == 1795600400
    assert {"manual_thaw", "localerror", "N"} <= set(hf.options)
    assert hf.options["dsn_envid"] == "abc" and hf.options["dsn_ret"] == "2"
    # tainted ("--") and quoted ("--(type)") values, and nothing of the ACL variables
    assert hf.options["helo_name"] == "evil host"
    assert hf.options["auth_id"] == "someone"
    assert "aclm" not in hf.options and "aclc" not in hf.options
    assert [r.address for r in hf.recipients] == [
        "b@example.com", "c@example.com", "d@example.com", "e@example.com",
        "f@example.com", "g host@example.com"]
    assert hf.recipients[0] == EximRecipient("b@example.com", orcpt="rfc822;orig@example.com",
                                             dsn_flags=12, errors_to="", pno=-1)
    assert hf.recipients[3] == EximRecipient("e@example.com", dsn_flags=0,
                                             errors_to="err@example.org", pno=3)
    assert hf.recipients[5].pno == 2
    assert hf.non_recipients == FULL_NON_RECIPIENTS
    assert hf.options == FULL_OPTIONS and hf.recipients == FULL_RECIPIENTS
    assert hf.pending_recipients == ("c@example.com", "e@example.com", "g host@example.com")


def test_header_fields_are_raw_and_exclude_deleted(tmp_path):
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), full_h()))
    assert hf.headers == FULL_FIELDS
    # the long header's length took 4 digits
    assert b"\n1209  X-Long: " in full_h()
    # header_size counts every live header with its newline, not the deleted one
    live = sum(len(h) + 1 for h in hf.headers)
    assert hf.header_size == live


def test_headers_not_read_still_sized(tmp_path):
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), full_h()), read_headers=False)
    assert hf.headers == []
    assert hf.header_size == sum(len(h) + 1 for h in read_header_file(hf.path).headers)


def test_null_sender_and_new_id(tmp_path):
    path = write(tmp_path / (NEW_ID + "-H"), make_h(message_id=NEW_ID, sender=b""))
    hf = read_header_file(path)
    assert hf.sender == "" and hf.message_id == NEW_ID
    assert not hf.frozen and hf.frozen_at is None and "manual_thaw" not in hf.options
    assert hf.pending_recipients == ("b@example.com",)


def test_eight_bit_envelope_is_kept(tmp_path):
    data = make_h(sender=b"j\xc3\xb6rg@example.org", recipients=[b"\xff@example.com"])
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), data))
    assert hf.sender == "jörg@example.org"
    assert hf.recipients[0].address.encode("utf-8", "surrogateescape") == b"\xff@example.com"


def test_journal_counts_as_delivered(tmp_path):
    path = write(tmp_path / (OLD_ID + "-H"),
                 make_h(recipients=[b"b@example.com", b"c@example.com", b"d@example.com"]))
    write(tmp_path / (OLD_ID + "-J"), b"c@example.com\nd@exam")  # last line half-written
    assert read_header_file(path).pending_recipients == ("b@example.com", "d@example.com")
    assert read_header_file(path, journal=False).pending_recipients == (
        "b@example.com", "c@example.com", "d@example.com")


@pytest.mark.parametrize("data", [
    b"",
    b"hello world\n",
    OLD_ID.encode() + b"-D\nbody\n",
    b"not-an-id-H\nroot 0 0\n<a@b>\n1 0\nXX\n0\n\n",
    OLD_ID.encode() + b"-H\n",
    OLD_ID.encode() + b"-H\nroot 0 0\na@b\n1 0\nXX\n0\n\n",
    OLD_ID.encode() + b"-H\nroot zero 0\n<a@b>\n1 0\nXX\n0\n\n",
    OLD_ID.encode() + b"-H\nroot 0 0\n<a@b>\nyesterday\nXX\n0\n\n",
    b"\x00\xff\xfe" * 100,
])
def test_not_a_header_file_raises(tmp_path, data):
    with pytest.raises(SpoolFormatError):
        read_header_file(write(tmp_path / (OLD_ID + "-H"), data))
    assert issubclass(SpoolFormatError, ValueError)


def test_file_named_for_another_message_raises(tmp_path):
    with pytest.raises(SpoolFormatError, match="called"):
        read_header_file(write(tmp_path / (NEW_ID + "-H"), make_h(message_id=OLD_ID)))


@pytest.mark.parametrize("marker, options, non_recipients, recipients, fields, problem", [
    # inside an option line: the options before it, none from the cut line
    (b"-dsn_envid", options_before("dsn_envid"), frozenset(), (), [], "the file ends before the recipient list"),
    (b"0400\n-manual_thaw", options_before("frozen"), frozenset(), (), [],
     "the file ends before the recipient list"),
    # inside the non-recipients tree: the nodes before the cut
    (b"NN b@example.com", FULL_OPTIONS, {"d@example.com"}, (), [], "the non-recipients tree is malformed"),
    # inside a recipient line: the recipients before it
    (b"c@example.com  0,2", FULL_OPTIONS, FULL_NON_RECIPIENTS, FULL_RECIPIENTS[:1], [],
     "the file ends inside the recipient list"),
    # inside a header: the headers before it, and what the file holds of that one
    (b"Received: from", FULL_OPTIONS, FULL_NON_RECIPIENTS, FULL_RECIPIENTS, [b"Rec"],
     "the file ends inside a header"),
    (b"X-Long: xx", FULL_OPTIONS, FULL_NON_RECIPIENTS, FULL_RECIPIENTS, FULL_FIELDS[:3] + [b"X-L"],
     "the file ends inside a header"),
    (b"rom: a@example.org", FULL_OPTIONS, FULL_NON_RECIPIENTS, FULL_RECIPIENTS, FULL_FIELDS[:4] + [b"From"],
     "the file ends inside a header"),
], ids=["option", "option value", "tree", "recipient", "first header", "long header", "last header"])
def test_truncated_files_never_raise_past_the_envelope(tmp_path, marker, options, non_recipients, recipients,
                                                       fields, problem):
    """A -H file cut 3 bytes into ``marker`` yields exactly what full_h() wrote before the cut."""
    data = full_h()
    cut = data.index(marker) + 3
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), data[:cut]))
    assert ((hf.message_id, hf.login, hf.sender, hf.received_time), hf.options, hf.non_recipients,
            hf.recipients, hf.headers, hf.headers_complete, hf.problem) == (
        (OLD_ID, "root", "a@example.org", 1795600329), options, frozenset(non_recipients),
        recipients, fields, False, problem)


def test_malformed_header_part_is_reported_not_raised(tmp_path):
    data = make_h(headers=[header_record(b"Subject: ok"), b"garbage without a length\n"])
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), data))
    assert hf.headers == [b"Subject: ok"]
    assert hf.problem and not hf.headers_complete
    # a length longer than what is left: the part that is there, and a problem
    data = make_h(headers=[b"050  Subject: short\n"])
    hf = read_header_file(write(tmp_path / (OLD_ID + "-H"), data))
    assert hf.headers == [b"Subject: short"] and hf.problem


def test_header_cap(tmp_path):
    path = write(tmp_path / (OLD_ID + "-H"), full_h())
    whole = read_header_file(path)
    hf = read_header_file(path, max_header_bytes=300)
    assert not hf.headers_complete and "300" in hf.problem
    assert sum(len(h) for h in hf.headers) <= 300
    assert hf.headers[0] == whole.headers[0]
    # the size still counts every header
    assert hf.header_size == whole.header_size


def test_big_header_part_read_in_pieces(tmp_path):
    headers = [header_record(b"X-Many-%05d: " % i + b"v" * 200) for i in range(2000)]
    path = write(tmp_path / (OLD_ID + "-H"), make_h(headers=headers))
    assert os.path.getsize(path) > 400000
    hf = read_header_file(path, max_header_bytes=10 ** 7)
    assert len(hf.headers) == 2000 and hf.headers[-1].startswith(b"X-Many-01999: ")
    capped = read_header_file(path)  # default cap: 256 KiB kept, all sizes counted
    assert capped.header_size == hf.header_size and not capped.headers_complete
    assert read_header_file(path, read_headers=False).header_size == hf.header_size


def test_parse_header_file_in_memory():
    hf = parse_header_file(full_h())
    assert hf.message_id == OLD_ID and hf.path == ""
    assert hf.pending_recipients == ("c@example.com", "e@example.com", "g host@example.com")


@pytest.mark.parametrize("line, expected", [
    (b"b@example.com", EximRecipient("b@example.com")),
    (b"u@host1", EximRecipient("u@host1")),
    (b"u@[127.0.0.1]", EximRecipient("u@[127.0.0.1]")),
    (b"b@example.com rfc822;o@x.org 14,14  0,-1#3",
     EximRecipient("b@example.com", orcpt="rfc822;o@x.org", dsn_flags=14)),
    (b"c@example.com  0,2  0,-1#3", EximRecipient("c@example.com", dsn_flags=2)),
    (b"c d@example.com  0,8  0,-1#3", EximRecipient("c d@example.com", dsn_flags=8)),
    (b"e@example.com  0,0 err@example.org 15,3#3",
     EximRecipient("e@example.com", errors_to="err@example.org", pno=3)),
    # the pre-DSN form: errors_to and pno only
    (b"e@example.com err@example.org 15,3#1",
     EximRecipient("e@example.com", errors_to="err@example.org", pno=3)),
    (b"e@example.com  0,4#1", EximRecipient("e@example.com", pno=4)),
    # early Exim 4 and Exim 3
    (b"p@example.com 7", EximRecipient("p@example.com", pno=7)),
    (b"p@example.com 0,7,0", EximRecipient("p@example.com", pno=7)),
    # shapes that do not fit stay whole, as Exim leaves them
    (b"weird@example.com 99,1#3", EximRecipient("weird@example.com 99,1#3")),
    (b"#3", EximRecipient("#3")),
    (b"123", EximRecipient("123")),
])
def test_recipient_lines(line, expected):
    assert parse_recipient_line(line) == expected


# -- ids, paths, sizes, listing, locks ----------------------------------------------


@pytest.mark.parametrize("value", [OLD_ID, NEW_ID, "000000-000000-00", "zzzzzz-ZZZZZZZZZZZ-zzzz"])
def test_message_ids(value):
    assert is_message_id(value)


@pytest.mark.parametrize("value", [
    "", "1xW85O-0001T2-2", "1xW85O-0001T2-2AB", "1xW85O-0001T2_2A", "1xW85O_0001T2-2A",
    "1xW85O-00000001T2a-02A", "1xW85O-0000001T2a-002A", "1xW85O-0001T2-2A\n",
    " 1xW85O-0001T2-2A", "../../etc/pa-sswd00-xx", "-Mrm", "1xW85O-0001T2-2Ä",
    "1xW85O-0001T2-2A-H", None, 12, b"1xW85O-0001T2-2A",
])
def test_not_message_ids(value):
    assert not is_message_id(value)


def test_queue_names():
    assert is_queue_name("") and is_queue_name("qrunner") and is_queue_name("q-1.x_y")
    for bad in ("..", "../x", "a/b", "-qG", " q", "q\n", None):
        assert not is_queue_name(bad)


def test_spool_paths():
    p = spool_paths("/var/spool/exim4", "", OLD_ID, False)
    assert p.header == "/var/spool/exim4/input/%s-H" % OLD_ID
    assert p.data == "/var/spool/exim4/input/%s-D" % OLD_ID
    assert p.journal == "/var/spool/exim4/input/%s-J" % OLD_ID
    assert p.msglog == "/var/spool/exim4/msglog/%s" % OLD_ID
    p = spool_paths("/s", "qrunner", OLD_ID, True)
    assert p.header == "/s/qrunner/input/O/%s-H" % OLD_ID  # the 6th character
    assert p.msglog == "/s/qrunner/msglog/O/%s" % OLD_ID
    p = spool_paths("/s", "qrunner", NEW_ID, True)
    assert p.data == "/s/qrunner/input/O/%s-D" % NEW_ID
    with pytest.raises(ValueError):
        spool_paths("/s", "", "../../x", False)
    with pytest.raises(ValueError):
        spool_paths("/s", "../x", OLD_ID, False)


def test_find_spool_paths_tries_both_layouts(tmp_path):
    spool = str(tmp_path)
    os.makedirs(os.path.join(spool, "q", "input", "O"))
    write(os.path.join(spool, "q", "input", OLD_ID + "-H"), make_h())
    found = find_spool_paths(spool, "q", OLD_ID, True)
    assert found is not None and found.header.endswith("/q/input/%s-H" % OLD_ID)
    assert find_spool_paths(spool, "q", NEW_ID, True) is None


def test_message_size_formula(tmp_path):
    hpath = write(tmp_path / (OLD_ID + "-H"), full_h())
    dpath = write(tmp_path / (OLD_ID + "-D"), OLD_ID.encode() + b"-D\nbody line\n")
    hf = read_header_file(hpath)
    assert data_start_offset(OLD_ID) == 19 and data_start_offset(NEW_ID) == 26
    assert message_size(hf, dpath) == hf.header_size + len(b"body line\n") + 1
    assert message_size(hf, str(tmp_path / "gone-D")) is None


def test_list_spool(tmp_path):
    spool = str(tmp_path)
    top = os.path.join(spool, "qrunner", "input")
    os.makedirs(os.path.join(top, "O"))
    os.makedirs(os.path.join(top, "A"))
    ids = ["1xW85O-0001T2-2A", "1xW85O-0001T3-2B", "1xW86A-0001T4-2C", NEW_ID]
    write(os.path.join(top, ids[0] + "-H"), b"")       # leftover from before splitting
    write(os.path.join(top, "O", ids[1] + "-H"), b"")
    write(os.path.join(top, "A", ids[2] + "-H"), b"")
    write(os.path.join(top, "O", NEW_ID + "-H"), b"")
    for junk in ("hdr.1234", ids[1] + "-D", ids[1] + "-J", "notanid-H", "x-H"):
        write(os.path.join(top, "O", junk), b"")
    got = dict(list_spool(spool, "qrunner", split_spool_directory=True))
    assert sorted(got) == sorted(ids)
    assert got[ids[2]] == os.path.join(top, "A", ids[2] + "-H")
    assert list(list_spool(spool, "")) == []          # no default queue yet
    assert list(list_spool(spool, "other")) == []
    with pytest.raises(ValueError):
        list(list_spool(spool, "../etc"))


_HOLD_LOCK = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[2]), 0)
print("locked", flush=True)
sys.stdin.read()
"""


def test_is_locked_sees_another_process_lock(tmp_path):
    dpath = write(tmp_path / (OLD_ID + "-D"), OLD_ID.encode() + b"-D\nbody\n")
    assert not is_locked(dpath)
    # Exim locks the first line only (SPOOL_DATA_START_OFFSET bytes)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, dpath, "19"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        assert is_locked(dpath)
        assert is_locked(dpath)  # asking took no lock of ours
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert not is_locked(dpath)
    assert not is_locked(str(tmp_path / "missing-D"))


_PROC_LOCKS_TEXT = (b"1: POSIX  ADVISORY  WRITE 4242 fe:00:2163621 0 18\n"
                    b"1: -> POSIX  ADVISORY  WRITE 4243 fe:00:2163621 0 18\n"
                    b"2: FLOCK  ADVISORY  WRITE 2978 fe:00:9134081 0 EOF\n"
                    b"3: OFDLCK ADVISORY  READ  -1 00:2d:77 0 EOF\n"
                    b"4: LEASE  ACTIVE    READ  1979 fe:00:31 0 EOF\n")


def test_the_kernels_lock_list_is_read_for_posix_and_ofd_locks_and_refused_when_unreadable():
    assert locked_inodes(_PROC_LOCKS_TEXT) == {2163621, 77}  # flock and leases: not what F_GETLK sees
    assert locked_inodes(b"") == set()
    # a POSIX line in a form this does not know must not hide its lock: no table at all
    assert locked_inodes(_PROC_LOCKS_TEXT + b"5: POSIX ADVISORY WRITE 77 someday-a-new-form\n") is None


def test_the_spool_file_system_type_comes_from_mountinfo():
    mountinfo = (b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                 b"40 27 0:45 / /var/spool/exim rw master:3 - nfs4 srv:/spool rw\n")
    assert file_system_type(mountinfo, os.makedev(254, 0)) == "ext4"
    assert file_system_type(mountinfo, os.makedev(0, 45)) == "nfs4"
    assert file_system_type(mountinfo, os.makedev(0, 99)) is None  # e.g. a btrfs sub-volume's own st_dev


def _queue_with_one_message(tmp_path):
    spool = tmp_path / "spool"
    top = spool / "qrunner" / "input"
    top.mkdir(parents=True)
    write(top / (OLD_ID + "-H"), full_h())
    dpath = write(top / (OLD_ID + "-D"), OLD_ID.encode() + b"-D\nbody\n")
    return str(spool), str(top), dpath


def test_without_a_usable_lock_list_the_listing_asks_each_data_file(tmp_path):
    spool, top, dpath = _queue_with_one_message(tmp_path)
    fake_proc = tmp_path / "proc"  # no locks file, and a pid namespace file that is not the initial namespace's
    (fake_proc / "self" / "ns").mkdir(parents=True)
    write(fake_proc / "self" / "ns" / "pid", b"")
    assert LockTable.for_directory(top, str(fake_proc)) is None
    assert LockTable.for_directory(top, str(tmp_path / "no-proc")) is None

    def listed(proc):
        return [(e.message_id, e.locked, e.size) for e in list_queue(spool, "qrunner", proc=proc)]

    unlocked = listed(str(fake_proc))
    assert [(mid, locked) for mid, locked, _size in unlocked] == [(OLD_ID, False)]
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, dpath, "19"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        assert listed(str(fake_proc)) == [(OLD_ID, True, unlocked[0][2])]
        assert listed("/proc") == [(OLD_ID, True, unlocked[0][2])]
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert listed("/proc") == unlocked


def test_a_lock_table_asks_every_file_it_cannot_clear(tmp_path):
    _spool, top, dpath = _queue_with_one_message(tmp_path)
    size = os.stat(dpath).st_size
    device, inode = os.stat(top).st_dev, os.stat(dpath).st_ino
    assert LockTable(device, "/proc", set()).data_file(dpath) == (size, False)
    assert LockTable(device, "/proc", {inode}).data_file(dpath) == (size, False)  # named, asked: not locked
    assert LockTable(device, "/proc", set()).data_file(dpath + "-gone") is None
    link = tmp_path / "link-D"
    os.symlink(dpath, link)
    assert LockTable(device, "/proc", set()).data_file(str(link)) == (size, False)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, dpath, "19"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        assert LockTable(device, "/proc", {inode}).data_file(dpath) == (size, True)
        assert LockTable(-1, "/proc", set()).data_file(dpath) == (size, True)  # another device: asked
        stale = LockTable(device, "/proc", set())
        stale.next_read = 0  # due to read /proc/locks again: the next file finds the lock there
        assert stale.data_file(dpath) == (size, True) and inode in stale.inodes
        gone = LockTable(device, str(tmp_path / "no-proc"), set())
        gone.next_read = 0  # due to read a /proc/locks that is gone: from then on every file is asked
        assert gone.data_file(dpath) == (size, True) and gone.data_file(dpath) == (size, True)
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_spool_headers_source_reads_lazily_and_pickles(tmp_path):
    path = write(tmp_path / (OLD_ID + "-H"), full_h())
    src = EximSpoolHeaders(path, OLD_ID)
    clone = pickle.loads(pickle.dumps(src))
    assert clone == src and hash(clone) == hash(src)
    assert clone.read() == read_header_file(path).headers and clone.problem is None
    capped = EximSpoolHeaders(path, OLD_ID, max_bytes=100)
    assert capped.read() and "100" in capped.problem


def test_spool_headers_source_problems_never_raise(tmp_path):
    gone = EximSpoolHeaders(str(tmp_path / (OLD_ID + "-H")), OLD_ID)
    assert gone.read() == [] and "cannot read" in gone.problem
    bad = EximSpoolHeaders(write(tmp_path / (NEW_ID + "-H"), b"junk\n"), NEW_ID)
    assert bad.read() == [] and "not read" in bad.problem


def test_spool_headers_source_falls_back_to_mvh(tmp_path):
    real = write(tmp_path / "elsewhere", full_h())
    # stands in for "exim -C cfg -qGq": prints the -H file, as -Mvh does
    cat = [sys.executable, "-c",
           "import sys; sys.stdout.buffer.write(open(%r, 'rb').read())" % real]
    src = EximSpoolHeaders(str(tmp_path / (OLD_ID + "-H")), OLD_ID, mvh_argv=cat)
    assert src.read() == read_header_file(real).headers
    failing = EximSpoolHeaders(str(tmp_path / (OLD_ID + "-H")), OLD_ID,
                               mvh_argv=[sys.executable, "-c", "import sys; sys.exit('no such message')"])
    assert failing.read() == [] and "exited with 1" in failing.problem
    unsafe = EximSpoolHeaders(str(tmp_path / "x-H"), "-Mrm", mvh_argv=cat)
    assert unsafe.read() == [] and "not an Exim message id" in unsafe.problem


# -- against the private Exim ----------------------------------------------------------

HEADERS_MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.com\n"
    b"Subject: caf\xc3\xa9 \xe9 8-bit\n"
    b"X-Folded: first\n  second line\n\tthird line\n"
    b"X-Long: " + b"L" * 1500 + b"\n"
    b"X-Qrunner-Test-Remove: this one is deleted\n"
    b"\n"
    b"body\n"
)


def _read(exim, message_id, queue=None):
    q = exim.queue_name if queue is None else queue
    paths = spool_paths(exim.spool_directory, q, message_id, exim.split_spool_directory)
    return read_header_file(paths.header), paths


def test_gate_keeps_relay_mail_in_named_queue(exim, exim_sink):
    relay = exim.submit("alice@example.org", ["bob@example.com"], b"Subject: gated\n\nx\n")
    local = exim.submit("alice@example.org", ["root@localhost"], b"Subject: local\n\nx\n")
    assert os.path.exists(exim.header_path(relay))
    assert dict(list_spool(exim.spool_directory, exim.queue_name)).keys() == {relay}
    assert "%s no immediate delivery: queued in qrunner by ACL" % relay in exim.log_text()
    deadline = time.monotonic() + 10
    while local in exim.queue_ids("") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert local not in exim.queue_ids("")          # local mail delivered at once
    assert "Subject: local" in exim.mailbox_text()
    time.sleep(0.5)
    assert exim_sink.messages == [] and exim.queue_ids() == [relay]
    exim.deliver(relay)
    assert exim_sink.wait_for(1)[0].rcpt_tos == ["bob@example.com"]
    assert exim.queue_ids() == []


def test_gate_decides_per_message_in_a_batch(exim, exim_sink):
    """A local message after a gated one in the same batch is not gated."""
    def one(subject, rcpt):
        return (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                b"Subject: %s\r\n\r\nx\r\n.\r\n" % (rcpt, subject))
    batch = (one(b"relay", b"bob@example.com") + one(b"local", b"root@localhost")
             + one(b"mixed", b"carol@example.com>\r\nRCPT TO:<root@localhost")
             + b"QUIT\r\n")
    exim.run(["-bS"], input=batch)
    gated = exim.queue()
    assert [m["recipients"] for m in gated] == [["bob@example.com"],
                                                ["carol@example.com", "root@localhost"]]
    deadline = time.monotonic() + 10
    while exim.queue_ids("") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exim.queue_ids("") == [] and "Subject: local" in exim.mailbox_text()
    time.sleep(0.3)
    assert exim_sink.messages == []


def test_headers_match_mvh(exim):
    mid = exim.submit("alice@example.org", ["bob@example.com"], HEADERS_MESSAGE)
    hf, paths = _read(exim, mid)
    assert hf.problem is None
    assert hf.headers == exim.headers_mvh(mid)
    names = [h.split(b":", 1)[0] for h in hf.headers]
    assert b"X-Qrunner-Test-Remove" not in names
    with open(paths.header, "rb") as f:
        assert b"* X-Qrunner-Test-Remove:" in f.read()  # it is there, flagged deleted
    assert b"X-Folded: first\n  second line\n\tthird line" in hf.headers
    assert b"Subject: caf\xc3\xa9 \xe9 8-bit" in hf.headers
    long = [h for h in hf.headers if h.startswith(b"X-Long:")]
    assert len(long) == 1 and len(long[0]) > 999
    assert b"Received" in names and b"Message-Id" in names  # Exim's own additions
    assert EximSpoolHeaders(paths.header, mid).read() == hf.headers


def test_headers_match_what_the_relay_receives(exim, exim_sink):
    message = HEADERS_MESSAGE.replace(b"X-Long: " + b"L" * 1500 + b"\n", b"")
    mid = exim.submit("alice@example.org", ["bob@example.com"], message)
    hf, _paths = _read(exim, mid)
    exim.deliver(mid)
    got = exim_sink.wait_for(1)[0].data.replace(b"\r\n", b"\n")
    assert got.split(b"\n\n", 1)[0] == b"\n".join(hf.headers)


def test_envelope_matches_bp_after_partial_delivery(exim, exim_sink):
    exim_sink.defer_rcpt = {"carol@example.net"}
    mid = exim.submit("alice@example.org", ["bob@example.com", "carol@example.net"],
                      b"Subject: two\n\nx\n")
    hf, _ = _read(exim, mid)
    assert hf.pending_recipients == ("bob@example.com", "carol@example.net")
    exim.deliver(mid)
    exim_sink.wait_for(1)
    hf, _ = _read(exim, mid)
    [listed] = exim.queue()
    assert listed["id"] == mid and listed["delivered"] == ["bob@example.com"]
    assert list(hf.pending_recipients) == listed["recipients"] == ["carol@example.net"]
    assert "bob@example.com" in hf.non_recipients
    assert hf.sender == listed["sender"] == "alice@example.org"
    assert not hf.frozen and not listed["frozen"]


def test_dsn_recipients_match_bp(exim, exim_sink):
    exim_sink.defer_rcpt = {"dave@example.net"}
    mid = exim.submit_smtp(
        "alice@example.org", ["bob@example.com", "carol@example.net", "dave@example.net"],
        b"Subject: dsn\n\nx\n", mail_params="RET=HDRS ENVID=qr-1",
        rcpt_params={"bob@example.com": "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com",
                     "dave@example.net": "NOTIFY=DELAY ORCPT=rfc822;d@example.org"})
    hf, paths = _read(exim, mid)
    with open(paths.header, "rb") as f:
        assert b"#3\n" in f.read()  # the DSN suffix is there to strip
    assert hf.options["dsn_envid"] == "qr-1" and hf.options["dsn_ret"] == "2"
    by_address = {r.address: r for r in hf.recipients}
    assert by_address["bob@example.com"].orcpt == "rfc822;bob@example.com"
    assert by_address["bob@example.com"].dsn_flags != 0
    assert by_address["dave@example.net"].orcpt == "rfc822;d@example.org"
    assert list(hf.pending_recipients) == exim.queue()[0]["recipients"]
    exim.deliver(mid)
    exim_sink.wait_for(1)
    hf, _ = _read(exim, mid)
    assert list(hf.pending_recipients) == exim.queue()[0]["recipients"] == ["dave@example.net"]


def test_message_size_matches_exim(exim):
    """$message_size is the reader's size; the reception log's S= agrees too,
    except that it counts one byte more per header longer than 999 bytes
    (spool_write_header() assumes 3-digit lengths when it sizes the headers)."""
    short = exim.submit("alice@example.org", ["bob@example.com"],
                        b"Subject: s\nX-Qrunner-Test-Remove: 1\n\n" + b"more\n" * 50)
    hf, paths = _read(exim, short)
    assert "%s <= alice@example.org U=root P=local S=%d " % (
        short, message_size(hf, paths.data)) in exim.log_text()
    mid = exim.submit("alice@example.org", ["bob@example.com"], HEADERS_MESSAGE + b"more\n" * 50)
    hf, paths = _read(exim, mid)
    size = message_size(hf, paths.data)
    assert "%s <= alice@example.org U=root P=local S=%d " % (mid, size + 1) in exim.log_text()
    # -Mset reads only the default queue in Exim 4.96: move it there first
    exim.move(mid, "", from_queue=exim.queue_name)
    hf, paths = _read(exim, mid, queue="")
    assert message_size(hf, paths.data) == size
    assert exim.expand(mid, "$message_size") == str(size)


def test_frozen_flag_follows_mf_and_mt(exim):
    mid = exim.submit("alice@example.org", ["bob@example.com"], b"Subject: f\n\nx\n")
    before = int(time.time())
    exim.freeze([mid])
    hf, _ = _read(exim, mid)
    assert hf.frozen and before - 1 <= hf.frozen_at <= time.time() + 1
    assert exim.queue()[0]["frozen"]
    exim.thaw([mid])
    hf, _ = _read(exim, mid)
    assert not hf.frozen and "manual_thaw" in hf.options and not exim.queue()[0]["frozen"]


def test_is_locked_during_a_slow_delivery(exim, exim_sink):
    mid = exim.submit("alice@example.org", ["bob@example.com"], b"Subject: slow\n\nx\n")
    _hf, paths = _read(exim, mid)
    assert not is_locked(paths.data)
    exim_sink.data_delay = 5
    proc = subprocess.Popen(exim.argv + ["-qG" + exim.queue_name, "-M", mid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not is_locked(paths.data) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_locked(paths.data)
        assert proc.poll() is None  # still delivering
        assert is_locked(paths.data)
    finally:
        proc.wait(30)
    exim_sink.wait_for(1)
    assert not is_locked(paths.data)
    assert exim.queue_ids() == []


def test_a_listing_sees_the_message_an_exim_delivery_holds_as_exim_does(exim, exim_sink):
    busy = exim.submit("alice@example.org", ["bob@example.com"], b"Subject: busy\n\nx\n")
    idle = exim.submit("alice@example.org", ["carol@example.com"], b"Subject: idle\n\nx\n")
    exim_sink.data_delay = 8
    delivery = subprocess.Popen(exim.argv + ["-qG" + exim.queue_name, "-M", busy],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while busy not in exim.locked_ids() and time.monotonic() < deadline:  # the kernel's lock table
            time.sleep(0.05)
        assert exim.locked_ids() == {busy}
        listed = {e.message_id: e.locked for e in list_queue(exim.spool_directory, exim.queue_name)}
        input_directory = os.path.join(exim.spool_directory, exim.queue_name, "input")
        by_table = LockTable(os.stat(input_directory).st_dev, "/proc", locked_inodes(open("/proc/locks", "rb").read()))
        tabled = {mid: by_table.data_file(exim.data_path(mid, exim.queue_name))[1] for mid in (busy, idle)}
        exim.run(["-qG" + exim.queue_name, "-M", busy], check=False)  # Exim's own view: it is taken
        assert delivery.poll() is None
    finally:
        delivery.wait(30)
    assert listed == tabled == {busy: True, idle: False}
    assert "%s Spool file for %s is locked (another process is handling this message)" % (busy, busy) \
        in exim.log_text()
    exim_sink.wait_for(1)
    assert {e.message_id: e.locked for e in list_queue(exim.spool_directory, exim.queue_name)} == {idle: False}


def test_split_spool_directory(exim):
    exim.set(split_spool_directory="true")
    mid = exim.submit("alice@example.org", ["bob@example.com"], b"Subject: split\n\nx\n")
    paths = spool_paths(exim.spool_directory, exim.queue_name, mid, True)
    assert os.path.exists(paths.header) and os.path.exists(paths.data)
    assert os.path.basename(os.path.dirname(paths.header)) == mid[5]
    assert dict(list_spool(exim.spool_directory, exim.queue_name, True)) == {mid: paths.header}
    assert read_header_file(paths.header).headers == exim.headers_mvh(mid)


def test_listing_matches_bp(exim):
    ids = [exim.submit("s%d@example.org" % i, ["r%d@example.com" % i], b"Subject: %d\n\nx\n" % i)
           for i in range(5)]
    exim.freeze(ids[:2])
    listed = {m["id"]: m for m in exim.queue()}
    assert set(listed) == set(ids)
    for mid, path in list_spool(exim.spool_directory, exim.queue_name):
        hf = read_header_file(path, read_headers=False)
        assert hf.sender == listed[mid]["sender"]
        assert list(hf.pending_recipients) == listed[mid]["recipients"]
        assert hf.frozen == listed[mid]["frozen"]
