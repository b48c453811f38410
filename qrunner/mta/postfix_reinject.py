"""Hand a queued Postfix message to a sender's re-injection listener (DESIGN.md section 5b).

A message that the policy gives to a non-default sender must leave through
that sender's route. Postfix cannot change the route of a queued message in
place, so qrunner submits a copy over SMTP to a loopback ``smtpd`` listener
(contrib/postfix/master.cf.qrunner) whose ``-o content_filter=TRANSPORT:NEXTHOP``
stamps the route into the copy; the caller deletes the original only after
this module reports that the listener accepted the copy.

Everything the copy must carry comes from the original's queue file, read
the way Postfix's queue manager reads it (``src/qmgr/qmgr_message.c``):

- The envelope part runs from the size record (``C``) to the message start
  (``M``); the "extracted" part runs from ``X`` (at data offset + data size,
  both in ``C``) to the end record ``E``. Recipients and most attributes may
  appear in either part; a later value overrides an earlier one, as in qmgr.
- A recipient is an ``R`` record, preceded by its own ``A notify_flags=``,
  ``A dsn_orig_rcpt=`` and ``O`` (original recipient) records. When a
  delivery agent finishes with a recipient, qmgr overwrites the type byte of
  its ``R`` record in place with ``D`` (``deliver_completed()``); cleanup
  marks a recipient it cancelled (e.g. a milter's delrcpt) ``/``. Both are
  done: only ``R`` recipients are re-injected.
- DSN: ``A envelope_id=`` (ENVID), ``A ret_flags=`` (RET: FULL 1, HDRS 2),
  per recipient ``A notify_flags=`` (``src/global/dsn_mask.h``: NEVER 1,
  SUCCESS 2, FAILURE 4, DELAY 8) and ``A dsn_orig_rcpt=`` ("type;address",
  already decoded). ``A encoding=8bit`` is BODY=8BITMIME. The 6th field of
  ``C`` holds the send options (``src/global/sendopts.h``): bit 1 is
  SMTPUTF8 requested, bits 2 and 4 say that a header / the sender contain
  UTF-8.
- The route a previous re-injection stamped is an ``L`` record in the
  envelope (or extracted) part, REC_TYPE_FILT, which postcat shows as
  ``content_filter:``. In the content part the same letter means a long line
  continued (REC_TYPE_CONT): the two are never confused because the content
  part is skipped with the offsets in ``C``.

The content is sent as Postfix's own SMTP client would send it: every ``N``
record is one line, ``L`` records continue a long line, ``p`` pointer
records (headers a milter added) are followed. Nothing here writes to the
queue file.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import socket
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from qrunner.mta.postfix_records import Damaged, RecordFollower, RecordReader

__all__ = [
    "PostfixRecipient",
    "PostfixEnvelope",
    "QueueFileError",
    "ReinjectError",
    "read_envelope",
    "iter_content",
    "reinject",
    "is_routed_copy",
    "route_of",
    "DEFAULT_HELO",
    "NOTIFY_NEVER",
    "NOTIFY_SUCCESS",
    "NOTIFY_FAILURE",
    "NOTIFY_DELAY",
    "RET_FULL",
    "RET_HDRS",
    "SMTPUTF8_REQUESTED",
]

log = logging.getLogger("qrunner.postfix")

DEFAULT_HELO = "qrunner.localhost"

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

# Record types (src/global/rec_type.h).
_SIZE, _TIME, _FROM, _RCPT, _DONE, _DRCP, _ORCP = b"C"[0], b"T"[0], b"S"[0], b"R"[0], b"D"[0], b"/"[0], b"O"[0]
_ATTR, _FILT, _RDR, _MESG, _XTRA, _END = b"A"[0], b"L"[0], b">"[0], b"M"[0], b"X"[0], b"E"[0]
_CONT, _NORM = b"L"[0], b"N"[0]
# DSN records that older writers used instead of named attributes (rec_attr_map.c maps both).
_DSN_ORCPT, _DSN_NOTIFY, _DSN_ENVID, _DSN_RET = b"o"[0], b"n"[0], b"i"[0], b"<"[0]

_QUEUED_AS = re.compile(r"\bqueued as ([0-9A-Za-z]+)")
_CHUNK = 65536


class QueueFileError(ValueError):
    """The file is not a Postfix queue file, or not a complete one: nothing may be re-injected from it."""


class ReinjectError(Exception):
    """The listener did not take the message; the sentence says at which step and what it answered.

    ``step`` names the step ("queue file", "connect", "EHLO", "MAIL FROM",
    "RCPT TO", "DATA", "end of data"), ``code`` the listener's reply code
    (None when it gave none). ``maybe_accepted`` is True only when the
    failure came after the whole message was sent (no final reply, or a 250
    without a queue id): the listener may then hold a copy, so keeping the
    original can at worst duplicate the message, never lose it.
    """

    def __init__(self, message: str, step: str = "", code: Optional[int] = None,
                 maybe_accepted: bool = False):
        super().__init__(message)
        self.message = message
        self.step = step
        self.code = code
        self.maybe_accepted = maybe_accepted


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
        return not all(_is_ascii(a) for a in addresses)


# -- reading -------------------------------------------------------------------------------------


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _is_ascii(text: str) -> bool:
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        return False
    return True


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
        if rtype == _ATTR:
            name, sep, value = data.partition(b"=")
            if not sep:
                return
            key = _text(name)
            rtype = {"dsn_orig_rcpt": _DSN_ORCPT, "notify_flags": _DSN_NOTIFY,
                     "envelope_id": _DSN_ENVID, "ret_flags": _DSN_RET}.get(key, _ATTR)
            if rtype == _ATTR:
                if key == "encoding":
                    self.encoding = value
                else:
                    self.attrs.setdefault(key, value)
                return
            data = value
        if rtype == _RCPT:
            self.recipients.append(PostfixRecipient(_text(data), self._notify, _text(self._orcpt),
                                                    _text(self._orig)))
            self._forget_recipient_data()
        elif rtype == _DONE or rtype == _DRCP:
            self.done += 1
            self._forget_recipient_data()
        elif rtype == _ORCP:
            self._orig = data
        elif rtype == _DSN_ORCPT:
            self._orcpt = data
        elif rtype == _DSN_NOTIFY:
            n = int(data) if data.isdigit() else 0
            # dsn_mask.h DSN_NOTIFY_OK: NEVER alone, or any of the others; qmgr ignores the rest
            ok = n == NOTIFY_NEVER or (n and not n & ~(NOTIFY_SUCCESS | NOTIFY_FAILURE | NOTIFY_DELAY))
            self._notify = n if ok else 0
        elif rtype == _DSN_ENVID:
            self.envid = data
        elif rtype == _DSN_RET:
            if data.isdigit() and int(data) in (RET_FULL, RET_HDRS):
                self.ret = int(data)
        elif rtype == _FROM:
            if self.sender is None:
                self.sender = data
        elif rtype == _TIME:
            if not self.arrival:
                parts = data.split()
                try:
                    self.arrival = int(parts[0]) + (int(parts[1]) / 1e6 if len(parts) > 1 else 0.0)
                except (ValueError, IndexError):
                    pass
        elif rtype == _FILT:
            self.content_filter = data
        elif rtype == _RDR:
            self.redirect = data


def _read_envelope_from(f: BinaryIO, path: str) -> Tuple[PostfixEnvelope, int, int]:
    """The envelope, the content offset and the offset of the extracted part."""
    reader = RecordReader(f)
    follower = RecordFollower(reader)
    try:
        first = reader.next()
    except Damaged:
        first = None
    if first is None or first[0] != _SIZE:
        raise QueueFileError("%s is not a Postfix queue file (it does not start with a size record)" % path)
    fields = _size_fields(first[1], path)
    data_size, data_offset = fields[0], fields[1]
    sendopts = fields[5] if len(fields) > 5 else 0
    env = _EnvelopeBuilder()
    try:
        while True:
            rec = follower.next()
            if rec is None:
                raise QueueFileError("%s ends inside the envelope (no message content): not a complete "
                                     "queue file" % path)
            if rec[0] == _MESG:
                break
            env.add(rec[0], rec[1])
        extracted = data_offset + data_size
        reader.seek(extracted)
        rec = follower.next()
        if rec is None or rec[0] != _XTRA:
            raise QueueFileError("%s: no end-of-content record where the size record says the content ends"
                                 % path)
        while True:
            rec = follower.next()
            if rec is None:
                raise QueueFileError("%s has no end record: the queue file is incomplete" % path)
            if rec[0] == _END:
                break
            env.add(rec[0], rec[1])
    except Damaged as exc:
        raise QueueFileError("%s is damaged: %s" % (path, exc))
    if env.sender is None:
        raise QueueFileError("%s has no envelope sender record: not a complete queue file" % path)
    queue_id = _text(env.attrs.get("log_ident", b"")) or os.path.basename(path)
    client = {k: _text(v) for k, v in env.attrs.items()
              if k in ("log_client_name", "log_client_address", "log_client_port", "log_protocol_name",
                       "log_helo_name", "rewrite_context")}
    envelope = PostfixEnvelope(
        path=path, queue_id=queue_id, sender=_text(env.sender), recipients=tuple(env.recipients),
        done_recipients=env.done, envid=_text(env.envid), ret=env.ret, encoding=_text(env.encoding),
        sendopts=sendopts, arrival=env.arrival, content_filter=_text(env.content_filter).strip(),
        redirect=_text(env.redirect), client=client)
    return envelope, data_offset, extracted


def read_envelope(path: str) -> PostfixEnvelope:
    """What a re-injection of the message in queue file ``path`` must carry.

    Raises QueueFileError (a ValueError) for a file that is not a complete
    Postfix queue file (a half-written file must never be re-injected: the
    copy would be cut short), OSError when it cannot be read.
    """
    with open(path, "rb") as f:
        return _read_envelope_from(f, path)[0]


def _iter_content_from(f: BinaryIO, path: str, data_offset: int) -> Iterator[bytes]:
    reader = RecordReader(f)
    follower = RecordFollower(reader)
    try:
        reader.seek(data_offset)
        parts: List[bytes] = []
        while True:
            rec = follower.next()
            if rec is None:
                raise QueueFileError("%s ends inside the message content" % path)
            rtype, data = rec
            if rtype == _NORM:
                if parts:
                    parts.append(data)
                    yield b"".join(parts)
                    parts = []
                else:
                    yield data
            elif rtype == _CONT:
                parts.append(data)
            elif rtype == _XTRA:
                if parts:  # an unterminated last line, as Postfix's smtp client would send it
                    yield b"".join(parts)
                return
            else:
                raise QueueFileError("%s: unexpected %r record inside the message content"
                                     % (path, chr(rtype)))
    except Damaged as exc:
        raise QueueFileError("%s is damaged inside the message content: %s" % (path, exc))


def iter_content(path: str) -> Iterator[bytes]:
    """The message content of queue file ``path``, one line at a time, without line ends.

    Headers (including those a milter added, reached through pointer
    records), the empty line, then the body, exactly as stored: long lines
    joined, 8-bit bytes raw. Raises QueueFileError if the content is
    damaged or cut short: a caller streaming it must then abandon what it
    sent.
    """
    with open(path, "rb") as f:
        data_offset = _read_envelope_from(f, path)[1]
        yield from _iter_content_from(f, path, data_offset)


# -- routes --------------------------------------------------------------------------------------


def route_of(transport: str, nexthop: str) -> str:
    """The content_filter value a listener stamps for ``transport`` and ``nexthop``."""
    return "%s:%s" % (transport, nexthop)


def _split_route(route: Union[str, Tuple[str, str]]) -> Tuple[str, str]:
    if isinstance(route, tuple):
        return route[0].strip(), route[1].strip()
    transport, _sep, nexthop = route.strip().partition(":")
    return transport, nexthop


def is_routed_copy(envelope: PostfixEnvelope, routes: Iterable[Union[str, Tuple[str, str]]]) -> bool:
    """True when the message carries one of ``routes`` as its content_filter.

    ``routes`` are "transport:nexthop" strings (or (transport, nexthop)
    pairs), as the senders' listeners stamp them. A message that carries
    one was re-injected by qrunner (or is routed the same way by the
    admin), so it must not be decided or re-injected again even when
    qrunner's own record of it is lost. The transport name is compared
    exactly (master.cf names are case-sensitive), the next hop without case
    (host names).
    """
    if not envelope.content_filter:
        return False
    mine = _split_route(envelope.content_filter)
    for route in routes:
        transport, nexthop = _split_route(route)
        if transport == mine[0] and nexthop.lower() == mine[1].lower():
            return True
    return False


# -- SMTP ----------------------------------------------------------------------------------------


def _xtext(value: str, special: str = "+=") -> str:
    """RFC 3461 xtext: printable ASCII but "+" and "=" as is, every other byte as +HH."""
    out = []
    for b in value.encode("utf-8", "surrogateescape"):
        ch = chr(b)
        if 32 < b < 127 and ch not in special:
            out.append(ch)
        else:
            out.append("+%02X" % b)
    return "".join(out)


def _uxtext(value: str) -> str:
    r"""RFC 6533 utf-8-addr-xtext: as xtext, but "\", "+", "=" and non-ASCII as \x{HEX}."""
    out = []
    for ch in value:
        cp = ord(ch)
        if 32 < cp < 127 and ch not in "\\+=":
            out.append(ch)
        else:
            out.append("\\x{%02X}" % cp)
    return "".join(out)


