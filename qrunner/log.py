"""Logging that a mail admin reads next to the MTA's own.

Lines look like Postfix's: ``qrunner[PID]: QUEUEID: action=hold ...``. One
rule decides where they go:

- The commands that change the queue (``run``, ``flush``, ``release``) always
  write their lines to the system log, facility mail, identifier ``qrunner``:
  to journald's native socket when it exists (a systemd host), else to
  ``/dev/log`` (rsyslog and friends), else nowhere (no system log is not an
  error). That is the audit trail, so ``-q`` and ``-v`` do not thin it: it
  gets every line from info up, debug too with ``-v``.
- stderr gets the lines at the ``-q``/``-v`` level: cron mails it to root,
  and an admin at a terminal reads it. When stderr is the journal already
  (a systemd unit: JOURNAL_STREAM names stderr) and the native socket carries
  the lines, stderr gets none of them, so nothing is logged twice.
- A dry run, ``plan``, ``check`` and ``status`` change nothing and write only
  to stderr.

One warning is not quieted by ``-q`` on stderr either: a line logged with
``extra=NOT_QUIETED`` (a missing gate: mail leaves without the policy, and
cron must tell root on every run).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import logging.handlers
import os
import re
import socket
import struct
import sys
from typing import Optional

LOGGER = "qrunner"
IDENTIFIER = "qrunner"

# What must never reach a log line or a table cell as it is: line breaks and other control characters (a queue id
# with a newline would forge a line), the Unicode line separators, and surrogates (the bytes of text that was not
# UTF-8, kept by surrogateescape, which a strict UTF-8 stdout cannot write at all).
_UNSHOWABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSHOWABLE_OR_TAB = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: "re.Match[str]") -> str:
    c = match.group()
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as surrogateescape kept it: shown as that byte
        return "\\x%02x" % (code - 0xDC00)
    return _NAMED.get(c) or ("\\x%02x" % code if code < 0x100 else "\\u%04x" % code)


def shown(text: str, tabs: bool = True) -> str:
    """``text`` safe to print on one line: control characters, line separators and undecodable bytes as escapes
    (``\\n``, ``\\x1b``, ``\\xff``); tabs kept unless ``tabs`` is false (a table cell)."""
    pattern = _UNSHOWABLE if tabs else _UNSHOWABLE_OR_TAB
    return text if pattern.search(text) is None else pattern.sub(_escape, text)


class OneLineFormatter(logging.Formatter):
    """Each record one line, whatever text its arguments carry (ids, reasons, records from the state database)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        return super().formatMessage(record)


JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_ADDRESS = "/dev/log"
# Set by the test suite (tests/conftest.py), so that its runs stay out of the host's mail log.
TEST_NO_SYSTEM_LOG = "QRUNNER_TEST_NO_SYSTEM_LOG"
MAIL_FACILITY = 2  # LOG_MAIL >> 3, as syslog(3) numbers it

NOT_QUIETED = {"not_quieted": True}  # extra= for a warning that -q must not hide on stderr

_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_lost = False  # whether this process already said that the system log refused a line


