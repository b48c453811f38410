"""The benchmark's messages: the queue DESIGN.md's performance budget was measured over.

Sizes are log-uniform from 1 KB to 200 KB, plus one 1 MB message per
thousand (every message whose number ends in 999); 1 to 5 recipients from a
pool of 1,000 addresses at ``example.net`` (a relay domain, so both MTAs'
gates queue them); a ``Subject: bench message N`` that the header scripts
select on (numbers ending in 7: a tenth of the queue). The same seed gives
the same queue on every run, so runs compare.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, List

SENDER = "bench@qrunner-test.localdomain"
DOMAIN = "example.net"
POOL = 1000  # distinct recipient addresses
BIG = 1_000_000
SMALLEST, LARGEST = 1_000, 200_000

# A body made of 76-character lines that SMTP and Exim's -bS take as they are (no leading dot).
_LINE = "".join(chr(ord("a") + (i * 7) % 26) for i in range(76)) + "\r\n"
_BLOCK = _LINE * (BIG // len(_LINE) + 2)


@dataclass(frozen=True)
class BenchMessage:
    number: int
    recipients: List[str]
    size: int  # the size aimed at, headers included (CRLF line ends)

    @property
    def subject(self) -> str:
        return f"bench message {self.number}"

    def text(self) -> str:
        """Header and body with CRLF line ends, about ``size`` bytes, ending in a line break."""
        head = (f"From: {SENDER}\r\nTo: {', '.join(self.recipients)}\r\nSubject: {self.subject}\r\n"
                f"Message-ID: <bench.{self.number}@qrunner-test.localdomain>\r\n\r\n")
        body = max(len(_LINE), self.size - len(head))
        return head + _BLOCK[:body - body % len(_LINE)]


def messages(count: int, seed: int = 13) -> Iterator[BenchMessage]:
    """``count`` messages, the same ones for the same seed."""
    rng = random.Random(seed)
    low, high = math.log(SMALLEST), math.log(LARGEST)
    for number in range(count):
        size = BIG if number % 1000 == 999 else int(math.exp(rng.uniform(low, high)))
        recipients = [f"r{rng.randrange(POOL)}@{DOMAIN}" for _ in range(rng.randint(1, 5))]
        yield BenchMessage(number, sorted(set(recipients)), size)


def selected_by_header(number: int) -> bool:
    """What the header scripts (and exipick, pymailq) select: a subject whose number ends in 7."""
    return number % 10 == 7


def expected_bytes(count: int) -> int:
    """About how many bytes of mail ``count`` messages are (the disk one MTA's queue needs)."""
    mean = (LARGEST - SMALLEST) / math.log(LARGEST / SMALLEST)
    return int(count * mean + (count // 1000) * BIG)