def _orcpt_param(rcpt: PostfixRecipient, utf8: bool) -> Optional[str]:
    """The RCPT TO ``ORCPT=`` value: the stored type;address, or the O record as Postfix's client does."""
    orcpt = rcpt.orcpt
    if not orcpt and rcpt.original:
        kind = "utf-8" if utf8 and not _is_ascii(rcpt.original) else "rfc822"
        orcpt = "%s;%s" % (kind, rcpt.original)
    kind, sep, address = orcpt.partition(";")
    if not sep or not kind or not _is_ascii(kind):
        return None  # not something smtpd would have stored; sending it would only get the RCPT refused
    if kind.lower() == "utf-8":
        if not _valid_text(address):
            return None
        return "%s;%s" % (kind, _uxtext(address))
    return "%s;%s" % (kind, _xtext(address))


def _valid_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_DOT_ATOM_BAD = set('<>()[]\\,;:@" ')


def _quote_821(address: str) -> str:
    """An address in RFC 5321 form: the local part quoted when it is not a dot-string.

    Queue files hold addresses in Postfix's internal (unquoted) form, as
    Postfix's own SMTP client turns them back (``quote_821_local.c``). A
    quoted local part that did not need quoting is harmless: smtpd
    unquotes it again.
    """
    if not address:
        return ""
    at = address.rfind("@")
    local, domain = (address[:at], address[at:]) if at > 0 else (address, "")
    ok = (local and local[0] != "." and local[-1] != "." and ".." not in local
          and not any(c in _DOT_ATOM_BAD or ord(c) < 32 or ord(c) == 127 for c in local))
    if ok:
        return address
    return '"%s"%s' % (local.replace("\\", "\\\\").replace('"', '\\"'), domain)


