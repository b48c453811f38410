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
import struct
import sys
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from qrunner.mta.headers import DEFAULT_MAX_HEADER_BYTES, MtaFileHeaders

__all__ = [
    "SpoolFormatError",
    "EximRecipient",
    "EximHeaderFile",
    "read_header_file",
    "parse_header_file",
    "parse_recipient_line",
    "EximSpoolHeaders",
    "is_message_id",
    "is_queue_name",
    "arrival_second",
    "SpoolPaths",
    "spool_paths",
    "data_start_offset",
    "message_size",
    "is_locked",
    "list_spool",
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
        usec = self.options.get("received_time_usec", "").lstrip(".")
        return self.received_time + (int(usec) / 1e6 if usec.isdigit() else 0.0)

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
    if not journal_path:
        return
    try:
        fd = os.open(journal_path, _O_READ)
    except OSError:
        return  # no journal: no delivery running or interrupted
    try:
        data = os.read(fd, 1 << 20)
    except OSError:
        return
    finally:
        os.close(fd)
    done = set(hf.non_recipients)
    for line in data.split(b"\n")[:-1]:  # a last line without newline is half-written
        done.add(_text(line))
    hf.non_recipients = frozenset(done)


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
        fd = os.open(data_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if sys.platform.startswith("linux"):
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            query += b"\0" * (_FLOCK_BUFFER - len(query))
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
            return _FLOCK.unpack(answer[:_FLOCK.size])[0] != fcntl.F_UNLCK
        return _lockf_probe(data_path)
    finally:
        os.close(fd)


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
    if not is_queue_name(queue_name):
        raise ValueError("not an Exim queue name: %r" % (queue_name,))
    top = os.path.join(spool_directory, queue_name) if queue_name else spool_directory
    input_dir = os.path.join(top, "input")
    seen = set()
    subdirs: List[str] = []
    for entry_id, path, is_sub in _scan(input_dir):
        if is_sub:
            subdirs.append(path)
        elif entry_id not in seen:
            seen.add(entry_id)
            yield entry_id, path
    for sub in sorted(subdirs):
        for entry_id, path, _is_sub in _scan(sub, subdirs_too=False):
            if entry_id not in seen:
                seen.add(entry_id)
                yield entry_id, path


def _scan(directory: str, subdirs_too: bool = True) -> Iterator[Tuple[str, str, bool]]:
    try:
        it = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    with it:
        for entry in it:
            name = entry.name
            if name.endswith("-H"):
                message_id = name[:-2]
                if is_message_id(message_id):
                    yield message_id, entry.path, False
            elif subdirs_too and len(name) == 1 and name.isalnum():
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield name, entry.path, True
                except OSError:
                    pass


# -- headers on demand -----------------------------------------------------------


class EximSpoolHeaders(MtaFileHeaders):
    """The headers of one queued Exim message, read when first asked.

    From the ``-H`` file; if that cannot be read (the message moved to
    another queue since the listing, or the file is not readable by this
    user) and ``mvh_argv`` is given (e.g. ``["exim", "-C",
    "/etc/exim.conf", "-qGqrunner"]``), from ``exim ... -Mvh ID``, which
    prints the same file. Never raises (see :class:`MtaFileHeaders`).
    """

    __slots__ = ()
    kind = "spool file"
    id_kind = "an Exim message id"

    def __init__(self, path: str, message_id: str, mvh_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        super().__init__(path, message_id, mvh_argv, max_bytes)

    def read_file(self) -> Tuple[List[bytes], Optional[str]]:
        hf = read_header_file(self.path, read_headers=True, max_header_bytes=self.max_bytes, journal=False)
        return hf.headers, hf.problem

    def is_valid_id(self) -> bool:
        return is_message_id(self.queue_id)

    def fallback_args(self) -> List[str]:
        return ["-Mvh", self.queue_id]

    def parse_fallback(self, output: bytes) -> Tuple[List[bytes], Optional[str]]:
        hf = parse_header_file(output, read_headers=True, max_header_bytes=self.max_bytes)
        return hf.headers, hf.problem