def setup_logging(verbosity: int = 0, to_system_log: bool = False) -> logging.Logger:
    """qrunner's log: stderr at ``-q`` (-1, errors only), default (0) or ``-v`` (1); and the system log if asked."""
    global _lost
    _lost = False
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    system = system_log() if to_system_log else None
    if system is not None:
        system.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
        logger.addHandler(system)
    stderr_level = {-1: logging.ERROR, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if not (isinstance(system, JournalHandler) and stderr_is_journal()):
        stderr = logging.StreamHandler(sys.stderr)
        stderr.addFilter(lambda record: record.levelno >= stderr_level or getattr(record, "not_quieted", False))
        stderr.setFormatter(OneLineFormatter(f"{IDENTIFIER}[%(process)d]: %(message)s"))
        logger.addHandler(stderr)
    levels = [stderr_level, logging.WARNING]  # WARNING: a NOT_QUIETED warning must reach the handlers under -q
    if system is not None:
        levels.append(system.level)
    logger.setLevel(min(levels))
    return logger


def report_failure(message: str, level: int = logging.ERROR, on_stderr: bool = True) -> None:
    """The sentence a command ends with: on stderr, and in the system log where its actions are, once.

    Under cron a failed run (69, 77, 78) would otherwise leave its trail
    only in root's mail. Under the systemd unit stderr is the journal, so
    the sentence goes through the native socket instead, with its real
    priority (a line on the unit's stderr would be stored as info).
    ``on_stderr`` False: the system log only (``-q`` and a run that found
    the previous one still running: cron would mail root every 5 minutes).
    """
    logger = logging.getLogger(LOGGER)
    system = [h for h in logger.handlers if isinstance(h, (JournalHandler, SyslogHandler))]
    journal_is_stderr = any(isinstance(h, JournalHandler) for h in system) and stderr_is_journal()
    if on_stderr and not journal_is_stderr:
        print(f"{IDENTIFIER}: {shown(message)}", file=sys.stderr)
    record = logger.makeRecord(LOGGER, level, __file__, 0, message, (), None)
    for handler in system:
        handler.handle(record)


def system_log() -> Optional[logging.Handler]:
    """The system log's handler: journald's native socket, else /dev/log, else None (there is none)."""
    if os.environ.get(TEST_NO_SYSTEM_LOG):
        return None
    if os.path.exists(JOURNAL_SOCKET):
        return JournalHandler(JOURNAL_SOCKET)
    if os.path.exists(SYSLOG_ADDRESS):
        try:
            return SyslogHandler(SYSLOG_ADDRESS)
        except OSError as error:
            _say_lost(SYSLOG_ADDRESS, error)
    return None


def stderr_is_journal() -> bool:
    """True when stderr is systemd's stream to the journal: JOURNAL_STREAM is its device:inode (systemd.exec(5)).

    Set but naming another file, it was inherited by a process whose stderr
    went elsewhere (a pipe to cron, a terminal), and stderr is not the journal.
    """
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


class JournalHandler(logging.Handler):
    """journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram of fields per line.

    journalctl filters on these fields (``-t qrunner``, ``SYSLOG_FACILITY=2``,
    ``-p warning``), and journald forwards the line to rsyslog with this
    facility and priority, into /var/log/mail.log.
    """

    def __init__(self, address: str):
        super().__init__()
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.setFormatter(OneLineFormatter("%(message)s"))

    def entry(self, record: logging.LogRecord) -> bytes:
        fields = [("MESSAGE", self.format(record)), ("PRIORITY", str(_SEVERITY.get(record.levelno, 6))),
                  ("SYSLOG_FACILITY", str(MAIL_FACILITY)), ("SYSLOG_IDENTIFIER", IDENTIFIER),
                  ("SYSLOG_PID", str(record.process))]
        # An action's own fields (executor.py): QUEUE_ID, ARRIVAL, ACTION, QRUNNER_PRIORITY, ...
        fields.extend(getattr(record, "journal", {}).items())
        return b"".join(_field(name, value) for name, value in fields)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = self.entry(record)
            try:
                self.socket.sendto(entry, self.address)
            except OSError as error:
                if error.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_in_memfd(entry)
        except OSError as error:
            _say_lost(self.address, error)
        except Exception:
            self.handleError(record)

    def _send_in_memfd(self, entry: bytes) -> None:
        """An entry too big for one datagram goes as a sealed memfd, the protocol's way for big entries."""
        fd = os.memfd_create("qrunner-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.socket.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0,
                                self.address)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.socket.close()
        super().close()


def _field(name: str, value: str) -> bytes:
    """One field: NAME=value, or, for a value with a line break, NAME, its length (64-bit LE) and the bytes."""
    data = value.encode("utf-8", "backslashreplace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


class SyslogHandler(logging.handlers.SysLogHandler):
    """/dev/log in the RFC 3164 style syslog(3) writes: ``<22>qrunner[PID]: ...`` (facility mail)."""

    def __init__(self, address: str):
        super().__init__(address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        self.setFormatter(OneLineFormatter(f"{IDENTIFIER}[%(process)d]: %(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            _say_lost(self.address, error)
        else:
            super().handleError(record)


def _say_lost(address: str, error: Optional[BaseException]) -> None:
    """A system log that refuses lines costs the audit trail: say so once on stderr (cron mails it), no traceback."""
    global _lost
    if _lost:
        return
    _lost = True
    reason = getattr(error, "strerror", None) or str(error)
    print(f"qrunner: warning: the system log {address} did not take qrunner's lines ({reason}); "
          "this run's actions are missing from the mail log.", file=sys.stderr)