def _reply_text(msg: Union[bytes, str]) -> str:
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "replace")
    return " ".join(msg.split())[:300]


def _timed_out(exc: BaseException) -> bool:
    """A socket timeout, also when smtplib wrapped it in SMTPServerDisconnected."""
    return isinstance(exc, socket.timeout) or isinstance(exc.__context__, socket.timeout)


class _FileProblem(Exception):
    """The queue file could not be read to the end while its content was being sent (internal)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _file_lines(path: str) -> Iterator[bytes]:
    try:
        yield from iter_content(path)
    except QueueFileError as exc:
        raise _FileProblem(str(exc))
    except OSError as exc:
        raise _FileProblem("cannot read %s: %s" % (path, exc.strerror or exc))


class _Session:
    """One SMTP conversation with the listener: byte-exact commands over smtplib's connection."""

    def __init__(self, listener: Tuple[str, int], helo: str, timeout: float, queue_id: str):
        self.listener = listener
        self.where = "%s:%d" % listener
        self.queue_id = queue_id
        self.helo = helo
        self.smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout)
        self.in_data = False  # between DATA's 354 and the final dot: a command would be message text
        self.data_sent = False  # the final dot went out: the listener may have queued the message

    def fail(self, step: str, what: str, code: Optional[int] = None) -> ReinjectError:
        return ReinjectError("%s was not re-injected: the listener %s %s" % (self.queue_id, self.where, what),
                             step=step, code=code)

    def command(self, step: str, line: str) -> Tuple[int, str]:
        try:
            self.smtp.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
            code, msg = self.smtp.getreply()
        except (socket.timeout, OSError, smtplib.SMTPException) as exc:
            raise self._lost(step, exc)
        return code, _reply_text(msg)

    def _lost(self, step: str, exc: BaseException) -> ReinjectError:
        if _timed_out(exc):
            what = "did not answer within %g s at %s" % (self.smtp.timeout, step)
        else:
            what = "dropped the connection at %s (%s)" % (step, exc)
        err = self.fail(step, what)
        if self.data_sent:
            err.message = err.args[0] + "; it may have queued a copy, so the original is kept (at worst a duplicate)"
            err.args = (err.message,)
            err.maybe_accepted = True
        return err

    def connect(self) -> None:
        host, port = self.listener
        try:
            code, msg = self.smtp.connect(host, port)
        except ConnectionRefusedError:
            raise self.fail("connect", "refused the connection (is it in master.cf, and did 'postfix reload' run?)")
        except (OSError, smtplib.SMTPException) as exc:
            if _timed_out(exc):
                raise self.fail("connect", "did not greet within %g s" % self.smtp.timeout)
            raise self.fail("connect", "could not be reached (%s)" % exc)
        if code != 220:
            raise self.fail("connect", "greeted with %d %s" % (code, _reply_text(msg)), code)
        try:
            code, msg = self.smtp.ehlo(self.helo)
        except (socket.timeout, OSError, smtplib.SMTPException) as exc:
            raise self._lost("EHLO", exc)
        if code != 250:
            raise self.fail("EHLO", "answered EHLO with %d %s" % (code, _reply_text(msg)), code)

    def has(self, extension: str) -> bool:
        return self.smtp.has_extn(extension)

    def send_data(self, lines: Iterable[bytes]) -> Tuple[int, str]:
        code, msg = self.command("DATA", "DATA")
        if code != 354:
            raise self.fail("DATA", "answered DATA with %d %s" % (code, msg), code)
        self.in_data = True
        sock = self.smtp.sock
        buf: List[bytes] = []
        size = 0
        try:
            for line in lines:
                if line[:1] == b".":
                    buf.append(b".")
                buf.append(line)
                buf.append(b"\r\n")
                size += len(line) + 3
                if size >= _CHUNK:
                    sock.sendall(b"".join(buf))
                    buf, size = [], 0
            buf.append(b".\r\n")
            self.data_sent = True  # from here on, err on the side of "maybe queued"
            sock.sendall(b"".join(buf))
        except _FileProblem as problem:
            # Closing without the final dot makes smtpd discard the message.
            self.close()
            raise ReinjectError("%s was not re-injected: %s; the listener got no complete message"
                                % (self.queue_id, problem.why), step="queue file")
        except (socket.timeout, OSError) as exc:
            raise self._lost("DATA", exc)
        try:
            code, msg = self.smtp.getreply()
        except (socket.timeout, OSError, smtplib.SMTPException) as exc:
            raise self._lost("end of data", exc)
        self.in_data = False
        return code, _reply_text(msg)

    def abandon(self) -> None:
        """RSET and QUIT, so that nothing half-given is queued; errors no longer matter."""
        for line in ("RSET", "QUIT"):
            try:
                self.smtp.send(line.encode() + b"\r\n")
                self.smtp.getreply()
            except (OSError, smtplib.SMTPException):
                break
        self.close()

    def quit(self) -> None:
        try:
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.smtp.close()
        except OSError:
            pass


