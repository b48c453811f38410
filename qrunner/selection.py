"""Selectors: which messages ``status``, ``release`` and ``flush`` act on, as an admin names them.

What admins do today with ``exiqgrep -i -f ... | xargs exim -M`` or
pymailq's selectors, in one place and before anything acts: by envelope
sender, recipient, recipient domain, hold reason, age and the priority the
policy gave. Pure: the runner hands in what it listed and the records it
has, and gets back queue ids.

The rules (qrunner(8), SELECTING MESSAGES, says them to the admin):

- addresses and domains compare without case, and may be shell-style
  patterns (``*@example.com``, ``*.example.org``); ``<>`` is the empty
  envelope sender of a bounce;
- a selector given more than once matches any of its values; different
  selectors must all match;
- ``--reason`` and ``--priority`` look at qrunner's record of a hold, so
  they select only qrunner's holds (a message qrunner did not hold has no
  reason and no priority of qrunner's); a hold recorded before qrunner kept
  priorities has none and matches no ``--priority``;
- ``--limit`` keeps the oldest of the selection (by arrival): the ones
  closest to the MTA's queue lifetime go first.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, List, Optional, Pattern, Tuple

from qrunner.exceptions import NothingSelected, UsageError
from qrunner.message import Message
from qrunner.state import Hold

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Age(float):
    """Seconds, remembering how the admin wrote them (``2h``), to say them back."""

    text = ""

    def __str__(self) -> str:
        return self.text or f"{float(self):g}s"


def parse_age(text: str) -> Age:
    """``90``, ``90s``, ``30m``, ``2h``, ``3d``, ``1w``: seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise UsageError(f"--older-than {text!r} is not an age; write it as a number with s, m, h, d or w "
                         "(for example 2h or 3d).")
    age = Age(float(match.group(1)) * AGE_UNITS[match.group(2) or "s"])
    age.text = text.strip()
    return age


RATE_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_rate(text: str) -> float:
    """``10``, ``10/s``, ``600/m``, ``0.5/s``: messages per second."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([smh]))?\s*", text)
    rate = float(match.group(1)) / RATE_UNITS[match.group(2) or "s"] if match else 0.0
    if rate <= 0:
        raise UsageError(f"--rate {text!r} is not a rate; write messages per second, minute or hour: 10/s, 600/m.")
    return rate


def parse_priority(text: str) -> Tuple[int, int]:
    """``90`` or ``50-100``: an inclusive range within 1-100."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if not match or not 1 <= low <= high <= 100:
        raise UsageError(f"--priority {text!r} is not a priority or range within 1-100; write 90 or 50-100.")
    return low, high


def parse_regex(text: str) -> Pattern:
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        raise UsageError(f"--reason-regex {text!r} is not a regular expression ({exc}); Python's re syntax, "
                         "matched anywhere in the reason, without case.") from None


def _address_matches(patterns: Tuple[str, ...], address: str) -> bool:
    address = address.lower() or "<>"
    return any(fnmatchcase(address, p.lower()) for p in patterns)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True)
class Selector:
    """The admin's selectors; an empty one selects everything."""

    senders: Tuple[str, ...] = ()
    recipients: Tuple[str, ...] = ()
    recipient_domains: Tuple[str, ...] = ()
    reason: Optional[str] = None
    reason_regex: Optional[Pattern] = None
    older_than: Optional[float] = None
    priority: Optional[Tuple[int, int]] = None

    @property
    def empty(self) -> bool:
        return not self.words()

    @property
    def holds_only(self) -> bool:
        """Selects by what only qrunner's record of a hold says."""
        return bool(self.reason or self.reason_regex or self.priority)

    def words(self) -> List[str]:
        """The selectors as the admin typed them, for "no message matches ..."."""
        words: List[str] = []
        for option, values in (("--sender", self.senders), ("--recipient", self.recipients),
                               ("--recipient-domain", self.recipient_domains)):
            for value in values:
                words += [option, value]
        if self.reason:
            words += ["--reason", self.reason]
        if self.reason_regex is not None:
            words += ["--reason-regex", self.reason_regex.pattern]
        if self.older_than is not None:
            words += ["--older-than", str(self.older_than if isinstance(self.older_than, Age) else
                                          Age(self.older_than))]
        if self.priority is not None:
            low, high = self.priority
            words += ["--priority", str(low) if low == high else f"{low}-{high}"]
        return words

    def describe(self) -> str:
        return shlex.join(self.words())

    def matches(self, message: Message, hold: Optional[Hold], now: float) -> bool:
        """Whether this message (and qrunner's record of its hold, if any) is selected."""
        if self.senders and not _address_matches(self.senders, message.sender):
            return False
        if self.recipients and not any(_address_matches(self.recipients, r) for r in message.recipients):
            return False
        if self.recipient_domains and not any(
                any(fnmatchcase(_domain(r), d.lower()) for d in self.recipient_domains) for r in message.recipients):
            return False
        if self.older_than is not None and now - message.arrival < self.older_than:
            return False
        return self._hold_matches(hold)

    def _hold_matches(self, hold: Optional[Hold]) -> bool:
        if not self.holds_only:
            return True
        if hold is None:
            return False
        if self.reason and self.reason.lower() not in hold.reason.lower():
            return False
        if self.reason_regex is not None and not self.reason_regex.search(hold.reason):
            return False
        if self.priority is not None:
            low, high = self.priority
            return hold.priority is not None and low <= hold.priority <= high
        return True


def select(pool: Iterable[Tuple[Message, Optional[Hold]]], selector: Selector, now: float,
           limit: Optional[int] = None) -> List[Message]:
    """The messages of ``pool`` the selector matches, oldest first, at most ``limit`` of them."""
    chosen = sorted((m for m, hold in pool if selector.matches(m, hold, now)), key=lambda m: (m.arrival, m.queue_id))
    return chosen if limit is None else chosen[:limit]


@dataclass(frozen=True)
class Choice:
    """What an admin command acts on: the named ids (None: all), narrowed by selectors and a limit."""

    ids: Optional[Tuple[str, ...]] = None
    selector: Selector = Selector()
    limit: Optional[int] = None

    @property
    def narrowed(self) -> bool:
        return not self.selector.empty or self.limit is not None

    def pick(self, pool: Iterable[Tuple[Message, Optional[Hold]]], now: float, what: str) -> List[str]:
        """The queue ids chosen from ``pool`` (``what`` names it for the admin); none chosen is an error."""
        pool = [(m, h) for m, h in pool if self.ids is None or m.queue_id in self.ids]
        chosen = [m.queue_id for m in select(pool, self.selector, now, self.limit)]
        if not chosen:
            among = f"{len(pool)} {what} looked at"
            raise NothingSelected(f"no message matches {self.describe()} ({among}); nothing was done.")
        return chosen

    def describe(self) -> str:
        parts = [] if self.ids is None else list(self.ids)
        parts += self.selector.words() + ([] if self.limit is None else ["--limit", str(self.limit)])
        return shlex.join(parts)
