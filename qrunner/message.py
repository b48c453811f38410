"""The MTA-neutral message record that flows through the pipeline.

A back end lists the queue as :class:`Message` records; the policy sees them
as ``CheckFile`` arguments; the plan and the executor refer to them by queue
id. Headers are not part of the listing: each record carries a
:class:`HeaderSource` that reads them only when a script first touches
``HeaderData`` or ``HeaderLines``, so a policy that never looks at headers
never pays for reading queue files.

Header sources are small picklable objects because the policy runs in a
separate worker process (see :mod:`qrunner.policy`): the worker, not the
parent, reads the headers when asked.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple


class HeaderSource:
    """Where a message's header fields can be read from, on demand.

    ``read()`` returns the raw header fields in message order, one entry per
    field, continuation lines joined by ``b"\\n"``, without the final line
    break: exactly what ``HeaderLines`` holds. It never raises for malformed
    content; an unreadable source returns what it could read (or nothing) and
    says why in :attr:`problem`.
    """

    problem: Optional[str] = None

    def read(self) -> List[bytes]:  # pragma: no cover - interface
        raise NotImplementedError


class NoHeaders(HeaderSource):
    """A message whose headers are not known (a snapshot without them)."""

    def read(self) -> List[bytes]:
        return []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoHeaders)

    def __hash__(self) -> int:
        return 0


class InlineHeaders(HeaderSource):
    """Header fields already in memory (a snapshot line's ``headers``)."""

    __slots__ = ("lines",)

    def __init__(self, lines: Iterable[bytes]):
        self.lines = tuple(lines)

    def read(self) -> List[bytes]:
        return list(self.lines)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InlineHeaders) and other.lines == self.lines

    def __hash__(self) -> int:
        return hash(self.lines)


NO_HEADERS = NoHeaders()


class MtaFileHeaders(HeaderSource):
    """Headers read from the MTA's own file for a message, the MTA's command as a fallback.

    Holds only the file's path, the message id, the fallback command and a
    cap, so it is cheap to create for every listed message and to pickle to
    the policy worker. ``read()`` reads the file; if that fails (the message
    moved since the listing, or the file is not readable by this user) and
    ``fallback_argv`` is given, it runs the MTA's own command that prints
    the same headers (``postcat -hq``, ``exim -Mvh``). When nothing could be
    read it returns ``[]`` and says why in ``.problem``; it never raises.

    A back end subclasses it with: ``kind`` (the file, in words),
    ``id_kind``, :meth:`read_file`, :meth:`is_valid_id`,
    :meth:`fallback_args` and :meth:`parse_fallback`.
    """

    __slots__ = ("path", "queue_id", "fallback_argv", "max_bytes", "problem")
    kind = "queue file"
    id_kind = "a message id"

    def __init__(self, path: str, queue_id: str, fallback_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = 262144):
        self.path = path
        self.queue_id = queue_id
        # One shared tuple for a whole listing: pickling it to the worker then costs one copy, not one per message.
        self.fallback_argv = (fallback_argv if isinstance(fallback_argv, tuple) else tuple(fallback_argv)) \
            if fallback_argv else None
        self.max_bytes = max_bytes
        self.problem: Optional[str] = None

    # what a back end provides

    def read_file(self) -> Tuple[List[bytes], Optional[str]]:  # pragma: no cover - interface
        """(fields, a note on what could not be read); OSError when unreadable, ValueError when not such a file."""
        raise NotImplementedError

    def is_valid_id(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def fallback_args(self) -> List[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def parse_fallback(self, output: bytes) -> Tuple[List[bytes], Optional[str]]:  # pragma: no cover
        raise NotImplementedError

    # the shared part

    def __getstate__(self):
        return (self.path, self.queue_id, self.fallback_argv, self.max_bytes, self.problem)

    def __setstate__(self, state) -> None:
        self.path, self.queue_id, self.fallback_argv, self.max_bytes, self.problem = state

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self)
                and (other.path, other.queue_id, other.fallback_argv) == (self.path, self.queue_id, self.fallback_argv))

    def __hash__(self) -> int:
        return hash((self.path, self.queue_id))

    def __repr__(self) -> str:
        return "%s(%r, %r)" % (type(self).__name__, self.path, self.queue_id)

    def read(self) -> List[bytes]:
        self.problem = None
        try:
            return self._read()
        except Exception as exc:  # the contract: never raise into the policy
            self.problem = "headers of %s could not be read: %s" % (self.queue_id, exc)
            return []

    def _not_read(self, why: str) -> List[bytes]:
        self.problem = "headers of %s not read: %s" % (self.queue_id, why)
        return []

    def _read(self) -> List[bytes]:
        file_error = "no %s path known" % self.kind
        if self.path:
            try:
                fields, note = self.read_file()
            except OSError as exc:
                file_error = "cannot read %s: %s" % (self.path, exc.strerror or exc)
            except ValueError as exc:
                return self._not_read("%s: %s" % (self.path, exc))
            else:
                if note:
                    self.problem = "%s (%s): %s" % (self.queue_id, self.path, note)
                return fields
        if not self.fallback_argv:
            return self._not_read(file_error)
        if not self.is_valid_id():
            return self._not_read("%s, and %r is not %s" % (file_error, self.queue_id, self.id_kind))
        argv = list(self.fallback_argv) + self.fallback_args()
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return self._not_read("%s; running %s failed: %s" % (file_error, argv[0], exc))
        if result.returncode != 0:
            why = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
            return self._not_read("%s; %s exited with %d%s" % (file_error, " ".join(argv), result.returncode,
                                                                 (": " + why[-1]) if why else ""))
        try:
            fields, note = self.parse_fallback(result.stdout)
        except ValueError as exc:
            return self._not_read("%s; %s printed no headers: %s" % (file_error, " ".join(argv), exc))
        if note:
            self.problem = "%s (%s): %s" % (self.queue_id, argv[0], note)
        return fields