def _xforward(session: _Session, envelope: PostfixEnvelope) -> None:
    """Tell the listener the original client and queue id (XFORWARD), when it allows it.

    Purely for the log: with it, Postfix logs ``orig_queue_id=`` and
    ``orig_client=`` for the copy, and the copy's Received line names the
    original client. Postfix's smtp client sends the same attributes
    (smtp_proto.c) and skips "unknown" ones; a refusal changes nothing
    else, so it is not an error.
    """
    if not session.has("xforward"):
        return
    offered = set(session.smtp.esmtp_features.get("xforward", "").upper().split())
    c = envelope.client

    def known(value: Optional[str]) -> bool:
        return bool(value) and value.lower() != "unknown"

    first = [("NAME", c.get("log_client_name")), ("ADDR", c.get("log_client_address")),
             ("PORT", c.get("log_client_port"))]
    second = [("PROTO", c.get("log_protocol_name")), ("HELO", c.get("log_helo_name")),
              ("IDENT", envelope.queue_id)]
    if c.get("rewrite_context"):
        second.append(("SOURCE", "LOCAL" if c["rewrite_context"] == "local" else "REMOTE"))
    for group in (first, second):
        words = ["%s=%s" % (name, _xtext(value, "")) for name, value in group
                 if name in offered and (known(value) if name != "HELO" else bool(value))]
        if words:
            code, msg = session.command("XFORWARD", "XFORWARD " + " ".join(words))
            if code != 250:
                log.debug("%s: the listener %s refused XFORWARD (%d %s); going on without it",
                          envelope.queue_id, session.where, code, msg)
                return


