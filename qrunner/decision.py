"""What the policy decided for a message, and how qrunner's records name a message.

Neutral ground between the stages: the policy makes :class:`Decision`
values, the plan turns them into actions, the records and the executor name
messages by :class:`MessageKey`. Nothing here starts Lua or runs an MTA
command, so the pure plan can import it without importing either.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

from qrunner.config import Sender
from qrunner.message import Message, frozen_record


class MessageKey(NamedTuple):
    """A message as qrunner's records know it: queue id and arrival second.

    The id alone is not enough: Postfix reuses short queue ids, and a record
    must never be matched to a later message that got the same id.
    """

    queue_id: str
    arrival: int

    @classmethod
    def of(cls, message: Message) -> "MessageKey":
        return cls(message.queue_id, int(message.arrival))


@frozen_record
class Verdict:
    """One sender's answer for one message."""

    sender: Sender
    skip: bool
    priority: int
    reason: str
    error: Optional[str] = None


@frozen_record
class Decision:
    """What happens to one message after every sender has had its say.

    ``sender`` is the sender that sends it (None when every sender skipped
    it); ``reason`` joins each sender's reason for a skip; ``errors`` lists
    the policy errors any sender's pass had with this message.
    """

    message: Message
    send: bool
    priority: int
    sender: Optional[Sender]
    reason: str
    verdicts: Tuple[Verdict, ...] = ()
    several_senders: bool = False

    @property
    def errors(self) -> Tuple[str, ...]:
        """Each policy error, prefixed by its sender's name when there are several."""
        return tuple(f"{v.sender.name}: {v.error}" if self.several_senders else v.error
                     for v in self.verdicts if v.error)

    @property
    def queue_id(self) -> str:
        return self.message.queue_id

    @property
    def key(self) -> MessageKey:
        return MessageKey.of(self.message)

    @property
    def action(self) -> str:
        """The policy's verdict as ``plan --format json`` shows it: "send" or "skip"."""
        return "send" if self.send else "skip"

    @property
    def senders(self) -> str:
        """Who decided, for the log and the records: the sending sender, or every sender that skipped."""
        if self.sender is not None:
            return self.sender.name
        return ",".join(v.sender.name for v in self.verdicts) or "-"
