"""Read Exim's spool directly: the ``-H`` files, their paths, the delivery lock.

Listing an Exim queue with ``exim -bp`` or ``exipick`` and reading headers
with ``exim -Mvh`` costs a process per call (exipick: a Perl start, about
55 ms); a big queue needs the envelope and often the headers of every
message. The spool files hold all of it, and a ``-H`` file is a few
kilobytes that Python reads in microseconds. This module reads them the way
Exim's own reader does (``src/src/spool_in.c``: ``spool_read_header()``,
``read_nonrecipients_tree()``; the writer is ``spool_out.c``) and nothing
more.

The ``-H`` file, line by line::

    1xW85O-0001T2-2A-H            its own name (self-identifying)
    root 0 0                      login uid gid of the submitter
    <sender@example.org>          envelope sender in <>; "<>" is the null sender
    1795600329 0                  received time (epoch), delay warnings sent
    -received_time_usec .323645   "-" option lines, any number ("--": tainted value,
    -frozen 1795600400            "--(quoter)": quoted); -aclc/-aclm lines are
    -aclm name 5                  followed by that many bytes and a newline
    value
    XX                            the non-recipients tree ("XX": empty), see below
    2                             the recipient count, then one recipient a line
    b@example.com rfc822;o@example.com 21,12  0,-1#3
    c@example.net
                                  a blank line, then the headers:
    159P Received: from ...       length (>= 3 digits, counting the newline),
    ^I(envelope-from <...>)       a flag (P Received, F From, T To, I Message-Id,
    017* X-Removed: yes           C Cc, ... space: other; * deleted), a space and
                                  the text, folded lines included

The non-recipients tree holds the addresses already delivered (or failed
for good): one node a line, pre-order, each line starting with two letters
that say whether a left and a right subtree follow (``NY addr``). During a
delivery, Exim also appends each delivered address to ``<ID>-J`` (the
journal) before it rewrites the ``-H`` file; ``exim -bp`` counts those as
delivered too, and so do we.

Recipient lines may carry data after the address, recognised from the end
of the line (``spool_in.c`` explains why it is read backwards): the current
form is ``<address> <orcpt> <len>,<dsn_flags> <errors_to> <len>,<pno>#3``
(bit 1 of the number after ``#``: errors_to and pno present, bit 2: ORCPT
and DSN NOTIFY flags present); older Exims wrote ``<address> <pno>`` and
Exim 3 ``<address> <n>,<pno>,<n>``. Only the address is a recipient.

``$message_size`` (and the size ``exim -bp`` shows) is the sum of the
lengths of the headers not flagged ``*``, plus the ``-D`` file's size
without its first line (``<ID>-D`` and a newline), plus one for the blank
line between headers and body (``spool_open_datafile()``,
``spool_read_header()``).

Two readers of the same format. :func:`read_header_file` is the general
one: any file, any size (read in pieces, a huge header part skipped with a
seek), every problem named. :func:`quick_envelope` and
:func:`quick_header_fields` read an ordinary file held whole in memory
(under 64 KiB, the common form of its fixed lines) in one pass with no
per-message objects, which is what lets :func:`list_queue` list 10,000
messages in a fraction of a second; for anything else they answer None and
the general reader decides, so the two never differ (the fuzz test in
tests/test_fuzz_parsers.py holds them to that, and the general reader to
Exim's own parse).

Nothing here raises for what a header part contains (8-bit bytes, broken
lengths, truncation): what could be read is returned and ``problem`` says
what was wrong. :class:`SpoolFormatError` (a ValueError) is raised only for
a file that is not an Exim ``-H`` file at all, or whose fixed envelope lines
are unreadable (Exim itself refuses such a file: "spool format error").
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

from qrunner.message import HeaderReader, Message
from qrunner.mta.headers import DEFAULT_MAX_HEADER_BYTES, MtaFileHeaders

__all__ = [
    "SpoolFormatError",
    "EximRecipient",
    "EximHeaderFile",
    "read_header_file",
    "parse_header_file",
    "parse_recipient_line",
    "EximSpoolHeaders",
    "EximSpoolReader",
    "is_message_id",
    "is_queue_name",
    "arrival_second",
    "SpoolPaths",
    "spool_paths",
    "data_start_offset",
    "message_size",
    "is_locked",
    "list_spool",
    "list_queue",
    "SpoolEntry",
    "DamagedEntry",
    "quick_envelope",
    "quick_header_fields",
    "journal_addresses",
    "data_file",
    "LockTable",
    "locked_inodes",
    "file_system_type",
    "header_mark",
]

# Message ids (local_scan.h, receive.c, exim.c's regex_ismsgid): three
# groups of base-62 digits (0-9A-Za-z; base 36, upper case only, on
# case-insensitive file systems): seconds, pid, fraction of a second.
# Exim 4.96 and earlier: 6-6-2; Exim 4.97 and later: 6-11-4 (a longer pid
# field for 64-bit pids and a finer time resolution).
_ID_OLD = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}\Z")
_ID_NEW = re.compile(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{11}-[0-9A-Za-z]{4}\Z")
MESSAGE_ID_TIME_LEN = 6

# A named queue is a directory under the spool directory; refuse anything
# that could climb out of it or confuse a command line.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")

# spool_in.c refuses more than this many recipients (an arbitrary sanity
# check); so do we, rather than trust a damaged count.
_MAX_RECIPIENTS = 16384
# spool_in.c's limit on the old "-acl" variable size.
_MAX_OLD_ACL = 16384
# Read this much of a file at once; larger files are read on as needed.
_FIRST_READ = 65536
_CHUNK = 65536

_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)

# Lines 2 to 4 of a -H file in their common form, which the general reader accepts: "login uid gid",
# "<sender>", "received_time warning_count". Anything else is left to the general reader.
_COMMON_TOP = re.compile(rb"[^\n]* [0-9]+ [0-9]+\n<([^\n]*)>\n([0-9]+) [0-9]+\n")
# Option lines quick_envelope reads in one match: "-name value" lines that are not tainted, quoted or ACL variables.
_PLAIN_OPTIONS = re.compile(rb"(?:-(?!acl|-|\()[^\n]*\n)*")
_RECIPIENT_DATA_END = frozenset(b"0123456789 ,")  # the last byte of a recipient line with data after the address
_HEADER_PREFIX = re.compile(rb"([0-9]+)(.)[ \t\n\r\v\f]*", re.DOTALL)


class SpoolFormatError(ValueError):
    """The file is not an Exim ``-H`` file, or its envelope cannot be read."""


@dataclass(frozen=True)
class EximRecipient:
    """One recipient line of a ``-H`` file.

    ``address`` is the recipient; the rest is what Exim keeps beside it:
    the DSN original recipient (``ORCPT=``) and NOTIFY flags (``dsn_flags``,
    Exim's ``rf_notify_*`` bits), the address that errors for it go to,
    and the parent number of a "one-time" alias (-1 for none).
    """

    address: str
    orcpt: str = ""
    dsn_flags: int = 0
    errors_to: str = ""
    pno: int = -1


@dataclass
class EximHeaderFile:
    """What one ``-H`` file says about its message.

    ``sender`` is "" for the null sender (a bounce). ``recipients`` are all
    recipient lines in order; ``non_recipients`` the addresses already done
    (the tree plus the journal); :attr:`pending_recipients` is what
    ``exim -bpu`` lists. ``options`` holds every ``-name value`` line as
    name -> value ("" for a flag), without ACL variables. ``headers`` are
    the live header fields (not flagged ``*``) as raw bytes, one entry per
    field, folded lines joined by ``b"\\n"``, no final newline; empty when
    headers were not asked for. ``header_size`` is the total length of the
    live headers (always computed: ``$message_size`` needs it).
    ``problem`` says what could not be read, or is None.
    """

    message_id: str
    path: str
    login: str
    uid: int
    gid: int
    sender: str
    received_time: int
    warning_count: int
    options: Dict[str, str] = field(default_factory=dict)
    recipients: Tuple[EximRecipient, ...] = ()
    non_recipients: FrozenSet[str] = frozenset()
    headers: List[bytes] = field(default_factory=list)
    header_size: int = 0
    headers_complete: bool = True
    problem: Optional[str] = None

    @property
    def pending_recipients(self) -> Tuple[str, ...]:
        """Recipients not yet delivered, in spool order (``exim -bpu``)."""
        done = self.non_recipients
        return tuple(r.address for r in self.recipients if r.address not in done)

    @property
    def arrival(self) -> float:
        """The received time with its microseconds, as an epoch float."""
        return _arrival(self.received_time, self.options.get("received_time_usec", ""))

    @property
    def frozen(self) -> bool:
        """True while the message is frozen (``-frozen <epoch>``)."""
        return "frozen" in self.options

    @property
    def frozen_at(self) -> Optional[int]:
        """When it was frozen (epoch seconds), or None."""
        value = self.options.get("frozen")
        if value is None:
            return None
        try:
            return int(value.split()[0])
        except (ValueError, IndexError):
            return 0

    def message_size(self, data_file_size: int) -> int:
        """``$message_size`` given the ``-D`` file's size in bytes."""
        return self.header_size + max(0, data_file_size - data_start_offset(self.message_id)) + 1


# -- reading -----------------------------------------------------------------


class _Source:
    """A byte source over an open file: lines, counted reads and skips.

    Holds one buffer of the file at a time; a small ``-H`` file is one
    ``read``. Reads on past the buffer when a line or a counted block
    needs it, and skips far ahead with a seek, so that a huge header part
    that is not wanted is never held in memory.
    """

    __slots__ = ("fd", "data", "pos", "base", "eof")

    def __init__(self, fd: Optional[int], data: bytes, eof: bool):
        self.fd = fd
        self.data = data
        self.pos = 0
        self.base = 0
        self.eof = eof or fd is None

    def _more(self, need: int) -> bool:
        """Make at least ``need`` bytes available at ``pos``; False at end of file."""
        while len(self.data) - self.pos < need and not self.eof:
            chunk = os.read(self.fd, max(_CHUNK, need - (len(self.data) - self.pos)))
            if not chunk:
                self.eof = True
                break
            self.base += self.pos
            self.data = self.data[self.pos:] + chunk
            self.pos = 0
        return len(self.data) - self.pos >= need

    def line(self) -> Optional[bytes]:
        """The next line including its newline; the rest without one at end of
        file; None when nothing is left."""
        while True:
            nl = self.data.find(b"\n", self.pos)
            if nl >= 0:
                start, self.pos = self.pos, nl + 1
                return self.data[start:self.pos]
            if self.eof or not self._more(len(self.data) - self.pos + 1):
                if self.pos >= len(self.data):
                    return None
                start, self.pos = self.pos, len(self.data)
                return self.data[start:]

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at end of file)."""
        self._more(n)
        start = self.pos
        self.pos = min(len(self.data), self.pos + n)
        return self.data[start:self.pos]

    def skip(self, n: int) -> bool:
        """Move ``n`` bytes on; False when the file ends first."""
        if self.pos + n <= len(self.data):
            self.pos += n
            return True
        if self.fd is None or self.eof and self.pos + n > len(self.data):
            self.pos = len(self.data)
            return False
        target = self.base + self.pos + n
        try:
            end = os.fstat(self.fd).st_size
            os.lseek(self.fd, target, os.SEEK_SET)
        except OSError:
            self.pos = len(self.data)
            self.eof = True
            return False
        self.base, self.data, self.pos, self.eof = target, b"", 0, False
        return target <= end

    def prefix(self, n: int) -> bytes:
        """Up to ``n`` bytes from ``pos`` without consuming them."""
        self._more(n)
        return self.data[self.pos:self.pos + n]


def _arrival(received_time: int, usec: str) -> float:
    """``received_time`` plus ``-received_time_usec`` (".123456"); a value that is not ASCII digits counts as 0."""
    usec = usec.lstrip(".")
    return received_time + (int(usec) / 1e6 if usec.isascii() and usec.isdigit() else 0.0)


def _text(raw: bytes) -> str:
    """Envelope text as str: UTF-8, undecodable bytes kept as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def _strip_nl(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\n") else line


def parse_recipient_line(line: bytes) -> EximRecipient:
    """One recipient line (without its newline) as Exim's reader splits it.

    Follows ``spool_read_header()``: look back from the end over digits;
    a ``#`` there introduces the current format, whose number says which
    fields precede it, each field read backwards as ``<text> <len>,<n>``
    with ``<text>`` exactly ``len`` bytes long; a space means the early
    Exim 4 ``<address> <pno>``; a comma Exim 3's ``<address> <a>,<pno>,<b>``.
    Anything else, or data that does not fit, leaves the whole line as
    the address, as Exim does.
    """
    p = len(line) - 1
    while p >= 0 and 0x30 <= line[p] <= 0x39:
        p -= 1
    if p < 0:
        return EximRecipient(_text(line))
    c = line[p]
    if c == 0x2C:  # ",": Exim 3
        q = p - 1
        while q >= 0 and (0x30 <= line[q] <= 0x39 or line[q] == 0x2C):
            q -= 1
        if q >= 0 and line[q] == 0x20:
            nums = line[q + 1:].split(b",")
            pno = _int(nums[1]) if len(nums) > 1 else -1
            return EximRecipient(_text(line[:q]), pno=pno)
        return EximRecipient(_text(line))
    if c == 0x20:  # " ": early Exim 4, "<address> <pno>"
        return EximRecipient(_text(line[:p]), pno=_int(line[p + 1:]))
    if c != 0x23:  # no "#": no additional fields
        return EximRecipient(_text(line))
    flags = _int(line[p + 1:])
    if flags is None:
        return EximRecipient(_text(line))
    end = p  # the address (and remaining fields) end before this index
    errors_to, pno = "", -1
    orcpt, dsn_flags = "", 0
    if flags & 0x01:
        got = _field_backwards(line, end)
        if got is None:
            return EximRecipient(_text(line))
        value, pno, end = got
        errors_to = _text(value)
    if flags & 0x02:
        got = _field_backwards(line, end)
        if got is None:
            return EximRecipient(_text(line))
        value, dsn_flags, end = got
        orcpt = _text(value)
    return EximRecipient(_text(line[:end]), orcpt=orcpt, dsn_flags=dsn_flags,
                         errors_to=errors_to, pno=pno)


def _field_backwards(line: bytes, end: int) -> Optional[Tuple[bytes, int, int]]:
    """Read ``<text> <len>,<n>`` that ends just before ``line[end]``.

    Returns (text, n, index of the space before text) or None when the
    line does not have that shape.
    """
    q = end - 1
    while q >= 0 and (0x30 <= line[q] <= 0x39 or line[q] in (0x2C, 0x2D)):
        q -= 1
    if q < 0 or line[q] != 0x20:
        return None
    nums = line[q + 1:end].split(b",")
    if len(nums) != 2:
        return None
    length, n = _int(nums[0]), _int(nums[1])
    if length is None or n is None or length < 0 or length > q:
        return None
    start = q - length
    # the text is preceded by the space that ends the previous field
    if start - 1 < 0 or line[start - 1] != 0x20:
        return None
    return line[start:q], n, start - 1


def _int(raw: bytes) -> Optional[int]:
    try:
        return int(raw)
    except ValueError:
        return None


def _parse_login_line(line: bytes) -> Tuple[str, int, int]:
    """``login uid gid``: read from the right, as the login may hold spaces."""
    parts = line.rstrip().rsplit(b" ", 2)
    if len(parts) != 3:
        raise SpoolFormatError("line 2 is not 'login uid gid'")
    uid, gid = _int(parts[1]), _int(parts[2])
    if uid is None or gid is None:
        raise SpoolFormatError("line 2 is not 'login uid gid'")
    return _text(parts[0]), uid, gid


def _read_envelope(src: _Source, name_id: Optional[str]) -> EximHeaderFile:
    first = src.line()
    if first is None or not first.endswith(b"-H\n"):
        raise SpoolFormatError("the first line is not '<message id>-H'")
    message_id = first[:-3].decode("ascii", "replace")
    if not is_message_id(message_id):
        raise SpoolFormatError("the first line is not '<message id>-H'")
    if name_id is not None and name_id != message_id:
        raise SpoolFormatError("the file names message %s but is called %s-H"
                               % (message_id, name_id))
    line = src.line()
    if line is None or not line.endswith(b"\n"):
        raise SpoolFormatError("the file ends in the envelope (line 2)")
    login, uid, gid = _parse_login_line(line[:-1])
    line = src.line()
    if line is None or len(line) < 3 or line[:1] != b"<" or line[-2:] != b">\n":
        raise SpoolFormatError("line 3 is not the '<sender>'")
    sender = _text(line[1:-2])
    line = src.line()
    parts = (line or b"").split()
    if line is None or len(parts) < 2 or _int(parts[0]) is None or _int(parts[1]) is None:
        raise SpoolFormatError("line 4 is not 'received_time warning_count'")
    return EximHeaderFile(message_id=message_id, path="", login=login, uid=uid, gid=gid,
                          sender=sender, received_time=int(parts[0]),
                          warning_count=int(parts[1]))


def _read_options(src: _Source, hf: EximHeaderFile) -> Optional[bytes]:
    """The ``-`` option lines; returns the first line after them (or None).

    A last line without its newline is where the file was cut: its value
    may be cut too (``-frozen 17``), so it is no option.
    """
    options = hf.options
    while True:
        line = src.line()
        if line is None or line[:1] != b"-" or line[-1:] != b"\n":
            return line
        body = _strip_nl(line)[1:]
        if body[:1] == b"-":  # tainted value
            body = body[1:]
        if body[:1] == b"(":  # quoted for a lookup type: "(type)name value"
            close = body.find(b")")
            body = body[close + 1:] if close >= 0 else b""
        name, _sep, value = body.partition(b" ")
        if name in (b"aclc", b"aclm"):
            # "-aclc <name> <length>", then exactly length bytes and a newline
            count = _int(value.rpartition(b" ")[2])
            if count is None or count < 0:
                hf.problem = "malformed ACL variable line %r" % _strip_nl(line)[:60]
                return None
            src.skip(count + 1)
            continue
        if name == b"acl":  # the old "-acl <index> <length>" form
            nums = value.split()
            count = _int(nums[1]) if len(nums) == 2 else None
            if count is None or count < 0 or count > _MAX_OLD_ACL:
                hf.problem = "malformed ACL variable line %r" % _strip_nl(line)[:60]
                return None
            src.skip(count + 1)
            continue
        options[_text(name)] = _text(value)


def _read_tree(src: _Source, line: bytes, hf: EximHeaderFile) -> bool:
    """The non-recipients tree starting at ``line`` (not "XX")."""
    names = set()
    expected = 1
    while expected:
        if line is None or len(line) < 5 or not line.endswith(b"\n") \
                or line[0:1] not in b"YN" or line[1:2] not in b"YN":
            hf.problem = "the non-recipients tree is malformed"
            hf.non_recipients = frozenset(names)
            return False
        expected -= 1
        if line[0:1] == b"Y":
            expected += 1
        if line[1:2] == b"Y":
            expected += 1
        names.add(_text(line[3:-1]))
        if expected:
            line = src.line()
    hf.non_recipients = frozenset(names)
    return True


def _read_recipients(src: _Source, hf: EximHeaderFile) -> bool:
    line = src.line()
    count = _int(line.strip()) if line is not None and line.endswith(b"\n") else None
    if count is None or count < 0 or count > _MAX_RECIPIENTS:
        hf.problem = "the recipient count is missing or malformed"
        return False
    recipients = []
    for _ in range(count):
        line = src.line()
        if line is None or not line.endswith(b"\n") or len(line) < 2:
            hf.recipients = tuple(recipients)
            hf.problem = "the file ends inside the recipient list"
            return False
        recipients.append(parse_recipient_line(line[:-1]))
    hf.recipients = tuple(recipients)
    return True


def _read_headers(src: _Source, hf: EximHeaderFile, want: bool, max_bytes: int) -> None:
    line = src.line()
    if line != b"\n":
        hf.problem = "no blank line between the envelope and the headers"
        hf.headers_complete = False
        return
    fields = hf.headers
    kept = 0
    size = 0
    capped = False
    while True:
        head = src.prefix(32)
        if not head:
            break
        m = _HEADER_PREFIX.match(head)
        if m is None or len(head) - m.end() == 0 and len(head) == 32:
            hf.problem = "a header in the spool file has no valid length prefix"
            hf.headers_complete = False
            break
        length = int(m.group(1))
        flag = m.group(2)
        src.skip(m.end())
        live = flag != b"*"
        if live:
            size += length
        if want and live and not capped:
            text = src.take(length)
            if len(text) < length:
                hf.problem = "the file ends inside a header"
                hf.headers_complete = False
                _add_field(fields, text, max_bytes - kept)
                break
            room = max_bytes - kept
            if length > room:
                capped = True
                hf.headers_complete = False
                hf.problem = ("the headers are longer than %d bytes; the rest was not read"
                              % max_bytes)
            _add_field(fields, text, room)
            kept += min(length, room)
        elif not src.skip(length):
            hf.problem = "the file ends inside a header"
            if want:
                hf.headers_complete = False
            break
    hf.header_size = size


def _add_field(fields: List[bytes], text: bytes, room: int) -> None:
    if text.endswith(b"\n"):
        text = text[:-1]
    if room < len(text):
        text = text[:max(0, room)]
    if text:
        fields.append(text)


def _read(src: _Source, path: str, name_id: Optional[str], read_headers: bool,
          max_header_bytes: int) -> EximHeaderFile:
    hf = _read_envelope(src, name_id)
    hf.path = path
    line = _read_options(src, hf)
    if hf.problem is not None:
        hf.headers_complete = False
        return hf
    if line is None or not line.endswith(b"\n"):
        hf.problem = "the file ends before the recipient list"
        hf.headers_complete = False
        return hf
    if line != b"XX\n" and not _read_tree(src, line, hf):
        hf.headers_complete = False
        return hf
    if not _read_recipients(src, hf):
        hf.headers_complete = False
        return hf
    _read_headers(src, hf, read_headers, max_header_bytes)
    return hf


# -- the quick path: a whole file in memory, an ordinary envelope ------------------


def quick_envelope(data: bytes, name_id: str, recipients: bool = True) -> Optional[tuple]:
    """What a listing needs from a ``-H`` file held whole in ``data``, in one pass; None: read it with
    :func:`read_header_file`.

    ``(sender, arrival, frozen, recipients, non_recipients, header_size,
    header_start)``: the general reader's answers for the same file
    (``recipients`` the addresses of every recipient line, in order; an
    empty tuple when ``recipients`` is false, for a caller that only wants
    the headers; ``header_start`` the offset of the first header record),
    without an :class:`EximHeaderFile`, an options table or a recipient
    object per message. A queue of 10,000 is listed this way in one pass
    over its files. Whatever the general reader would call a problem or an
    error (a damaged or cut envelope, a header part whose lengths do not
    add up, a file named for another message) gives None, so that the
    general reader decides, says what is wrong, and the two never differ
    (tests/test_fuzz_parsers.py checks that they agree whenever this one
    answers).
    """
    find = data.find
    top = _COMMON_TOP.match(data, len(name_id) + 3)
    if top is None or data[:len(name_id) + 3] != name_id.encode("ascii") + b"-H\n":
        return None  # not the common form of lines 1 to 4: the general reader reads (or refuses) them
    sender = _text(top.group(1))
    received = int(top.group(2))
    end = top.end() - 1
    usec = b""
    frozen = False
    while True:  # the option lines, as _read_options reads them
        # the plain ones in one regular expression: not tainted ("--"), not quoted ("-("), no ACL variable
        start = end + 1
        end = _PLAIN_OPTIONS.match(data, start).end() - 1
        if end > start:
            frozen = frozen or _last_option(data, b"\n-frozen", start, end) >= 0
            at = _last_option(data, b"\n-received_time_usec", start, end)
            if at >= 0:
                usec = data[at + 1:find(b"\n", at)] if data[at] == 0x20 else b""
        if data[end + 1:end + 2] != b"-":
            break
        start, end = end + 1, find(b"\n", end + 1)
        if end < 0:
            return None
        body = data[start + 1:end]
        if body[:1] == b"-":
            body = body[1:]
        if body[:1] == b"(":
            close = body.find(b")")
            body = body[close + 1:] if close >= 0 else b""
        name, _sep, value = body.partition(b" ")
        if name == b"aclc" or name == b"aclm":
            count = _int(value.rpartition(b" ")[2])
            if count is None or count < 0:
                return None
            end += count + 1
            if data[end:end + 1] != b"\n":
                return None  # a value not followed by its newline: the general reader reads on from there
        elif name == b"acl":
            nums = value.split()
            count = _int(nums[1]) if len(nums) == 2 else None
            if count is None or count < 0 or count > _MAX_OLD_ACL:
                return None
            end += count + 1
            if data[end:end + 1] != b"\n":
                return None
        elif name == b"frozen":
            frozen = True
        elif name == b"received_time_usec":
            usec = value
    start, end = end + 1, find(b"\n", end + 1)
    if end < 0:
        return None
    done: FrozenSet[str] = frozenset()
    if data[start:end] != b"XX":  # the non-recipients tree, as _read_tree reads it
        names = set()
        expected = 1
        while True:
            if end - start < 4 or data[start] not in b"YN" or data[start + 1] not in b"YN":
                return None
            expected += (data[start] == 0x59) + (data[start + 1] == 0x59) - 1
            names.add(_text(data[start + 3:end]))
            if not expected:
                break
            start, end = end + 1, find(b"\n", end + 1)
            if end < 0:
                return None
        done = frozenset(names)
    start, end = end + 1, find(b"\n", end + 1)
    count = _int(data[start:end].strip()) if end >= 0 else None
    if count is None or count < 0 or count > _MAX_RECIPIENTS:
        return None
    addresses = []
    add = addresses.append
    for _ in range(count):
        start, end = end + 1, find(b"\n", end + 1)
        if end <= start:
            return None
        if recipients:
            # only a line that ends in a digit, a space or a comma has data after the address (parse_recipient_line)
            add(parse_recipient_line(data[start:end]).address if data[end - 1] in _RECIPIENT_DATA_END
                else _text(data[start:end]))
    if data[end + 1:end + 2] != b"\n":
        return None
    header_start = pos = end + 2
    size = 0
    total = len(data)
    match = _HEADER_PREFIX.match
    while pos < total:  # the header records' lengths, as _read_headers counts them
        m = match(data, pos, pos + 32)
        if m is None or m.end() == pos + 32:
            return None
        digits, flag = m.groups()
        length = int(digits)
        pos = m.end() + length
        if pos > total:
            return None
        if flag != b"*":
            size += length
    return (sender, _arrival(received, _text(usec)), frozen, tuple(addresses), done, size, header_start)


def _last_option(data: bytes, key: bytes, start: int, end: int) -> int:
    """Where the value of the last ``key`` option line (``key`` is "\\n-name") of the lines ``start`` .. ``end``
    (the last one's newline) begins: the index of the space or newline after the name; -1 when there is none."""
    while True:
        found = data.rfind(key, start - 1, end + 1)
        if found < 0:
            return -1
        after = found + len(key)
        if data[after] in b" \n":
            return after
        end = after - 2  # search again before this line's name ended


def quick_header_fields(data: bytes, pos: int, max_bytes: int) -> Optional[List[bytes]]:
    """The live header fields of the header part that starts at ``pos`` of a whole ``-H`` file in ``data``, as
    :func:`read_header_file` gives them; None for anything it would call a problem (the cap reached included)."""
    fields: List[bytes] = []
    add = fields.append
    kept = 0
    total = len(data)
    match = _HEADER_PREFIX.match
    while pos < total:
        m = match(data, pos, pos + 32)
        if m is None or m.end() == pos + 32:
            return None
        digits, flag = m.groups()
        length = int(digits)
        start = m.end()
        pos = start + length
        if pos > total:
            return None
        if flag != b"*":
            kept += length
            if kept > max_bytes:
                return None
            text = data[start:pos - 1] if data[pos - 1] == 0x0A else data[start:pos]
            if text:
                add(text)
    return fields


_MARK_OFFSET = (1 << 17) - 1  # a header part's offset in a file read whole (< _FIRST_READ) fits in 17 bits


def header_mark(status: os.stat_result, header_start: int) -> int:
    """One int for where a file's header part starts and which version of the file that was (inode, size and
    modification time): what a listing hands its header sources, so that a read of the same file goes there."""
    return (hash((status.st_ino, status.st_size, status.st_mtime_ns)) & ((1 << 40) - 1)) << 17 | header_start


def read_whole(path: str) -> Tuple[Optional[bytes], os.stat_result]:
    """A file's bytes when it is at most _FIRST_READ long (else None) and its status, with one open and read.

    OSError as ``os.open`` raises it (FileNotFoundError: the message left the queue)."""
    fd = os.open(path, _O_READ)
    try:
        status = os.fstat(fd)
        if status.st_size >= _FIRST_READ:
            return None, status
        data = os.read(fd, _FIRST_READ)
        return (data if len(data) == status.st_size else None), status
    finally:
        os.close(fd)


def _id_from_name(path: str) -> Optional[str]:
    base = os.path.basename(path)
    return base[:-2] if base.endswith("-H") else None


def read_header_file(path: str, read_headers: bool = True,
                     max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                     journal: bool = True) -> EximHeaderFile:
    """Read the ``-H`` file at ``path``.

    With ``read_headers`` false only the sizes of the headers are read (what
    a listing needs). At most ``max_header_bytes`` of header text are kept
    (the field that crosses the cap is cut there; ``headers_complete`` is
    then False): a message with megabytes of headers must not cost megabytes
    per message. With ``journal`` true, addresses in the ``<ID>-J`` file
    beside it (deliveries of an attempt still running or interrupted) count
    as delivered, as in ``exim -bp``.

    Raises OSError when the file cannot be opened (FileNotFoundError when
    the message left the queue since it was listed) and
    :class:`SpoolFormatError` when it is not a readable ``-H`` file.
    """
    name_id = _id_from_name(path)
    fd = os.open(path, _O_READ)
    try:
        size = os.fstat(fd).st_size
        first = os.read(fd, min(size, _FIRST_READ)) if size else b""
        src = _Source(fd, first, eof=len(first) >= size)
        hf = _read(src, path, name_id, read_headers, max_header_bytes)
    finally:
        os.close(fd)
    if journal and hf.recipients:
        _apply_journal(hf, path[:-2] + "-J" if path.endswith("-H") else "")
    return hf


def parse_header_file(data: bytes, read_headers: bool = True,
                      max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> EximHeaderFile:
    """Parse the text of a ``-H`` file held in memory (e.g. ``exim -Mvh`` output)."""
    return _read(_Source(None, data, eof=True), "", None, read_headers, max_header_bytes)


def _apply_journal(hf: EximHeaderFile, journal_path: str) -> None:
    if journal_path:
        done = journal_addresses(journal_path)
        if done:
            hf.non_recipients = frozenset(hf.non_recipients | done)


def journal_addresses(journal_path: str) -> FrozenSet[str]:
    """The addresses an ``<ID>-J`` file says were delivered; empty when there is none (no delivery running or
    interrupted). A last line without its newline is half-written and does not count."""
    try:
        fd = os.open(journal_path, _O_READ)
    except OSError:
        return frozenset()
    try:
        data = os.read(fd, 1 << 20)
    except OSError:
        return frozenset()
    finally:
        os.close(fd)
    return frozenset(_text(line) for line in data.split(b"\n")[:-1])


# -- ids, paths, sizes, locks --------------------------------------------------


def is_message_id(s: object) -> bool:
    """True when ``s`` is an Exim message id, 4.96 form or 4.97+ form.

    ``1xW85O-0001T2-2A`` (6-6-2) or ``1xW85O-000000001T2-002A`` (6-11-4):
    base-62 digits (``0-9A-Za-z``) in each group, dashes between, nothing
    else. Stricter than Exim's own check (whose ``[^\\W_]`` also admits
    non-ASCII letters in a UTF-8 locale), so that nothing but an id
    reaches a command line or a path.
    """
    if not isinstance(s, str):
        return False
    return _ID_OLD.match(s) is not None or _ID_NEW.match(s) is not None


_BASE62 = {c: i for i, c in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")}


def arrival_second(message_id: str) -> int:
    """The arrival second a message id encodes: its first group, the receive time in base 62.

    What is left of a message whose ``-H`` file cannot be read (its
    ``received_time`` line holds the same second). Exim writes base 62 on
    Linux; base 36 (case-insensitive file systems) is not read here.
    """
    value = 0
    for ch in message_id[:MESSAGE_ID_TIME_LEN]:
        value = value * 62 + _BASE62[ch]
    return value


def is_queue_name(s: object) -> bool:
    """True for "" (the default queue) or a plain named-queue name."""
    return isinstance(s, str) and (s == "" or _QUEUE_NAME.match(s) is not None)


def data_start_offset(message_id: str) -> int:
    """Where the message body starts in the ``-D`` file: after ``<ID>-D\\n``."""
    return len(message_id) + 3


def split_directory(message_id: str) -> str:
    """The sub-directory a message lives in with ``split_spool_directory``:
    the id's 6th character, the last digit of its time field (both forms;
    ``set_subdir_str()`` in functions.h, ``MESSAGE_ID_TIME_LEN - 1``)."""
    return message_id[MESSAGE_ID_TIME_LEN - 1]


@dataclass(frozen=True)
class SpoolPaths:
    """Where one message's spool files are: header, data, journal, message log."""

    header: str
    data: str
    journal: str
    msglog: str


def spool_paths(spool_directory: str, queue_name: str, message_id: str,
                split_spool_directory: bool) -> SpoolPaths:
    """The ``-H``, ``-D``, ``-J`` and msglog paths of ``message_id``.

    ``<spool>[/<queue>]/input[/<split>]/<ID>-H`` (and ``-D``, ``-J``),
    ``<spool>[/<queue>]/msglog[/<split>]/<ID>`` (``spool_fname()``); a
    named queue is a directory of its own under the spool directory.
    Exim also looks in the other layout for leftovers from before
    ``split_spool_directory`` changed; :func:`find_spool_paths` does that.
    Raises ValueError for an id or queue name Exim would refuse, so that
    nothing else ever becomes a path.
    """
    if not is_message_id(message_id):
        raise ValueError("not an Exim message id: %r" % (message_id,))
    if not is_queue_name(queue_name):
        raise ValueError("not an Exim queue name: %r" % (queue_name,))
    top = os.path.join(spool_directory, queue_name) if queue_name else spool_directory
    sub = (split_directory(message_id),) if split_spool_directory else ()
    input_dir = os.path.join(top, "input", *sub)
    return SpoolPaths(
        header=os.path.join(input_dir, message_id + "-H"),
        data=os.path.join(input_dir, message_id + "-D"),
        journal=os.path.join(input_dir, message_id + "-J"),
        msglog=os.path.join(top, "msglog", *sub, message_id),
    )


def find_spool_paths(spool_directory: str, queue_name: str, message_id: str,
                     split_spool_directory: bool) -> Optional[SpoolPaths]:
    """The paths of a message that exists, trying both layouts as Exim does
    (the configured one first); None when its ``-H`` file is in neither."""
    for split in (split_spool_directory, not split_spool_directory):
        paths = spool_paths(spool_directory, queue_name, message_id, split)
        if os.path.exists(paths.header):
            return paths
    return None


def message_size(header_file: EximHeaderFile, data_path: str) -> Optional[int]:
    """``$message_size`` of a message: None when its ``-D`` file is gone."""
    try:
        return header_file.message_size(os.stat(data_path).st_size)
    except OSError:
        return None


# struct flock as Linux lays it out: l_type, l_whence (short), l_start,
# l_len (off_t, 64-bit for Python's large-file build), l_pid (pid_t).
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_BUFFER = 64  # room for the kernel's padding


def is_locked(data_path: str) -> bool:
    """True while an Exim process works on the message (delivery, -Mf, ...).

    Exim takes a POSIX write lock (``fcntl F_SETLK``) on the start of the
    ``-D`` file (``spool_open_datafile()``) and holds it as long as it works
    on the message; a second Exim that finds it locked skips the message
    ("Spool file is locked"). So we must never take that lock ourselves,
    not even briefly: an ``exim -M`` starting in that moment would skip the
    message. On Linux we ask with ``F_GETLK``, which takes nothing;
    elsewhere (other struct layouts) we fall back to a non-blocking
    ``lockf`` test-and-release. A missing file is not locked.
    """
    try:
        fd = os.open(data_path, _O_DATA)
    except OSError:
        return False
    try:
        return _is_locked_fd(fd, data_path)
    finally:
        os.close(fd)


_O_DATA = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_GETLK_QUERY = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(_FLOCK_BUFFER, b"\0")


def _is_locked_fd(fd: int, data_path: str) -> bool:
    if sys.platform.startswith("linux"):
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, _GETLK_QUERY)
        return _FLOCK.unpack(answer[:_FLOCK.size])[0] != fcntl.F_UNLCK
    return _lockf_probe(data_path)


def data_file(data_path: str) -> Optional[Tuple[int, bool]]:
    """The ``-D`` file's size and whether an Exim process holds its lock (:func:`is_locked`), with one open;
    None when it is gone."""
    try:
        fd = os.open(data_path, _O_DATA)
    except FileNotFoundError:
        return None
    except OSError:  # not a file we may open as it is (a link, say): its size as stat finds it, and not locked
        try:
            return os.stat(data_path).st_size, is_locked(data_path)
        except OSError:
            return None
    try:
        return os.fstat(fd).st_size, _is_locked_fd(fd, data_path)
    finally:
        os.close(fd)


# -- the locks of a whole queue at once (Linux) -------------------------------------------------------------

# PROC_PID_INIT_INO (include/linux/proc_ns.h): the inode of the initial pid namespace, the one whose /proc/locks
# shows the locks of every process (a /proc of another pid namespace leaves out those of processes outside it).
_INIT_PID_NAMESPACE = 0xEFFFFFFC
# Local file systems, whose locks are all the kernel's own and listed in /proc/locks under the inode number stat
# gives. Not NFS, CIFS or FUSE (other clients' locks are the server's, which F_GETLK asks and /proc/locks does
# not know), nor overlayfs (its inode numbers in stat need not be the locked inode's).
_LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "jfs", "reiserfs"})
# One /proc/locks line of a POSIX (fcntl, lockf) or open file description lock, held or waited for:
# "1: POSIX  ADVISORY  WRITE 1234 fe:00:8437990 0 18", "3: -> OFDLCK ADVISORY READ -1 08:01:77 0 EOF".
_PROC_LOCK = re.compile(rb"(?:POSIX|OFDLCK) +[A-Z]+ +[A-Z]+ +-?[0-9]+ +[0-9a-f]+:[0-9a-f]+:([0-9]+) ")
# /proc/locks is read again after this many seconds of listing, or ten times as long as its last read took (a
# system with very many locks): fresh while a big queue is listed, never more than a tenth of the listing's time.
_LOCKS_REFRESH_SECONDS = 0.05


