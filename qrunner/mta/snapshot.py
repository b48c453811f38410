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
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any, Dict, List

from qrunner.exceptions import DataError, NoInputError
from qrunner.message import NO_HEADERS, InlineHeaders, Message
from qrunner.mta.base import Backend
from qrunner.mta.postfix_queuefile import arrival_microseconds, is_queue_id

MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z: what time.localtime can show
MAX_SIZE = 2 ** 53  # what a Lua 5.1 number (a double) holds exactly
FORMAT_HINT = "each line must be one JSON object as 'postqueue -j' prints it"
NULL_SENDER_SHOWN = "MAILER-DAEMON"  # postqueue -j's name for the null sender (empty_address_recipient's default)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(record: Any) -> str:
    """What is wrong with one decoded line, or "" when it is usable."""
    if not isinstance(record, dict):
        return "not a JSON object"
    checks = (
        ("queue_id", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
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


def parse_snapshot(stream: IO[bytes], name: str) -> List[Message]:
    """Every message of a snapshot; a bad line is an error naming its number."""
    messages = []
    for number, raw in enumerate(stream, 1):
        text = raw.decode("utf-8", "surrogateescape").strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{name}:{number}: not valid JSON ({exc.msg}); {FORMAT_HINT}.")
        problem = _problem(record)
        if problem:
            raise DataError(f"{name}:{number}: {problem}; {FORMAT_HINT}.")
        messages.append(message_from_record(record))
    return messages


class SnapshotBackend(Backend):
    """Reads a snapshot file, or standard input for ``-``; touches no MTA, so it only lists."""

    def __init__(self, path: str):
        self.path = path

    def list(self) -> List[Message]:
        if self.path == "-":
            return parse_snapshot(sys.stdin.buffer, "<stdin>")
        try:
            with open(self.path, "rb") as stream:
                return parse_snapshot(stream, self.path)
        except FileNotFoundError:
            raise NoInputError(f"{self.path}: queue snapshot not found; check the --queue-file path.")
        except IsADirectoryError:
            raise NoInputError(f"{self.path}: is a directory, not a queue snapshot; name a file made by 'postqueue -j'.")
        except PermissionError:
            raise NoInputError(f"{self.path}: cannot read the queue snapshot (permission denied).")
