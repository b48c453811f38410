"""The MTA-neutral message record that flows through the pipeline.

A back end lists the queue as :class:`Message` records; the policy sees them
as ``CheckFile`` arguments; the plan and the executor refer to them by queue
id. Headers are not part of the listing: each record carries a
:class:`HeaderSource` that reads them only when a script first touches
``HeaderData`` or ``HeaderLines``, so a policy that never looks at headers
never pays for reading queue files.

Header sources are small objects, made per listed message (or, by a
:class:`HeaderReader` the whole listing shares, when first needed). The policy runs
in a separate worker process (see :mod:`qrunner.policy`) as an unprivileged
user that cannot read the MTA's queue, so the parent reads the headers when
the worker asks for them, a batch of messages at a time. The sources that read an MTA's own
files (and run its command when a file is gone) live in
:mod:`qrunner.mta.headers`; this module runs no MTA command.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple, Union

# A frozen dataclass with __slots__ where Python has them (3.10+): a big
# queue holds one of these per message (and a decision per message), and a
# slotted instance is a quarter of the size of one with a __dict__.
frozen_record = dataclass(frozen=True, slots=True) if sys.version_info >= (3, 10) else dataclass(frozen=True)


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

    def prefetch(self) -> Optional[List[bytes]]:
        """The fields as :meth:`read` gives them, but only if that is cheap; None when it is not.

        The policy's parent reads the headers of a few messages ahead of the
        script (a batch per round trip to the worker); those reads must not
        run an MTA command per message, so a source whose file is gone says
        None here and is read with :meth:`read` if the script asks for it.
        """
        return self.read()


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


class HeaderReader:
    """Makes a listed message's :class:`HeaderSource` when it is first needed, from the message itself.

    A back end that can name a message's file from its id puts one reader,
    shared by the whole listing, in each message's ``headers``, instead of
    a source object and a path per message: each is about a hundred
    bytes, together a fifth of what a listed message costs, and most
    policies never read a header. Ask a message for
    :meth:`Message.header_source` and :meth:`Message.queue_file`, never for
    its ``headers`` field.
    """

    __slots__ = ()

    def source(self, message: "Message") -> HeaderSource:  # pragma: no cover - interface
        raise NotImplementedError

    def filename(self, message: "Message") -> str:  # pragma: no cover - interface
        """The message's file, named from its id (a listing leaves ``filename`` empty: 100 bytes a message)."""
        raise NotImplementedError


class QueueState:
    """Where a message stands in its MTA's queue, in words every back end shares.

    The MTA's own name for the place stays in :attr:`Message.queue_name`
    (Postfix's ``deferred``, ``hold``, ...; Exim's queue name); this is what
    the pipeline decides by.
    """

    WAITING = "waiting"    # queued, waiting for a delivery attempt (Postfix deferred; Exim not frozen)
    HELD = "held"          # on hold (Postfix's hold queue, Exim frozen), whoever held it
    ACTIVE = "active"      # being delivered right now (Postfix active; Exim's -D file locked)
    ARRIVING = "arriving"  # not yet with the queue manager (Postfix incoming, maildrop)


@frozen_record
class Message:
    """One queued message as every stage of the pipeline sees it.

    ``size`` is the message's size as the MTA reports it (headers and body,
    without the MTA's envelope records); ``arrival`` is the epoch time it
    entered the queue; ``recipients`` are the ones still to be delivered.
    ``state`` is a :class:`QueueState`; ``queue_name`` is the MTA's own name
    for where the message sits, for the admin's eyes; ``filename`` is its
    file on disk, or "" (ask :meth:`queue_file`: a big listing leaves it
    to its reader). ``delay_reasons`` are the MTA's reasons for the
    pending recipients, where it gives them.
    """

    queue_id: str
    arrival: float
    size: int
    sender: str
    recipients: Tuple[str, ...]
    queue_name: str = ""
    filename: str = ""
    headers: Union[HeaderSource, HeaderReader] = field(default=NO_HEADERS, compare=False)
    delay_reasons: Tuple[str, ...] = ()
    state: str = QueueState.WAITING

    def queue_file(self) -> str:
        """The message's file on disk (``CheckFile``'s first argument), or "": ``filename``, or what its
        listing's reader names from the id."""
        headers = self.headers
        if self.filename or not isinstance(headers, HeaderReader):
            return self.filename
        return headers.filename(self)

    def header_source(self) -> HeaderSource:
        """Where this message's header fields are read from: ``headers``, or what its listing's reader makes."""
        headers = self.headers
        return headers.source(self) if isinstance(headers, HeaderReader) else headers

    @property
    def held(self) -> bool:
        """On hold in the MTA, whoever held it."""
        return self.state == QueueState.HELD

    def creation_time(self) -> str:
        """Arrival as ``YYYYMMDDHHMMSS`` in the local time zone (TZ respected)."""
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.arrival))


def arrival_order(messages: Iterable[Message]) -> List[Message]:
    """Messages oldest first (ties broken by queue id), the order policies see."""
    return sorted(messages, key=lambda m: (m.arrival, m.queue_id))