def reinject(path: str, listener: Tuple[str, int], helo: str = DEFAULT_HELO, timeout: float = 60) -> str:
    """Submit the message in queue file ``path`` to a re-injection listener; return the new queue id.

    ``listener`` is the (host, port) of the sender's loopback smtpd. The
    copy carries the envelope sender, every recipient still pending (those
    Postfix already delivered are left out), RET/ENVID, NOTIFY/ORCPT per
    recipient, BODY=8BITMIME and SMTPUTF8 as the queue file has them
    (xtext-encoded as RFC 3461 and RFC 6533 require). It succeeds only when
    every recipient was accepted and the message got its final 250, whose
    "queued as ID" names the copy; any other outcome raises ReinjectError
    with one sentence naming the step and the listener's answer, after RSET
    and QUIT so that nothing half-given is queued. The queue file is only
    read. A listener that lacks an extension the message needs (DSN,
    8BITMIME, SMTPUTF8) is refused rather than have the copy lose it.
    """
    queue_id = os.path.basename(path)
    try:
        envelope = read_envelope(path)
    except (QueueFileError, OSError) as exc:
        why = str(exc) if isinstance(exc, QueueFileError) else "cannot read %s: %s" % (path, exc.strerror or exc)
        raise ReinjectError("%s was not re-injected: %s" % (queue_id, why), step="queue file")
    queue_id = envelope.queue_id
    if not envelope.recipients:
        raise ReinjectError("%s was not re-injected: its queue file lists no recipient still to deliver"
                            % queue_id, step="queue file")
    session = _Session(listener, helo, timeout, queue_id)
    try:
        session.connect()
    except ReinjectError:
        session.close()
        raise
    try:
        new_id = _transaction(session, envelope, path)
    except ReinjectError:
        if session.in_data:
            session.close()  # RSET would be taken as message text; no final dot means nothing queued
        else:
            session.abandon()
        raise
    except BaseException:
        session.close()  # closing before the final dot makes smtpd discard what it got
        raise
    session.quit()
    return new_id