@dataclass(frozen=True)
class Message:
    """One queued message as every stage of the pipeline sees it.

    ``size`` is the message's size as the MTA reports it (headers and body,
    without the MTA's envelope records); ``arrival`` is the epoch time it
    entered the queue; ``recipients`` are the ones still to be delivered.
    ``queue_name`` is the MTA's name for where the message sits (Postfix:
    ``deferred``, ``hold``, ...); ``filename`` is its file on disk, or "".
    ``delay_reasons`` are the MTA's reasons for the pending recipients,
    where it gives them. ``held`` says the MTA holds it (Postfix's hold
    queue, Exim's frozen state), whoever held it.
    """

    queue_id: str
    arrival: float
    size: int
    sender: str
    recipients: Tuple[str, ...]
    queue_name: str = ""
    filename: str = ""
    headers: HeaderSource = field(default=NO_HEADERS, compare=False)
    delay_reasons: Tuple[str, ...] = ()
    held: bool = False

    def creation_time(self) -> str:
        """Arrival as ``YYYYMMDDHHMMSS`` in the local time zone (TZ respected)."""
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.arrival))


def arrival_order(messages: Iterable[Message]) -> List[Message]:
    """Messages oldest first (ties broken by queue id), the order policies see."""
    return sorted(messages, key=lambda m: (m.arrival, m.queue_id))


def _split_field(field_bytes: bytes) -> Optional[Tuple[bytes, bytes]]:
    name, colon, rest = field_bytes.partition(b":")
    name = name.rstrip(b" \t")
    if not colon or not name or b"\n" in name or b" " in name or b"\t" in name:
        return None
    value = rest.replace(b"\r\n", b"\n").replace(b"\n", b"")
    return name, value.strip(b" \t\r")


def header_data(lines: Sequence[bytes]) -> List[Tuple[bytes, bytes]]:
    """``HeaderData`` as (name as written, unfolded value) pairs.

    The first occurrence of a name wins, names compared without case. Values
    are unfolded (line breaks removed, the whitespace after them kept), with
    the whitespace after the colon and trailing whitespace stripped. A line
    that is not a ``name: value`` field stays in ``HeaderLines`` but has no
    entry here.
    """
    seen = set()
    pairs = []
    for raw in lines:
        split = _split_field(raw)
        if split is None:
            continue
        key = split[0].lower()
        if key in seen:
            continue
        seen.add(key)
        pairs.append(split)
    return pairs
