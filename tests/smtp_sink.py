"""An SMTP sink that stands in for the remote relay in end-to-end tests.

The private Postfix instance (``tests/postfix_instance.py``) relays to
``[127.0.0.1]:<port>`` of an :class:`SmtpSink`, which accepts everything and
records what arrived, in arrival order, so that a test can check which mail
left the queue, in what order and with which envelope and DSN parameters.

It offers SMTPUTF8 (Postfix bounces mail with 8-bit headers to a server that
does not: "5.6.7 SMTPUTF8 is required") and DSN (so that Postfix passes
``RET``/``ENVID``/``NOTIFY``/``ORCPT`` on and a test can see them).
aiosmtpd itself implements no DSN parameters and refuses any it does not
know, so the server class below takes them out of the command line, keeps
them as written, and hands the rest to aiosmtpd.
"""

from __future__ import annotations

import asyncio

import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

_MAIL_DSN_PARAMS = ("RET", "ENVID")
_RCPT_DSN_PARAMS = ("NOTIFY", "ORCPT")


@dataclass
class SinkMessage:
    """One message the sink accepted.

    ``mail_options`` are the MAIL FROM parameters as the client wrote them
    (``["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=..."]``);
    ``rcpt_options`` maps each accepted recipient to its RCPT TO parameters
    (``["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@b"]``). ``data`` is the
    message as received (dot-unstuffed, CRLF line ends as sent).
    """

    seq: int
    mail_from: str
    rcpt_tos: List[str]
    data: bytes
    mail_options: List[str] = field(default_factory=list)
    rcpt_options: Dict[str, List[str]] = field(default_factory=dict)
    received_at: float = 0.0

    def header(self, name: str) -> Optional[bytes]:
        """The first header field ``name`` (raw value, unfolded), or None."""
        head = self.data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        want = name.lower().encode() + b":"
        lines = head.split(b"\n")
        for i, line in enumerate(lines):
            if line.lower().startswith(want):
                value = line[len(want):]
                for cont in lines[i + 1:]:
                    if cont[:1] not in (b" ", b"\t"):
                        break
                    value += cont
                return value.strip()
        return None


def _split_params(arg: str, known: Tuple[str, ...]) -> Tuple[str, List[str], List[str]]:
    """Split a MAIL/RCPT argument into (arg without ``known`` params, those, all params).

    Parameters follow the closing ``>`` of the address; an argument without
    one is returned unchanged (aiosmtpd then reports the syntax error).
    """
    end = arg.rfind(">")
    if end < 0:
        return arg, [], []
    params = arg[end + 1:].split()
    taken = [p for p in params if p.split("=", 1)[0].upper() in known]
    kept = [p for p in params if p not in taken]
    return " ".join([arg[:end + 1]] + kept), taken, params


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP server that also accepts (and records) DSN parameters."""

    async def smtp_MAIL(self, arg: Optional[str]) -> None:
        if arg is not None:
            arg, _taken, params = _split_params(arg, _MAIL_DSN_PARAMS)
            self._qr_mail_params = params
            self._qr_rcpt_params: Dict[str, List[str]] = {}
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: Optional[str]) -> None:
        if arg is not None:
            arg, _taken, params = _split_params(arg, _RCPT_DSN_PARAMS)
            self._qr_pending_rcpt_params = params
        await super().smtp_RCPT(arg)


class _Handler:
    def __init__(self, sink: "SmtpSink"):
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.sink.offer_dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        params = getattr(server, "_qr_pending_rcpt_params", [])
        if address.lower() in self.sink.reject_rcpt:
            return "550 5.1.1 <%s>: recipient refused by the test sink" % address
        if address.lower() in self.sink.defer_rcpt:
            return "450 4.2.0 <%s>: recipient deferred by the test sink" % address
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        rcpts = getattr(server, "_qr_rcpt_params", None)
        if rcpts is not None:
            rcpts[address] = list(params)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)  # a slow relay: the message stays active meanwhile
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        self.sink._record(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(data),
            mail_options=list(getattr(server, "_qr_mail_params", [])),
            rcpt_options=dict(getattr(server, "_qr_rcpt_params", {})),
        )
        return "250 2.0.0 Ok: accepted by the test sink"


class _Controller(Controller):
    def factory(self):
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SmtpSink:
    """An SMTP server on 127.0.0.1 that records every accepted message.

    ``reject_rcpt`` / ``defer_rcpt``: sets of addresses (lower case) that
    get a 550 / 450 reply at RCPT TO, to test bounces and retries.
    ``data_delay``: seconds to wait before answering DATA (a slow relay).
    ``offer_dsn``: advertise DSN in the EHLO reply (default True).
    """

    def __init__(self, port: int = 0, offer_dsn: bool = True):
        self.port = port or _free_port()
        self.offer_dsn = offer_dsn
        self.reject_rcpt: Set[str] = set()
        self.defer_rcpt: Set[str] = set()
        self.data_delay = 0.0
        self.messages: List[SinkMessage] = []
        self._cond = threading.Condition()
        self._seq = 0
        self._controller: Optional[_Controller] = None

    def start(self) -> "SmtpSink":
        """Start listening on 127.0.0.1:``port``."""
        if self._controller is None:
            self._controller = _Controller(
                _Handler(self), hostname="127.0.0.1", port=self.port,
                server_hostname="sink.test", enable_SMTPUTF8=True)
            self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def clear(self) -> None:
        """Forget the recorded messages and the refusal lists."""
        with self._cond:
            self.messages.clear()
            self.reject_rcpt = set()
            self.defer_rcpt = set()
            self.data_delay = 0.0

    def _record(self, **kwargs) -> None:
        with self._cond:
            self._seq += 1
            self.messages.append(SinkMessage(seq=self._seq, received_at=time.time(), **kwargs))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> List[SinkMessage]:
        """Wait until at least ``count`` messages arrived; return them all.

        Raises AssertionError naming what did arrive, so that a failing test
        says how far delivery got.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = ["%d: <%s> -> %s" % (m.seq, m.mail_from, m.rcpt_tos)
                           for m in self.messages]
                    raise AssertionError(
                        "SMTP sink on port %d: expected %d message(s) within %.0f s, got %d%s"
                        % (self.port, count, timeout, len(self.messages),
                           (": " + "; ".join(got)) if got else ""))
                self._cond.wait(left)
            return list(self.messages)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_greeting(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Wait until an SMTP server on ``port`` greets (a Postfix listener after a reload, say)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with smtplib.SMTP(host, port, timeout=5) as client:
                client.noop()
                return
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise AssertionError("no SMTP greeting on %s:%d within %.0f s" % (host, port, timeout))
            time.sleep(0.1)