def _transaction(session: _Session, envelope: PostfixEnvelope, path: str) -> str:
    utf8 = envelope.needs_smtputf8()
    # ORCPT alone does not count: smtpd stores one for every recipient, asked for or not.
    dsn_needed = bool(envelope.envid or envelope.ret or any(r.notify for r in envelope.recipients))
    for needed, extension, why in ((dsn_needed, "dsn", "DSN, which this message's delivery notices need"),
                                   (envelope.eight_bit, "8bitmime", "8BITMIME, which this 8-bit message needs"),
                                   (utf8, "smtputf8", "SMTPUTF8, which this message needs")):
        if needed and not session.has(extension):
            raise session.fail("EHLO", "does not offer %s (check the listener's smtpd_discard_ehlo_keywords "
                                       "and smtputf8_enable)" % why)
    _xforward(session, envelope)

    params = []
    if envelope.eight_bit:
        params.append("BODY=8BITMIME")
    elif envelope.encoding == "7bit":
        params.append("BODY=7BIT")
    if utf8:
        params.append("SMTPUTF8")
    if envelope.ret_param():
        params.append("RET=" + envelope.ret_param())
    if envelope.envid:
        params.append("ENVID=" + _xtext(envelope.envid))
    line = " ".join(["MAIL FROM:<%s>" % _quote_821(envelope.sender)] + params)
    code, msg = session.command("MAIL FROM", line)
    if code != 250:
        raise session.fail("MAIL FROM", "refused the sender <%s>: %d %s" % (envelope.sender, code, msg), code)

    for rcpt in envelope.recipients:
        address = envelope.redirect or rcpt.address
        words = ["RCPT TO:<%s>" % _quote_821(address)]
        notify = rcpt.notify_param()
        if notify:
            words.append("NOTIFY=" + notify)
        orcpt = _orcpt_param(rcpt, utf8) if session.has("dsn") else None
        if orcpt:
            words.append("ORCPT=" + orcpt)
        code, msg = session.command("RCPT TO", " ".join(words))
        if code not in (250, 251):
            raise session.fail("RCPT TO", "refused the recipient <%s>: %d %s" % (address, code, msg), code)

    code, msg = session.send_data(_file_lines(path))
    if code != 250:
        raise session.fail("end of data", "refused the message: %d %s" % (code, msg), code)
    match = _QUEUED_AS.search(msg)
    if not match:
        err = session.fail("end of data", "accepted the message but named no queue id (%d %s); it may have "
                                          "queued a copy, so the original is kept (at worst a duplicate)"
                           % (code, msg), code)
        err.maybe_accepted = True
        raise err
    return match.group(1)
