"""The offline back end: a queue snapshot in ``postqueue -j`` format.

Each line is one JSON object exactly as ``postqueue -j`` prints it
(``queue_name``, ``queue_id``, ``arrival_time``, ``message_size``,
``sender``, ``recipients`` [{``address``, ``delay_reason``}]), optionally
with ``"headers"`` (raw header fields, as ``HeaderLines`` holds them) and
``"filename"``. So ``postqueue -j | qrunner plan --queue-file -`` works, and
an admin can ask "what would the policy do with these messages" anywhere.
Every line is decided, whatever its ``queue_name``.

The policy gets what a live run gives for the same message: a bare
``MAILER-DAEMON`` sender is how ``postqueue -j`` shows the null sender
(Postfix's ``empty_address_recipient``), so it reaches the policy as "".
What a snapshot cannot know it gives as a live run gives the unknown:
headers absent from the line are none, and Filename is "" without a
``filename``.

``qrunner snapshot`` writes such lines (:func:`snapshot_line`) from the live
queue, with every message's headers and filename, so that planning the file
offline gives the policy exactly what the live run gives it; the file holds
users' headers, so it is created 0600 (:func:`write_snapshot_file`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import tempfile
from typing import IO, Any, Dict, Iterable, List

from qrunner.exceptions import CantCreateError, NoInputError
from qrunner.message import NO_HEADERS, InlineHeaders, Message
from qrunner.mta.base import Backend
from qrunner.mta.postfix_queuefile import arrival_microseconds, is_queue_id

log = logging.getLogger("qrunner")

MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z: what time.localtime can show
MAX_SIZE = 2 ** 53  # what a Lua 5.1 number (a double) holds exactly
FORMAT_HINT = "each line must be one JSON object as 'postqueue -j' prints it"
NULL_SENDER_SHOWN = "MAILER-DAEMON"  # postqueue -j's name for the null sender (empty_address_recipient's default)


# A queue id is printed in tables and log lines and compared with the live queue's: one with a newline or a
# control character could forge lines, one like "-d" or "../x" could pass for an option or a path.
SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _encodable(value: Any) -> bool:
    """Every string in ``value`` is text or bytes escaped as snapshot writes them (surrogateescape).

    Walked with a list, not by recursion: a value nested as deep as JSON
    allows must be judged, not end the command with a RecursionError.
    """
    todo = [value]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return False
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, dict):
            todo.extend(value.values())
    return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(record: Any) -> str:
    """What is wrong with one decoded line, or "" when it is usable."""
    if not isinstance(record, dict):
        return "not a JSON object"
    checks = (
        ("queue_id", lambda v: isinstance(v, str) and SNAPSHOT_ID.fullmatch(v) is not None,
         "letters, digits, '.', '_' and '-', starting with a letter or digit, as Postfix and Exim write queue ids"),
        ("arrival_time", lambda v: _number(v) and 0 <= v <= MAX_EPOCH, "a number of epoch seconds (0 to year 9999)"),
        ("message_size", lambda v: _number(v) and 0 <= v <= MAX_SIZE, "a number of bytes (0 to 2**53)"),
        ("sender", lambda v: isinstance(v, str), "a string"),
        ("recipients", lambda v: isinstance(v, list) and all(
            isinstance(r, dict) and isinstance(r.get("address"), str) for r in v), "a list of {\"address\": ...} objects"),
    )
    for key, ok, what in checks:
        if key not in record:
            return f"'{key}' is missing"
        if not ok(record[key]):
            return f"'{key}' must be {what}"
    for key in ("queue_id", "sender", "recipients", "headers", "filename", "queue_name"):
        if key in record and not _encodable(record[key]):
            return (f"'{key}' holds a \\uXXXX escape of a lone surrogate, which is neither a character nor (as "
                    "\\udc80-\\udcff, which snapshot writes for bytes that are not UTF-8) a byte")
    optional = (
        ("headers", lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v), "a list of strings"),
        ("filename", lambda v: isinstance(v, str), "a string"),
        ("queue_name", lambda v: isinstance(v, str), "a string"),
    )
    for key, ok, what in optional:
        if key in record and not ok(record[key]):
            return f"'{key}' must be {what}"
    return ""


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def arrival_time(seconds: float, queue_id: str) -> float:
    """Arrival, refined by the microseconds a Postfix queue id carries (as a live run does)."""
    if is_queue_id(queue_id) and float(seconds).is_integer():
        return int(seconds) + arrival_microseconds(queue_id) / 1e6
    return float(seconds)


def message_from_record(record: Dict[str, Any]) -> Message:
    """One ``postqueue -j`` object (already checked) as a :class:`Message`."""
    headers = record.get("headers")
    recipients = record["recipients"]
    return Message(
        queue_id=record["queue_id"],
        arrival=arrival_time(record["arrival_time"], record["queue_id"]),
        size=int(record["message_size"]),
        sender="" if record["sender"] == NULL_SENDER_SHOWN else record["sender"],
        recipients=tuple(r["address"] for r in recipients),
        queue_name=record.get("queue_name", ""),
        filename=record.get("filename", ""),
        headers=InlineHeaders(_encode(h) for h in headers) if headers is not None else NO_HEADERS,
        delay_reasons=tuple(r["delay_reason"] for r in recipients if isinstance(r.get("delay_reason"), str)),
    )


def snapshot_record(message: Message) -> Dict[str, Any]:
    """One message as a snapshot line's object, read back by :func:`message_from_record` as the same message.

    ``postqueue -j``'s keys, plus ``headers`` (as ``HeaderLines`` holds
    them; bytes that are not UTF-8 survive as JSON's ``\\udcXX`` escapes)
    and ``filename``. The arrival keeps its fraction, so messages of one
    second keep their order; the null sender is written as "".
    """
    source = message.header_source()
    lines = source.read()
    if source.problem:
        logging.getLogger("qrunner").warning("%s: %s; its snapshot line has the headers that could be read",
                                             message.queue_id, source.problem)
    reasons = message.delay_reasons if len(message.delay_reasons) == len(message.recipients) else None
    recipients = [dict(address=address, **({"delay_reason": reasons[i]} if reasons else {}))
                  for i, address in enumerate(message.recipients)]
    arrival = message.arrival
    return {
        "queue_name": message.queue_name,
        "queue_id": message.queue_id,
        "arrival_time": int(arrival) if float(arrival).is_integer() else arrival,
        "message_size": message.size,
        "sender": message.sender,
        "recipients": recipients,
        "headers": [line.decode("utf-8", "surrogateescape") for line in lines],
        "filename": message.queue_file(),
    }


def snapshot_line(message: Message) -> str:
    """:func:`snapshot_record` as one line of JSON (ASCII, so the file reads the same in any locale)."""
    return json.dumps(snapshot_record(message)) + "\n"


def write_snapshot(messages: Iterable[Message], stream: IO[str]) -> int:
    """Every message as a snapshot line on ``stream``; how many were written."""
    count = 0
    for message in messages:
        stream.write(snapshot_line(message))
        count += 1
    return count


def write_snapshot_file(path: str, messages: Iterable[Message]) -> int:
    """Write a snapshot to ``path``: mode 0600 from the moment it exists, whole or not at all.

    The lines go to a new file beside ``path`` (``mkstemp`` creates it
    0600, whatever the umask), which then replaces ``path``: a reader never
    sees half a snapshot, and an older file with a looser mode is replaced,
    not rewritten in place. A ``path`` that is there but not a regular file
    (a device, a directory) is refused rather than replaced.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot write the snapshot ({exc.strerror}); name another file with -o.")
    if mode is not None and not stat.S_ISREG(mode):
        raise CantCreateError(f"{path}: is not a regular file; name a file with -o, or leave -o out to write "
                              "the snapshot to standard output.")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".qrunner-snapshot-", dir=directory)
    except OSError as exc:
        raise CantCreateError(f"{path}: cannot create the snapshot file ({exc.strerror}); name a file in a "
                              "directory qrunner may write.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as stream:
            count = write_snapshot(messages, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CantCreateError(f"{path}: cannot write the snapshot ({exc.strerror}); nothing was written.")
        raise
    return count


MAX_NAMED = 100  # bad lines named one by one; past them, one sentence says how many more (a wrong file given)


def parse_snapshot(stream: IO[bytes], name: str, bad: List[str]) -> List[Message]:
    """Every good line of a snapshot as a message; each bad line's sentence (file and line number) goes to ``bad``.

    A bad line is passed over, so the other lines are still planned, as a
    run goes on for the other messages; the command then ends with exit 65.
    """
    messages = []
    for number, raw in enumerate(stream, 1):
        line = _read_line(raw)
        if isinstance(line, Message):
            messages.append(line)
        elif line:
            bad.append(f"{name}:{number}: {line}; {FORMAT_HINT}.")
    return messages


def _read_line(raw: bytes):
    """One line's message, or what is wrong with it ("" for a blank line); the line's own text is never quoted."""
    text = raw.decode("utf-8", "surrogateescape").strip()
    if not text:
        return ""
    try:
        record = json.loads(text)
        problem = _problem(record)
    except RecursionError:
        return "JSON nested too deeply to be a snapshot line"
    except ValueError as exc:
        why = getattr(exc, "msg", None) or "a number with more digits than any field can hold"
        return f"not valid JSON ({why})"
    return problem or message_from_record(record)


class SnapshotBackend(Backend):
    """Reads a snapshot file, or standard input for ``-``; touches no MTA, so it only lists."""

    def __init__(self, path: str):
        self.path = path
        self.bad_lines: List[str] = []  # one sentence per bad line of the last listing (the command exits 65)

    def list(self) -> List[Message]:
        """The good lines' messages; each bad line, kept in ``bad_lines``, is said in the log once the file is read."""
        self.bad_lines = []
        try:
            return self._read()
        finally:
            for sentence in self.bad_lines[:MAX_NAMED]:
                log.error("%s", sentence)
            if len(self.bad_lines) > MAX_NAMED:
                log.error("%s: %d more bad lines were not planned either; %s.", self._name,
                          len(self.bad_lines) - MAX_NAMED, FORMAT_HINT)

    @property
    def _name(self) -> str:
        return "<stdin>" if self.path == "-" else self.path

    def _read(self) -> List[Message]:
        if self.path == "-":
            return parse_snapshot(sys.stdin.buffer, self._name, self.bad_lines)
        try:
            with open(self.path, "rb") as stream:
                return parse_snapshot(stream, self.path, self.bad_lines)
        except FileNotFoundError:
            raise NoInputError(f"{self.path}: queue snapshot not found; check the --queue-file path.")
        except IsADirectoryError:
            raise NoInputError(f"{self.path}: is a directory, not a queue snapshot; name a file made by 'postqueue -j'.")
        except PermissionError:
            raise NoInputError(f"{self.path}: cannot read the queue snapshot (permission denied).")
