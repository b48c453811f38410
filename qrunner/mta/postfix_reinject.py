"""Hand a queued Postfix message to a sender's re-injection listener (DESIGN.md section 5b).

A message that the policy gives to a non-default sender must leave through
that sender's route. Postfix cannot change the route of a queued message in
place, so qrunner submits a copy over SMTP to a loopback ``smtpd`` listener
(contrib/postfix/master.cf.qrunner) whose ``-o content_filter=TRANSPORT:NEXTHOP``
stamps the route into the copy; the caller deletes the original only after
this module reports that the listener accepted the copy.

This module is the SMTP client: what the copy carries (envelope sender,
pending recipients, DSN, BODY, SMTPUTF8) and its content come from
:mod:`qrunner.mta.postfix_envelope`, which reads the original's queue file
the way Postfix's queue manager does; here they are encoded (xtext, RFC 3461
and RFC 6533) and sent as Postfix's own SMTP client would send them. Nothing
here writes to the queue file.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import socket
from typing import Iterable, Iterator, List, Optional, Tuple, Union

from qrunner.mta.postfix_envelope import (PostfixEnvelope, PostfixRecipient, QueueFileError, iter_content,
                                          read_envelope)

__all__ = [
    "ReinjectError",
    "reinject",
    "DEFAULT_HELO",
]

log = logging.getLogger("qrunner.postfix")

DEFAULT_HELO = "qrunner.localhost"

_QUEUED_AS = re.compile(r"\bqueued as ([0-9A-Za-z]+)")
_CHUNK = 65536


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
        kind = "utf-8" if utf8 and not rcpt.original.isascii() else "rfc822"
        orcpt = "%s;%s" % (kind, rcpt.original)
    kind, sep, address = orcpt.partition(";")
    if not sep or not kind or not kind.isascii():
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

    With it, Postfix logs ``orig_queue_id=`` and ``orig_client=`` for the
    copy, the copy's Received line names the original client, and the copy's
    queue file keeps the original's queue id (``A log_ident=``): IDENT is
    the id of the queue file being copied (not an id an earlier filter
    forwarded), so that a copy the listener holds names its original even
    when a crash kept qrunner from recording it. Postfix's smtp client
    sends the same attributes (smtp_proto.c) and skips "unknown" ones; a
    refusal changes nothing else, so it is not an error.
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
              ("IDENT", os.path.basename(envelope.path))]
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
