"""The envelope of a queued Postfix message, read from its queue file the way qmgr reads it.

What a re-injection must carry (:func:`read_envelope`), the content it
sends (:func:`iter_content`), the route a re-injection listener stamped
into a copy (:func:`read_route`) and the envelope sender alone
(:func:`read_sender`), all read through :mod:`qrunner.mta.postfix_records`
the way Postfix's queue manager reads them (``src/qmgr/qmgr_message.c``):

- The envelope part runs from the size record (``C``) to the message start
  (``M``); the "extracted" part runs from ``X`` (at data offset + data size,
  both in ``C``) to the end record ``E``. Recipients and most attributes may
  appear in either part; a later value overrides an earlier one, as in qmgr.
- A recipient is an ``R`` record, preceded by its own ``A notify_flags=``,
  ``A dsn_orig_rcpt=`` and ``O`` (original recipient) records. When a
  delivery agent finishes with a recipient, qmgr overwrites the type byte of
  its ``R`` record in place with ``D`` (``deliver_completed()``); cleanup
  marks a recipient it cancelled (e.g. a milter's delrcpt) ``/``. Both are
  done: only ``R`` recipients are still to be delivered.
- DSN: ``A envelope_id=`` (ENVID), ``A ret_flags=`` (RET: FULL 1, HDRS 2),
  per recipient ``A notify_flags=`` (``src/global/dsn_mask.h``: NEVER 1,
  SUCCESS 2, FAILURE 4, DELAY 8) and ``A dsn_orig_rcpt=`` ("type;address",
  already decoded). ``A encoding=8bit`` is BODY=8BITMIME. The 6th field of
  ``C`` holds the send options (``src/global/sendopts.h``): bit 1 is
  SMTPUTF8 requested, bits 2 and 4 say that a header / the sender contain
  UTF-8.
- The route a re-injection stamped is an ``L`` record in the envelope (or
  extracted) part, REC_TYPE_FILT, which postcat shows as
  ``content_filter:``. In the content part the same letter means a long line
  continued (REC_TYPE_CONT): the two are never confused because the content
  part is skipped with the offsets in ``C``.
- The content: every ``N`` record is one line, ``L`` records continue a long
  line, ``p`` pointer records (headers a milter added) are followed.

Nothing here writes to a queue file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from qrunner.mta.postfix_records import (REC_TYPE_ATTR, REC_TYPE_CONT, REC_TYPE_DONE, REC_TYPE_DRCP,
                                         REC_TYPE_DSN_ENVID, REC_TYPE_DSN_NOTIFY, REC_TYPE_DSN_ORCPT,
                                         REC_TYPE_DSN_RET, REC_TYPE_END, REC_TYPE_FILT, REC_TYPE_FROM,
                                         REC_TYPE_MESG, REC_TYPE_NORM, REC_TYPE_ORCP, REC_TYPE_RCPT,
                                         REC_TYPE_RDR, REC_TYPE_SIZE, REC_TYPE_TIME, REC_TYPE_XTRA, Damaged,
                                         RecordFollower, RecordReader, iter_records)

__all__ = [
    "PostfixRecipient",
    "PostfixEnvelope",
    "QueueFileError",
    "read_envelope",
    "iter_content",
    "read_route",
    "read_stamp",
    "read_sender",
    "NOTIFY_NEVER",
    "NOTIFY_SUCCESS",
    "NOTIFY_FAILURE",
    "NOTIFY_DELAY",
    "RET_FULL",
    "RET_HDRS",
    "SMTPUTF8_REQUESTED",
]

# src/global/dsn_mask.h
NOTIFY_NEVER = 1
NOTIFY_SUCCESS = 2
NOTIFY_FAILURE = 4
NOTIFY_DELAY = 8
RET_FULL = 1
RET_HDRS = 2
# src/global/sendopts.h (the 6th field of the C record)
SMTPUTF8_REQUESTED = 1

_NOTIFY_WORDS = ((NOTIFY_SUCCESS, "SUCCESS"), (NOTIFY_FAILURE, "FAILURE"), (NOTIFY_DELAY, "DELAY"))

# The named attributes that stand for the DSN record types older writers
# used (rec_attr_map.c maps both to one meaning).
_DSN_ATTRIBUTES = {"dsn_orig_rcpt": REC_TYPE_DSN_ORCPT, "notify_flags": REC_TYPE_DSN_NOTIFY,
                   "envelope_id": REC_TYPE_DSN_ENVID, "ret_flags": REC_TYPE_DSN_RET}


class QueueFileError(ValueError):
    """The file is not a Postfix queue file, or not a complete one: nothing may be re-injected from it."""


@dataclass(frozen=True)
class PostfixRecipient:
    """One recipient still to be delivered, with its DSN data.

    ``notify``: the NOTIFY bits (0 when the client asked for none, and
    Postfix's default applies). ``orcpt``: the DSN original recipient as
    Postfix stores it, "type;address" with the address decoded (smtpd
    writes one even when the client sent no ORCPT). ``original``: the ``O``
    record, the address before Postfix's own rewriting and aliasing.
    """

    address: str
    notify: int = 0
    orcpt: str = ""
    original: str = ""

    def notify_param(self) -> Optional[str]:
        """The RCPT TO ``NOTIFY=`` value, or None when the client gave none."""
        if not self.notify:
            return None
        if self.notify & NOTIFY_NEVER:
            return "NEVER"
        words = [w for bit, w in _NOTIFY_WORDS if self.notify & bit]
        return ",".join(words) or None


@dataclass(frozen=True)
class PostfixEnvelope:
    """What a re-injection of one queued message must carry, read from its queue file.

    Addresses are text decoded as UTF-8 with ``surrogateescape``, so any
    byte a queue file holds goes back out unchanged. ``sendopts`` is the
    6th field of the size record; ``encoding`` is "8bit", "7bit" or "".
    ``content_filter`` is the route stamped into the message
    ("transport:nexthop"), "" for none. ``client`` holds the original
    client's attributes (``log_client_name`` ...), used to tell the
    listener with XFORWARD so that its log names the original client and
    queue id.
    """

    path: str
    queue_id: str
    sender: str
    recipients: Tuple[PostfixRecipient, ...]
    done_recipients: int = 0
    envid: str = ""
    ret: int = 0
    encoding: str = ""
    sendopts: int = 0
    arrival: float = 0.0
    content_filter: str = ""
    redirect: str = ""
    client: Dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def smtputf8(self) -> bool:
        """The sender requested SMTPUTF8 (or Postfix's autodetection did)."""
        return bool(self.sendopts & SMTPUTF8_REQUESTED)

    @property
    def eight_bit(self) -> bool:
        """The message was received as BODY=8BITMIME."""
        return self.encoding == "8bit"

    def ret_param(self) -> Optional[str]:
        """The MAIL FROM ``RET=`` value, or None."""
        return {RET_FULL: "FULL", RET_HDRS: "HDRS"}.get(self.ret)

    def needs_smtputf8(self) -> bool:
        """SMTPUTF8 must be sent: requested, or an envelope address is not ASCII.

        Postfix's smtpd refuses a non-ASCII address in MAIL FROM or RCPT TO
        without the SMTPUTF8 parameter, even when the original sender did not
        ask for it (Postfix then only recorded that the sender is UTF-8).
        """
        if self.smtputf8:
            return True
        addresses = [self.sender, self.redirect] + [r.address for r in self.recipients]
        return not all(a.isascii() for a in addresses)


# -- reading -------------------------------------------------------------------------------------


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _size_fields(data: bytes, path: str) -> List[int]:
    """The numbers of the size record; at least data size, data offset and recipient count."""
    try:
        fields = [int(x) for x in data.split()]
    except ValueError:
        fields = []
    if len(fields) < 3 or fields[0] <= 0 or fields[1] <= 0:
        raise QueueFileError("%s is not a Postfix queue file (its size record %r is not one Postfix writes)"
                             % (path, data[:100]))
    return fields


class _EnvelopeBuilder:
    """Collects records of the envelope and extracted parts, with qmgr's rules."""

    def __init__(self) -> None:
        self.sender: Optional[bytes] = None
        self.recipients: List[PostfixRecipient] = []
        self.done = 0
        self.envid = b""
        self.ret = 0
        self.encoding = b""
        self.arrival = 0.0
        self.content_filter = b""
        self.redirect = b""
        self.attrs: Dict[str, bytes] = {}
        self._notify = 0
        self._orcpt = b""
        self._orig = b""

    def _forget_recipient_data(self) -> None:
        self._notify = 0
        self._orcpt = b""
        self._orig = b""

    def add(self, rtype: int, data: bytes) -> None:
        if rtype == REC_TYPE_ATTR:
            name, sep, value = data.partition(b"=")
            if not sep:
                return
            key = _text(name)
            rtype = _DSN_ATTRIBUTES.get(key, REC_TYPE_ATTR)
            if rtype == REC_TYPE_ATTR:
                if key == "encoding":
                    self.encoding = value
                else:
                    self.attrs.setdefault(key, value)
                return
            data = value
        if rtype == REC_TYPE_RCPT:
            self.recipients.append(PostfixRecipient(_text(data), self._notify, _text(self._orcpt),
                                                    _text(self._orig)))
            self._forget_recipient_data()
        elif rtype == REC_TYPE_DONE or rtype == REC_TYPE_DRCP:
            self.done += 1
            self._forget_recipient_data()
        elif rtype == REC_TYPE_ORCP:
            self._orig = data
        elif rtype == REC_TYPE_DSN_ORCPT:
            self._orcpt = data
        elif rtype == REC_TYPE_DSN_NOTIFY:
            n = int(data) if data.isdigit() else 0
            # dsn_mask.h DSN_NOTIFY_OK: NEVER alone, or any of the others; qmgr ignores the rest
            ok = n == NOTIFY_NEVER or (n and not n & ~(NOTIFY_SUCCESS | NOTIFY_FAILURE | NOTIFY_DELAY))
            self._notify = n if ok else 0
        elif rtype == REC_TYPE_DSN_ENVID:
            self.envid = data
        elif rtype == REC_TYPE_DSN_RET:
            if data.isdigit() and int(data) in (RET_FULL, RET_HDRS):
                self.ret = int(data)
        elif rtype == REC_TYPE_FROM:
            if self.sender is None:
                self.sender = data
        elif rtype == REC_TYPE_TIME:
            if not self.arrival:
                parts = data.split()
                try:
                    self.arrival = int(parts[0]) + (int(parts[1]) / 1e6 if len(parts) > 1 else 0.0)
                except (ValueError, IndexError):
                    pass
        elif rtype == REC_TYPE_FILT:
            self.content_filter = data
        elif rtype == REC_TYPE_RDR:
            self.redirect = data

    def envelope(self, path: str, sendopts: int) -> PostfixEnvelope:
        """The envelope collected; a file without a sender record is not a complete queue file."""
        if self.sender is None:
            raise QueueFileError("%s has no envelope sender record: not a complete queue file" % path)
        queue_id = _text(self.attrs.get("log_ident", b"")) or os.path.basename(path)
        client = {k: _text(v) for k, v in self.attrs.items()
                  if k in ("log_client_name", "log_client_address", "log_client_port", "log_protocol_name",
                           "log_helo_name", "rewrite_context")}
        return PostfixEnvelope(
            path=path, queue_id=queue_id, sender=_text(self.sender), recipients=tuple(self.recipients),
            done_recipients=self.done, envid=_text(self.envid), ret=self.ret, encoding=_text(self.encoding),
            sendopts=sendopts, arrival=self.arrival, content_filter=_text(self.content_filter).strip(),
            redirect=_text(self.redirect), client=client)


class _QueueFile:
    """One open queue file: where its parts are (from the size record), and their records."""

    def __init__(self, f: BinaryIO, path: str):
        self.path = path
        self.reader = RecordReader(f)
        try:
            first = self.reader.next()
        except Damaged:
            first = None
        if first is None or first[0] != REC_TYPE_SIZE:
            raise QueueFileError("%s is not a Postfix queue file (it does not start with a size record)" % path)
        fields = _size_fields(first[1], path)
        self.data_size, self.data_offset = fields[0], fields[1]
        self.sendopts = fields[5] if len(fields) > 5 else 0

    def envelope_records(self) -> Iterator[Tuple[int, bytes]]:
        """The records of the envelope part, then those of the extracted part; never the content.

        Raises QueueFileError where either part is cut short or damaged,
        after yielding the records before that point.
        """
        path = self.path
        next_rec = RecordFollower(self.reader).next
        try:
            while True:
                rec = next_rec()
                if rec is None:
                    raise QueueFileError("%s ends inside the envelope (no message content): not a complete "
                                         "queue file" % path)
                if rec[0] == REC_TYPE_MESG:
                    break
                yield rec
            self.reader.seek(self.data_offset + self.data_size)
            rec = next_rec()
            if rec is None or rec[0] != REC_TYPE_XTRA:
                raise QueueFileError("%s: no end-of-content record where the size record says the content ends"
                                     % path)
            while True:
                rec = next_rec()
                if rec is None:
                    raise QueueFileError("%s has no end record: the queue file is incomplete" % path)
                if rec[0] == REC_TYPE_END:
                    return
                yield rec
        except Damaged as exc:
            raise QueueFileError("%s is damaged: %s" % (path, exc))

    def envelope(self) -> PostfixEnvelope:
        env = _EnvelopeBuilder()
        for rtype, data in self.envelope_records():
            env.add(rtype, data)
        return env.envelope(self.path, self.sendopts)

    def content_lines(self) -> Iterator[bytes]:
        """The message content, one line at a time, as Postfix's smtp client sends it."""
        path = self.path
        next_rec = RecordFollower(self.reader).next
        try:
            self.reader.seek(self.data_offset)
            parts: List[bytes] = []
            while True:
                rec = next_rec()
                if rec is None:
                    raise QueueFileError("%s ends inside the message content" % path)
                rtype, data = rec
                if rtype == REC_TYPE_NORM:
                    if parts:
                        parts.append(data)
                        yield b"".join(parts)
                        parts = []
                    else:
                        yield data
                elif rtype == REC_TYPE_CONT:
                    parts.append(data)
                elif rtype == REC_TYPE_XTRA:
                    if parts:  # an unterminated last line, as Postfix's smtp client would send it
                        yield b"".join(parts)
                    return
                else:
                    raise QueueFileError("%s: unexpected %r record inside the message content"
                                         % (path, chr(rtype)))
        except Damaged as exc:
            raise QueueFileError("%s is damaged inside the message content: %s" % (path, exc))


def read_envelope(path: str) -> PostfixEnvelope:
    """What a re-injection of the message in queue file ``path`` must carry.

    Raises QueueFileError (a ValueError) for a file that is not a complete
    Postfix queue file (a half-written file must never be re-injected: the
    copy would be cut short), OSError when it cannot be read.
    """
    with open(path, "rb", buffering=0) as f:
        return _QueueFile(f, path).envelope()


def iter_content(path: str) -> Iterator[bytes]:
    """The message content of queue file ``path``, one line at a time, without line ends.

    Headers (including those a milter added, reached through pointer
    records), the empty line, then the body, exactly as stored: long lines
    joined, 8-bit bytes raw. The envelope is read first, so that a file
    that is not complete yields nothing. Raises QueueFileError if the
    content is damaged or cut short: a caller streaming it must then
    abandon what it sent.
    """
    with open(path, "rb", buffering=0) as f:
        queue_file = _QueueFile(f, path)
        queue_file.envelope()
        yield from queue_file.content_lines()


def read_route(path: str) -> str:
    """The route ("transport:nexthop") a re-injection listener stamped into the message; "" for none."""
    return read_stamp(path)[0]


def read_stamp(path: str) -> Tuple[str, str]:
    """(route, original's queue id) that a re-injection stamped into a copy; "" for what it lacks.

    The route ("transport:nexthop") is the listener's ``content_filter``:
    it makes a message a copy that qrunner already routed through a
    sender, and the queue file says so even when qrunner's own records are
    lost. The original's id is the XFORWARD IDENT qrunner sends, which
    smtpd stores as ``A log_ident=`` (postcat: ``named_attribute:
    log_ident=``; the log: ``orig_queue_id=``): it names the original of a
    copy the listener holds. Only the envelope and extracted parts are
    read (the content is skipped with the size record's offsets); as in
    qmgr, a route in the extracted part overrides one in the envelope. A
    file that is damaged or cut short gives what its records before the
    damage hold. Raises OSError when the file cannot be read.
    """
    route = ident = b""
    with open(path, "rb", buffering=0) as f:
        try:
            for rtype, data in _QueueFile(f, path).envelope_records():
                if rtype == REC_TYPE_FILT:
                    route = data
                elif rtype == REC_TYPE_ATTR and data.startswith(b"log_ident=") and not ident:
                    ident = data[len(b"log_ident="):]
        except QueueFileError:
            pass
    return _text(route).strip(), _text(ident).strip()


def read_sender(path: str) -> Optional[bytes]:
    """The envelope sender (the ``S`` record) of a queue file; None when not found.

    ``postqueue -j`` shows the null sender as ``empty_address_recipient``
    (MAILER-DAEMON), which a real sender could also be called: the queue
    file says which it is. Only the envelope part before the content is read.
    """
    with open(path, "rb", buffering=0) as f:
        for rec_type, data in iter_records(f):
            if rec_type == "S":
                return data
            if rec_type == "M":
                return None
    return None