def locked_inodes(text: bytes) -> Optional[Set[int]]:
    """The inode numbers of every file a POSIX or OFD lock is held on (or waited for) in /proc/locks' ``text``;
    None when a line that names such a lock cannot be read (a format this does not know must not hide a lock).

    Every inode counts, whatever its device and whoever holds the lock: a
    file found here is asked with :func:`is_locked`, so the set may name
    too many files, never too few."""
    inodes = set()
    for line in text.splitlines():
        if b"POSIX" in line or b"OFDLCK" in line:
            found = _PROC_LOCK.search(line)
            if found is None:
                return None
            inodes.add(int(found.group(1)))
    return inodes


def file_system_type(mountinfo: bytes, device: int) -> Optional[str]:
    """The type of the file system mounted from ``device`` (a ``st_dev``) in /proc/self/mountinfo's text; None
    when no mount has that device (btrfs sub-volumes, whose ``st_dev`` is not the mount's)."""
    want = b"%d:%d" % (os.major(device), os.minor(device))
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if len(fields) > 2 and fields[2] == want and b"-" in fields:
            after = fields.index(b"-") + 1  # the separator, then the file system's type
            return fields[after].decode("ascii", "replace") if after < len(fields) else None
    return None


class LockTable:
    """Which ``-D`` files of one spool directory no process holds a lock on, from one read of /proc/locks.

    :func:`list_queue` asks :func:`is_locked` of every message, an open,
    fstat, ``F_GETLK`` and close of its ``-D`` file. Here the kernel's
    list of locks is read once instead (and again every
    ``_LOCKS_REFRESH_SECONDS`` or so, so that it stays fresh while a big
    queue is listed), and a ``-D`` file costs one ``lstat``, which gives its size too:
    a regular file on the spool's device whose inode no lock names is not
    locked. Any other (an inode some lock names, another device, a link)
    is asked with :func:`data_file` as before, so the answer means exactly
    what :func:`is_locked` means. :meth:`for_directory` gives None where
    /proc/locks cannot answer for every lock.
    """

    __slots__ = ("device", "proc", "inodes", "next_read")

    def __init__(self, device: int, proc: str, inodes: Set[int]):
        self.device = device
        self.proc = proc
        self.inodes = inodes
        self.next_read = time.monotonic() + _LOCKS_REFRESH_SECONDS

    @classmethod
    def for_directory(cls, directory: str, proc: str = "/proc") -> Optional["LockTable"]:
        """The table for the files of ``directory``; None off Linux, when ``proc`` is not the initial pid
        namespace's /proc, when the directory is not on a local file system, or /proc/locks cannot be read."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            if os.stat(os.path.join(proc, "self", "ns", "pid")).st_ino != _INIT_PID_NAMESPACE:
                return None
            device = os.stat(directory).st_dev
            with open(os.path.join(proc, "self", "mountinfo"), "rb") as f:
                if file_system_type(f.read(), device) not in _LOCAL_FILE_SYSTEMS:
                    return None
        except OSError:
            return None
        inodes = _read_locks(proc)
        return None if inodes is None else cls(device, proc, inodes)

    def _refresh(self, now: float) -> None:
        inodes = _read_locks(self.proc)
        if inodes is None:
            self.device = -1  # /proc/locks went unreadable: ask every file from now on
            self.next_read = float("inf")
            return
        self.inodes = inodes
        self.next_read = now + max(_LOCKS_REFRESH_SECONDS, 10 * (time.monotonic() - now))

    def data_file(self, data_path: str) -> Optional[Tuple[int, bool]]:
        """What :func:`data_file` says of ``data_path``, with one ``lstat`` where that is enough."""
        now = time.monotonic()
        if now >= self.next_read:
            self._refresh(now)
        try:
            status = os.lstat(data_path)
        except FileNotFoundError:
            return None
        except OSError:
            return data_file(data_path)
        if status.st_ino in self.inodes or status.st_dev != self.device or not stat.S_ISREG(status.st_mode):
            return data_file(data_path)
        return status.st_size, False


def _read_locks(proc: str) -> Optional[Set[int]]:
    try:
        with open(os.path.join(proc, "locks"), "rb") as f:
            return locked_inodes(f.read())
    except OSError:
        return None


def _lockf_probe(data_path: str) -> bool:  # pragma: no cover - not Linux
    try:
        fd = os.open(data_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def list_spool(spool_directory: str, queue_name: str = "",
               split_spool_directory: bool = False) -> Iterator[Tuple[str, str]]:
    """Yield ``(message_id, -H path)`` for every message in one queue.

    One ``scandir`` of ``input/`` (plus its one-character sub-directories
    when split, and, as Exim does, leftovers in the other layout). Names
    that are not ``<valid id>-H`` (temporary ``hdr.*`` files, ``-D``, ``-J``,
    anything else) are passed over. A missing directory yields nothing: a
    named queue's directories appear with its first message.
    """
    for message_id, path, _journal in _queue_files(spool_directory, queue_name):
        yield message_id, path


def _queue_files(spool_directory: str, queue_name: str) -> Iterator[Tuple[str, str, bool]]:
    """``(message_id, -H path, whether a -J file was beside it)`` for every message of a queue (see list_spool)."""
    if not is_queue_name(queue_name):
        raise ValueError("not an Exim queue name: %r" % (queue_name,))
    top = os.path.join(spool_directory, queue_name) if queue_name else spool_directory
    seen = set()
    input_directory = os.path.join(top, "input")
    headers, journals, subdirs = _scan(input_directory)
    for directory in [input_directory] + sorted(subdirs):
        if directory is not input_directory:
            headers, journals, _none = _scan(directory, subdirs_too=False)
        prefix = os.path.join(directory, "")
        for message_id in headers:
            if message_id not in seen:
                seen.add(message_id)
                yield message_id, prefix + message_id + "-H", message_id in journals


def _scan(directory: str, subdirs_too: bool = True) -> Tuple[List[str], Set[str], List[str]]:
    """One directory's message ids (of its ``-H`` files), the ids with a ``-J`` file, and its split
    sub-directories."""
    headers: List[str] = []
    journals: Set[str] = set()
    subdirs: List[str] = []
    try:
        it = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return headers, journals, subdirs
    with it:
        for entry in it:
            name = entry.name
            tail = name[-2:]
            if tail == "-H":
                message_id = name[:-2]
                if is_message_id(message_id):
                    headers.append(message_id)
            elif tail == "-J":
                journals.add(name[:-2])
            elif subdirs_too and len(name) == 1 and name.isalnum():
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                except OSError:
                    pass
    return headers, journals, subdirs


class SpoolEntry(NamedTuple):
    """One message of a queue listing: what the listing needs, nothing held for later."""

    message_id: str
    header_path: str
    data_path: str
    sender: str
    recipients: Tuple[str, ...]  # still to be delivered, as exim -bpu lists them
    arrival: float
    frozen: bool
    size: int  # $message_size
    locked: bool  # an Exim process works on it now (is_locked)
    header_mark: int  # header_mark(): where its header part starts in the -H file as read; 0 when unknown


class DamagedEntry(NamedTuple):
    """A message whose ``-H`` file cannot be read: ``error`` says why (OSError or SpoolFormatError)."""

    message_id: str
    header_path: str
    data_path: str
    error: Exception


def list_queue(spool_directory: str, queue_name: str = "", proc: str = "/proc") -> Iterator[object]:
    """Every message of one queue as a :class:`SpoolEntry` (a :class:`DamagedEntry` when its ``-H`` file cannot be
    read), in one pass over the spool: one directory scan, then per message one open and read of its ``-H``
    file and one ``lstat`` of its ``-D`` file (size; whether it is locked from one read of /proc/locks for the
    whole queue, :class:`LockTable`; where that cannot answer, an open of the ``-D`` file with :func:`data_file`),
    and the ``-J`` journal only where the scan saw one or a delivery holds the lock (a journal is written only
    during a delivery). ``proc`` is where /proc is (tests). A message gone since the scan
    (delivered, removed, a ``-D`` without ``-H`` being received) is left out, as ``exim -bp`` leaves it out.
    """
    locks = None  # the LockTable (False where there is none), made at the first file
    for message_id, header_path, journal in _queue_files(spool_directory, queue_name):
        if locks is None:  # read after the directory scan, before the first file (and again as the listing goes on)
            top = os.path.join(spool_directory, queue_name) if queue_name else spool_directory
            locks = LockTable.for_directory(os.path.join(top, "input"), proc) or False
        data_path = header_path[:-1] + "D"
        try:
            data, status = read_whole(header_path)
            quick = quick_envelope(data, message_id) if data is not None else None
            if quick is None:
                hf = read_header_file(header_path, read_headers=False, journal=False)
                quick = (hf.sender, hf.arrival, hf.frozen, tuple(r.address for r in hf.recipients),
                         hf.non_recipients, hf.header_size, 0)
        except FileNotFoundError:
            continue  # delivered or removed since the directory scan
        except (OSError, ValueError) as exc:
            yield DamagedEntry(message_id, header_path, data_path, exc)
            continue
        found = locks.data_file(data_path) if locks else data_file(data_path)
        if found is None:
            continue  # gone since the directory scan
        sender, arrival, frozen, recipients, done, header_size, start = quick
        data_size, locked = found
        if recipients and (journal or locked):
            done = done | journal_addresses(header_path[:-1] + "J")
        if done:
            recipients = tuple([r for r in recipients if r not in done])
        yield SpoolEntry(message_id, header_path, data_path, sender, recipients, arrival, frozen,
                         header_size + max(0, data_size - data_start_offset(message_id)) + 1, locked,
                         header_mark(status, start) if start else 0)


# -- headers on demand -----------------------------------------------------------


class EximSpoolReader(HeaderReader):
    """The ``-D`` file and the :class:`EximSpoolHeaders` of each message of one listing, when first asked.

    A listed message's files are named for its id, in the queue's input
    directory (``top``) or, in a split spool, in one of its sub-directories
    (kept in ``places``, one shared string per sub-directory); what the
    listing learnt of each ``-H`` file (:func:`header_mark`) is kept in
    ``marks``, one int per message. So a big queue holds no path and no
    source object per message. ``mvh_argv`` as for the source.
    """

    __slots__ = ("top", "mvh_argv", "max_bytes", "marks", "places", "_directories")

    def __init__(self, top: str, mvh_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.top = os.path.join(top, "")
        self.mvh_argv = tuple(mvh_argv) if mvh_argv else None
        self.max_bytes = max_bytes
        self.marks: Dict[str, int] = {}  # message id -> header_mark(), where the listing knew it
        self.places: Dict[str, str] = {}  # message id -> its directory (with "/"), where that is not top
        self._directories: Dict[str, str] = {}

    def add(self, entry: "SpoolEntry") -> None:
        """What the listing found of one message: where its files are, and its header mark."""
        directory = entry.header_path[:-len(entry.message_id) - 2]
        if directory != self.top:
            self.places[entry.message_id] = self._directories.setdefault(directory, directory)
        if entry.header_mark:
            self.marks[entry.message_id] = entry.header_mark

    def filename(self, message: Message) -> str:
        return self.places.get(message.queue_id, self.top) + message.queue_id + "-D"

    def source(self, message: Message) -> "EximSpoolHeaders":
        queue_id = message.queue_id
        return EximSpoolHeaders(self.places.get(queue_id, self.top) + queue_id + "-H", queue_id, self.mvh_argv,
                                self.max_bytes, header_mark=self.marks.get(queue_id, 0))

    def __repr__(self) -> str:
        return "EximSpoolReader(%r)" % (self.mvh_argv,)


class EximSpoolHeaders(MtaFileHeaders):
    """The headers of one queued Exim message, read when first asked.

    From the ``-H`` file; if that cannot be read (the message moved to
    another queue since the listing, or the file is not readable by this
    user) and ``mvh_argv`` is given (e.g. ``["exim", "-C",
    "/etc/exim.conf", "-qGqrunner"]``), from ``exim ... -Mvh ID``, which
    prints the same file. Never raises (see :class:`MtaFileHeaders`).
    """

    __slots__ = ("header_mark",)
    kind = "spool file"
    id_kind = "an Exim message id"

    def __init__(self, path: str, message_id: str, mvh_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES, header_mark: int = 0):
        super().__init__(path, message_id, mvh_argv, max_bytes)
        self.header_mark = header_mark  # header_mark(): where the listing found the header part; 0 when unknown

    def __getstate__(self):
        return super().__getstate__() + (self.header_mark,)

    def __setstate__(self, state) -> None:
        super().__setstate__(state[:-1])
        self.header_mark = state[-1]

    def read_file(self) -> Tuple[List[bytes], Optional[str]]:
        """One open and read of an ordinary ``-H`` file, parsed in memory; any other (big, damaged, cut, changed
        while read) by the general reader, which says what is wrong.

        Where the listing read the same file (the same inode, size and
        modification time: Exim rewrites a ``-H`` file by writing a new one
        and renaming it, so any change of the envelope changes them), the
        header part is read from where the listing found it, without
        reading the envelope again; otherwise the envelope is read first
        (:func:`quick_envelope`) to find it.
        """
        data, status = read_whole(self.path)
        if data is not None and self.path.endswith("-H"):
            mark = self.header_mark
            start = mark & _MARK_OFFSET
            if not (mark and mark == header_mark(status, start) and data[start - 2:start] == b"\n\n"):
                envelope = quick_envelope(data, os.path.basename(self.path)[:-2], recipients=False)
                start = envelope[-1] if envelope is not None else 0
            if start:
                fields = quick_header_fields(data, start, self.max_bytes)
                if fields is not None:
                    return fields, None
        hf = read_header_file(self.path, read_headers=True, max_header_bytes=self.max_bytes, journal=False)
        return hf.headers, hf.problem

    def is_valid_id(self) -> bool:
        return is_message_id(self.queue_id)

    def fallback_args(self) -> List[str]:
        return ["-Mvh", self.queue_id]

    def parse_fallback(self, output: bytes) -> Tuple[List[bytes], Optional[str]]:
        hf = parse_header_file(output, read_headers=True, max_header_bytes=self.max_bytes)
        return hf.headers, hf.problem
