"""Postfix queue files: where they are, what their ids say, and the header fields they hold.

A policy that reads headers needs them for every message of a possibly huge
queue; ``postcat -hq`` would cost a process per message (about 5 ms), while
the header part of a queue file is a few kilobytes that Python reads in
microseconds. :class:`PostfixQueueFileHeaders` reads them the way postcat
does (``src/postcat/postcat.c``), through the record reader of
:mod:`qrunner.mta.postfix_records`: the size record (``C``) holds the offset
where the message content starts; from there each ``N`` record is one line,
and a line longer than Postfix's record limit comes as ``L`` records
followed by its final ``N``. Headers a milter added are reached through
pointer records, as Postfix's own readers reach them.

Queue ids and file locations follow ``src/global/mail_queue.c`` and
``mail_queue.h``: :func:`is_queue_id`, :func:`hash_key`,
:func:`arrival_microseconds` and :class:`QueuePaths`.

Nothing here raises for what a queue file contains: malformed or truncated
files yield what could be read, and :class:`PostfixQueueFileHeaders` says
in ``.problem`` what could not be read (even when the file could not be
opened at all).
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

from qrunner.message import HeaderReader, Message
from qrunner.mta.headers import DEFAULT_MAX_HEADER_BYTES, MtaFileHeaders
from qrunner.mta.postfix_records import (REC_TYPE_CONT, REC_TYPE_END, REC_TYPE_MESG, REC_TYPE_NORM,
                                         REC_TYPE_SIZE, REC_TYPE_XTRA, Damaged, RecordFollower,
                                         RecordReader)

__all__ = [
    "PostfixQueueFileHeaders",
    "PostfixQueueFileReader",
    "fields_from_lines",
    "is_queue_id",
    "hash_key",
    "arrival_microseconds",
    "QueuePaths",
]

# A header line as postcat's is_header() sees it: a name of printable ASCII
# other than space, tab and colon, optional space or tab, then a colon.
_HEADER_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")

_Next = Callable[[], Optional[Tuple[int, bytes]]]


def _is_header_line_start(data: bytes) -> bool:
    return data[:1] in (b" ", b"\t") or _HEADER_START.match(data) is not None


def _find_content(follower: RecordFollower) -> bool:
    """Position the reader at the first content record; False if there is none.

    The size record (``C``, always first in a queue file that cleanup
    wrote) holds the content offset, which is how postcat skips the
    envelope, however many recipients it lists. Without a usable one we
    read the envelope up to the ``M`` record.
    """
    reader = follower.reader
    rec = reader.next()
    if rec is None:
        return False
    if rec[0] == REC_TYPE_SIZE:
        parts = rec[1].split()
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) > reader.tell():
            reader.seek(int(parts[1]))
            return True
    else:
        reader.seek(0)
    while True:
        rec = follower.next()
        if rec is None or rec[0] in (REC_TYPE_XTRA, REC_TYPE_END):
            return False
        if rec[0] == REC_TYPE_MESG:
            return True


def _long_line(next_rec: _Next, first: bytes, room: int) -> Tuple[bytes, bool, Optional[str]]:
    """A line stored as ``L`` records and its final ``N``, joined.

    Returns the line, whether the header part ends with it, and why when
    that is because the file ends or is damaged: the records read before
    that point still count, as postcat prints them. Reading stops once the
    line is longer than ``room``, the header text the cap still allows.
    """
    parts = [first]
    size = len(first)
    while size <= room:
        try:
            rec = next_rec()
        except Damaged as exc:
            return b"".join(parts), True, "the queue file is damaged: %s" % exc
        if rec is None:
            return b"".join(parts), True, "the queue file ends inside a header line"
        rtype, data = rec
        if rtype == REC_TYPE_NORM or rtype == REC_TYPE_CONT:
            parts.append(data)
            size += len(data)
            if rtype == REC_TYPE_NORM:
                break
        elif rtype == REC_TYPE_XTRA or rtype == REC_TYPE_END:
            return b"".join(parts), True, None  # an unterminated last line
    return b"".join(parts), False, None


def _read_header_fields(f: BinaryIO, max_bytes: int) -> Tuple[List[bytes], Optional[str]]:
    """The header fields of an open queue file and, if incomplete, why."""
    follower = RecordFollower(RecordReader(f))
    fields: List[bytes] = []
    total = 0
    try:
        if not _find_content(follower):
            return fields, "the queue file holds no message content"
        next_rec = follower.next
        while True:
            rec = next_rec()
            if rec is None:
                return fields, "the queue file ends inside the message headers"
            rtype, line = rec
            if rtype != REC_TYPE_NORM and rtype != REC_TYPE_CONT:
                if rtype == REC_TYPE_XTRA or rtype == REC_TYPE_END:
                    return fields, None  # headers without a body
                continue  # a record type that carries no text here
            # The first record of a line decides, as in postcat: a line
            # that is neither a header nor a continuation ends the headers.
            if not _is_header_line_start(line):
                return fields, None
            last, note = False, None
            if rtype == REC_TYPE_CONT:
                line, last, note = _long_line(next_rec, line, max_bytes - total)
            total += len(line) + 1
            if total > max_bytes:
                line = line[:max(0, len(line) - (total - max_bytes))]
            if not line and total > max_bytes:
                pass  # the cap fell on this line's first byte
            elif line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\n" + line
            else:
                fields.append(line)
            if total > max_bytes:
                return fields, "the headers are longer than %d bytes; the rest was not read" % max_bytes
            if last:
                return fields, note
    except Damaged as exc:
        return fields, "the queue file is damaged: %s" % exc


_FAST_READ = 16384  # one read: the size record, the envelope and the headers of most messages


def _fast_header_fields(buf: bytes, max_bytes: int) -> Optional[List[bytes]]:
    """The header fields when the first read holds them all as plain ``N`` records; else None.

    The common case, read straight from one buffer: a size record with the
    content offset, then one ``N`` record per header line (lengths of one
    or two bytes), up to the first line that is no header. Anything else
    (a long line, a pointer a milter left, padding, the cap, a file that
    ends or a header part that runs past the buffer) returns None, and
    :func:`_read_header_fields` reads the file the general way; both give
    the same fields for a file both can read.
    """
    if len(buf) < 2 or buf[0] != REC_TYPE_SIZE or buf[1] >= 0x80:
        return None
    parts = buf[2:2 + buf[1]].split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    pos = int(parts[1])
    if pos <= 2 + buf[1]:
        return None
    end_of_buf = len(buf)
    fields: List[bytes] = []
    total = 0
    match = _HEADER_START.match
    while pos + 2 <= end_of_buf:
        rtype = buf[pos]
        length = buf[pos + 1]
        if length < 0x80:
            start = pos + 2
        else:
            if pos + 3 > end_of_buf or buf[pos + 2] >= 0x80:
                return None
            length = (length & 0x7F) | (buf[pos + 2] << 7)
            start = pos + 3
        pos = start + length
        if pos > end_of_buf:
            return None
        if rtype != REC_TYPE_NORM:
            if rtype == REC_TYPE_XTRA or rtype == REC_TYPE_END:
                return fields  # headers without a body
            return None
        line = buf[start:pos]
        first = line[:1]
        if first == b" " or first == b"\t":
            continuation = True
        elif match(line) is None:
            return fields  # the first line that is no header: normally the empty line before the body
        else:
            continuation = False
        total += length + 1
        if total > max_bytes:
            return None
        if continuation and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    return None


def fields_from_lines(lines: Sequence[bytes]) -> List[bytes]:
    """Group header lines (as postcat prints them) into fields.

    A line starting with a space or tab continues the previous field
    (joined with ``b"\\n"``); a continuation with no field before it stands
    alone, as it does in the queue file reader.
    """
    fields: List[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    return fields


class PostfixQueueFileHeaders(MtaFileHeaders):
    """The headers of one queued Postfix message, read when first asked.

    From the queue file; if that cannot be read (the message moved between
    queues since the listing, or the file is not readable by this user)
    and ``postcat_argv`` is given (e.g. ``["postcat", "-c",
    "/etc/postfix"]``), from ``postcat -hq ID``, which finds the message in
    whatever queue it is now. Never raises (see :class:`MtaFileHeaders`).

    ``read()`` returns one entry per field, continuation lines joined by
    ``b"\\n"``, no final line break: what ``HeaderLines`` holds, in the
    order Postfix's readers show (headers a milter added included). Reading
    stops at the first line that is neither a header nor a continuation
    (normally the empty line before the body), at the end of the content,
    at damage in the file, or once ``max_bytes`` of header text were read
    (the field that crosses the cap is cut there): a message with megabytes
    of headers must not cost megabytes per message. Bytes are returned as
    stored (8-bit text is not decoded).
    """

    __slots__ = ()
    kind = "queue file"
    id_kind = "a Postfix queue id"

    def __init__(self, path: str, queue_id: str, postcat_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        super().__init__(path, queue_id, postcat_argv, max_bytes)

    def read_file(self) -> Tuple[List[bytes], Optional[str]]:
        fd = os.open(self.path, os.O_RDONLY)  # no file object for the common case: one read of the first 16 KB
        try:
            fields = _fast_header_fields(os.read(fd, _FAST_READ), self.max_bytes)
            if fields is not None:
                return fields, None
            with open(fd, "rb", buffering=0, closefd=False) as f:
                f.seek(0)
                return _read_header_fields(f, self.max_bytes)
        finally:
            os.close(fd)

    def is_valid_id(self) -> bool:
        return is_queue_id(self.queue_id)

    def fallback_args(self) -> List[str]:
        return ["-hq", self.queue_id]

    def parse_fallback(self, output: bytes) -> Tuple[List[bytes], Optional[str]]:
        lines = output.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        capped: List[bytes] = []
        total = 0
        for fld in fields_from_lines(lines):
            total += len(fld) + 1
            if total > self.max_bytes:
                capped.append(fld[:max(0, len(fld) - (total - self.max_bytes))])
                break
            capped.append(fld)
        return capped, None


# -- queue ids and queue file locations (src/global/mail_queue.[ch]) -----------

# safe_ultostr.c: digits and the consonants, no vowels; base 51 leaves out "z".
_SAFE = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z"
_SAFE51 = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-y"
_SAFE_DIGITS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_SAFE_VALUE = {c: i for i, c in enumerate(_SAFE_DIGITS)}

# Short form (mail_queue.h MQID_SH_*): microseconds as exactly 5 upper-case
# hex digits, then the inode number in upper-case hex (%lX, 1..16 digits).
_SHORT_ID = re.compile(r"[0-9A-F]{6,21}\Z")
# Long form (MQID_LG_*, enable_long_queue_ids): seconds in base 52 (6 or
# more digits, at most 12 for 64 bits), microseconds in base 52 (exactly 4),
# the separator "z", the inode number in base 51 (never a "z").
_LONG_ID = re.compile(r"[%s]{10,16}z[%s]{1,12}\Z" % (_SAFE, _SAFE51))
_QUEUE_NAME = re.compile(r"[A-Za-z0-9]{1,100}\Z")
_MQID_LG_TIME_PAD = 10
_MQID_LG_USEC_PAD = 4


def is_queue_id(s: object) -> bool:
    """True when ``s`` is a Postfix queue id, short or long form.

    Stricter than Postfix's own ``mail_queue_id_ok()`` (which also admits
    flush log names): only what ``mail_queue_enter()`` creates passes, so a
    path, an option or anything with spaces never reaches a command line or
    a file name.
    """
    if not isinstance(s, str):
        return False
    return _SHORT_ID.match(s) is not None or _LONG_ID.match(s) is not None


def hash_key(queue_id: str) -> str:
    """What Postfix hashes a queue id on: the string whose first characters name the hash directories.

    ``mail_queue_dir()``: a long id (found with MQID_FIND_LG_INUM_SEPARATOR:
    the last "z", at least 10 characters in) hashes on its microseconds,
    the 4 base-52 digits before the "z", converted to the short form's
    5-digit upper-case hex (MQID_LG_GET_HEX_USEC); a short id hashes on
    itself, whose first 5 characters are those hex microseconds. So both
    forms of the same arrival land in the same directory.
    """
    z = queue_id.rfind("z")
    if z >= _MQID_LG_TIME_PAD:
        usec = 0
        for ch in queue_id[z - _MQID_LG_USEC_PAD:z]:
            value = _SAFE_VALUE.get(ch)
            if value is None or value >= 52:
                usec = 0  # Postfix uses 0 when the digits do not decode
                break
            usec = usec * 52 + value
        return "%05X" % usec
    return queue_id


class PostfixQueueFileReader(HeaderReader):
    """The queue file and the :class:`PostfixQueueFileHeaders` of each message of one listing, when first asked.

    A listed message's queue file follows from its queue and its id
    (``paths``), so one reader serves the whole listing: a big queue holds
    no path and no source object per message. ``postcat_argv`` as for the
    source.
    """

    __slots__ = ("paths", "postcat_argv", "max_bytes")

    def __init__(self, paths: "QueuePaths", postcat_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.paths = paths
        self.postcat_argv = tuple(postcat_argv) if postcat_argv else None
        self.max_bytes = max_bytes

    def filename(self, message: Message) -> str:
        """Where the listing saw the message; "" for a queue name or id Postfix would refuse."""
        try:
            return self.paths.path(message.queue_name, message.queue_id)
        except ValueError:
            return ""

    def source(self, message: Message) -> PostfixQueueFileHeaders:
        return PostfixQueueFileHeaders(message.queue_file(), message.queue_id, self.postcat_argv, self.max_bytes)

    def __repr__(self) -> str:
        return "PostfixQueueFileReader(%r)" % (self.postcat_argv,)


class QueuePaths:
    """Queue file paths of one Postfix instance: its hashing settings parsed once, for a whole listing.

    ``hash_queue_names`` is ``postconf -h hash_queue_names`` (a list, or the
    string itself); queues named there (compared without case, as Postfix
    does) get ``hash_queue_depth`` levels of one-character directories.
    """

    def __init__(self, queue_directory: str, hash_queue_names: Union[Sequence[str], str], hash_queue_depth: int):
        if isinstance(hash_queue_names, str):
            names = hash_queue_names.replace(",", " ").split()
        else:
            names = [n for item in hash_queue_names for n in str(item).replace(",", " ").split()]
        self.queue_directory = queue_directory
        self.hashed = {n.lower() for n in names}
        self.depth = int(hash_queue_depth)
        if self.hashed and self.depth < 1:
            raise ValueError("hash_queue_depth must be at least 1, not %r" % (hash_queue_depth,))
        self._queues: Dict[str, Tuple[str, bool]] = {}  # queue name -> (its directory + "/", hashed?)

    def path(self, queue_name: str, queue_id: str, key: Optional[str] = None) -> str:
        """Where Postfix keeps message ``queue_id`` of queue ``queue_name``.

        In a hashed queue, ``dir_forest()`` names one directory level per
        character of :func:`hash_key` (an id shorter than the depth is
        padded with "_"); ``key`` is that key when the caller has it.
        Raises ValueError for a queue name or id that Postfix would refuse,
        so that nothing else ever becomes a path.
        """
        queue = self._queues.get(queue_name) if type(queue_name) is str else None
        if queue is None:
            if not isinstance(queue_name, str) or not _QUEUE_NAME.match(queue_name):
                raise ValueError("not a Postfix queue name: %r" % (queue_name,))
            queue = self._queues[queue_name] = (os.path.join(self.queue_directory, queue_name, ""),
                                                queue_name.lower() in self.hashed)
        if not is_queue_id(queue_id):
            raise ValueError("not a Postfix queue id: %r" % (queue_id,))
        directory, hashed = queue
        if not hashed:
            return directory + queue_id
        key = key or hash_key(queue_id)
        depth = self.depth
        if depth == 1:
            return directory + key[0] + "/" + queue_id
        forest = [key[n] if n < len(key) else "_" for n in range(depth)]
        return directory + "/".join(forest) + "/" + queue_id


def arrival_microseconds(queue_id: str) -> int:
    """The microseconds of the arrival that a queue id (either form) encodes."""
    return int(hash_key(queue_id)[:5], 16)
