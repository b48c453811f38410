"""The one narrow interface every MTA back end implements.

Modelled on httpx's transports: a small base class, interchangeable back
ends each in its own file (``postfix.py``, ``exim.py``, ``memory.py``, the
offline ``snapshot.py``), and the same end-to-end cases run over each. The
runner asks a back end for a few facts and a few actions, and nothing
outside ``qrunner/mta/`` knows which MTA it drives.

Each back end does "send by a sender's route" its own way: Postfix holds
the original, re-injects a copy into the sender's listener (which puts the
copy on hold as it accepts it), records the copy, removes the original and
only then releases the copy, telling the executor each step through a
:class:`HandOverJournal` so that every step is recorded before the next
(:func:`finish_hand_over`); Exim writes its routes file and lets its router
pick the transport at delivery, with no copy at all.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Set, Tuple

from qrunner.config import Sender
from qrunner.exceptions import QrunnerError
from qrunner.message import Message


class Result(enum.Enum):
    """How the MTA took a request to deliver a message."""

    SCHEDULED = "scheduled"  # the MTA took the request; its delivery runs on its own
    DELIVERED = "delivered"  # the MTA's attempt is known to have ended with the message gone
    DEFERRED = "deferred"    # the MTA's attempt is known to have left the message queued
    ROUTED = "routed"        # a copy now travels the sender's route under a new id
    VANISHED = "vanished"    # no longer there to send (delivered, deleted or being delivered)
    FAILED = "failed"        # the MTA refused or could not be asked; ``detail`` says why


@dataclass(frozen=True)
class Outcome:
    """What became of one send request."""

    result: Result
    detail: str = ""
    new_id: str = ""                # ROUTED: the copy's queue id
    original_removed: bool = True   # ROUTED: False when the original is still queued
    copy_held: bool = False         # ROUTED: the copy still waits on the listener's hold (the next run releases it)

    def __str__(self) -> str:
        """As the run's dispatch record stores it."""
        if self.result is Result.ROUTED:
            return f"routed as {self.new_id}"
        if self.result is Result.FAILED:
            return f"failed: {self.detail}"
        return self.result.value


class SendRequest(NamedTuple):
    """One message to deliver now; ``route`` is its sender, None for the MTA's own routing.

    ``held``: the message is on qrunner's hold and stays there until it is
    copied into its route (only where :meth:`Backend.sends_from_hold` says so).
    ``priority``: the level it is sent at, for a back end that keeps the
    levels apart (Exim). ``forced``: the admin's ``flush --ignore-policy``:
    deliver it now, past the MTA's own retry times (never past someone's
    hold or freeze).
    """

    message: Message
    route: Optional[Sender]
    held: bool = False
    priority: int = 50
    forced: bool = False


class Due(NamedTuple):
    """When a message is next due for delivery, and whose retry time that is (``plan`` and the log say).

    ``whose``: "Postfix's retry time", "Exim's retry time", "qrunner's
    retry time"...; ``detail``: what set it, in the MTA's own terms (the
    retry record, the host), so the admin can look it up there.
    """

    at: float
    whose: str = "its retry time"
    detail: str = ""

    def describe(self) -> str:
        return f"{self.whose} ({self.detail})" if self.detail else self.whose


class HandOverJournal(Protocol):
    """The executor's record of a hand-over, called by a back end that copies messages into a route."""

    def holding(self, requests: Sequence[SendRequest]) -> None:
        """The originals are about to be held so that nothing else sends them while they are copied."""

    def held(self, requests: Sequence[SendRequest], confirmed: Set[str]) -> None:
        """The MTA confirmed these holds."""

    def copied(self, request: SendRequest, new_id: str, held: bool = False) -> None:
        """The sender's route accepted a copy (``held``: on the listener's hold); the original is removed next."""

    def copy_released(self, request: SendRequest, new_id: str) -> None:
        """The original is gone and the copy was released from the listener's hold: it leaves on its route."""

    def sent(self, request: SendRequest, outcome: "Outcome") -> None:
        """One request's outcome, reported as soon as it is known, so that a failure later in the
        batch cannot take the record of what already left with it."""


class Gate(NamedTuple):
    """Whether the MTA waits for qrunner before it delivers gated mail: True, False or None (unknown, ``why``).

    ``leftover``: for a gate that is not whole, what of it still takes mail
    out of the MTA's own hands (an Exim ACL that still puts mail into
    qrunner's queue); qrunner must not be removed while there is any.
    """

    gated: Optional[bool]
    why: str = ""
    leftover: str = ""


class Backend:
    """A queue qrunner can read and act on.

    ``instance`` names the MTA instance in qrunner's records (two instances
    never share records). Actions return the ids the MTA confirmed: a
    message that vanished meanwhile is simply not confirmed.
    """

    instance = ""
    has_named_queue = False  # True: hand_back moves mail out of qrunner's own queue (Exim)
    id_hint = "a message id"  # how the CLI names a bad id: "a Postfix queue id (see 'postqueue -p')"
    # How the admin takes the gate out, for the removal rule's refusal (``release --for-removal``).
    ungate_hint = 'remove the gate (README: "Undo it all")'
    # Why this MTA cannot return a message to its sender (``on_hold_expiry = "bounce"``), or None where
    # :meth:`give_up` can; the configuration error names it.
    cannot_return: Optional[str] = "this MTA has no command that returns a message to its sender"

    # -- facts ---------------------------------------------------------------

    def is_message_id(self, text: str) -> bool:
        """``text`` has the MTA's message id syntax (checked before it reaches a command line or a path)."""
        raise NotImplementedError

    def check(self, senders: Sequence[Sender], acting: bool) -> None:
        """Raise when the MTA cannot be asked now: not running, a sender without a working route,
        and, when ``acting``, not the rights to change its queue."""

    def gate(self, senders: Sequence[Sender] = ()) -> Gate:
        """Is the MTA gated, so that qrunner alone starts the delivery of the mail it decides?

        ``senders``: the run's senders, for an MTA whose gate includes the
        routing of senders with a route (Exim's router).
        """
        return Gate(None, "this back end cannot tell")

    def unfit(self, message: Message, ours: bool) -> Optional[str]:
        """None when the policy may decide the message (``ours``: qrunner holds it); else why it is left alone."""
        raise NotImplementedError

    def copy_of(self, message: Message, senders: Sequence[Sender], recorded: bool = False) -> Optional[Sender]:
        """The sender whose route an earlier hand-over stamped into this message, if any.

        The MTA's own files say (Postfix: the ``content_filter`` in the copy's
        queue file), so a copy is never decided again even when qrunner's
        records of it are gone; ``recorded``: qrunner's records name it a
        copy, so look even where the MTA's cheap signs say it cannot be one.
        An MTA that routes at delivery has no copies.
        """
        return None

    def held_copy(self, message: Message, senders: Sequence[Sender]) -> Optional[Tuple[Sender, str]]:
        """For a message on hold that a sender's listener put there as it accepted it: (that sender, the
        original's queue id, "" when the copy does not name it); None for any other message.

        The copy's own queue file says so (Postfix: the ``content_filter`` the
        listener stamped and the original's id carried as XFORWARD IDENT), so
        a hand-over a crash interrupted between the listener's reply and
        qrunner's record is recognised without any record.
        """
        return None

    def release_copies(self, queue_ids: Sequence[str]) -> Set[str]:
        """Release copies from the listener's hold and have them delivered now, on their route; the ids done."""
        return set()

    def sends_from_hold(self, route: Optional[Sender]) -> bool:
        """Can one of qrunner's holds be sent by ``route`` as it is, without releasing it first?

        True where a sender's route takes a copy of the held original
        (Postfix, memory): releasing it first would open a moment in which
        the MTA could send it by its own routing.
        """
        return False

    def due(self, message: Message, attempts: Optional[Tuple[int, float]]) -> Optional[Due]:
        """When the message is next due for delivery and why, or None when it is due now.

        ``attempts`` is qrunner's record of its dispatches that left the
        message queued (count, time of the last), for an MTA whose own
        retry schedule does not cover gated mail, or not all of it.
        """
        return None

    def expired(self, message: Message) -> Optional[str]:
        """Why the MTA's own rules should take the message over now (too old to keep), or None."""
        return None

    def queue_lifetime(self) -> Optional[float]:
        """Age (seconds since arrival) past which a released message is likely to bounce at once, if known."""
        return None

    def version(self) -> str:
        """The MTA's name and version, as its own tools say (``qrunner --version``)."""
        return type(self).__name__

    def describe_route(self, sender: Sender) -> str:
        """How a sender's mail leaves this MTA, for ``status`` and ``plan``."""
        return "default: the MTA's own routing" if sender.default else "no route"

    # -- what is in delivery now (pacing: max_active, strict_priority) ---------------

    # How many messages one ``send`` call takes when a run paces its hand-over, looking at
    # its limits between calls: small enough to stop soon, big enough to keep the MTA's
    # own parallelism (Exim: every dispatch process busy).
    hand_over_batch = 50

    def delivering(self) -> Optional[int]:
        """How many messages the MTA is delivering right now (its active queue); None when it cannot tell.

        ``max_active`` is compared with this before each hand-over step, so
        it counts every delivery, qrunner's or not.
        """
        return None

    def still_delivering(self, queue_ids: Sequence[str]) -> Optional[Set[str]]:
        """Which of these messages have not left the MTA's delivery yet; None when it cannot tell.

        A message has left when its delivery attempt ended: delivered,
        deferred by the relay, or bounced. ``queue_ids`` are the ids as
        handed over (a routed copy's new id). Strict priority waits for a
        level's messages to leave before it hands over the next level.
        """
        return None

    # -- actions ---------------------------------------------------------------

    def list(self) -> List[Message]:
        """Every message the MTA shows."""
        raise NotImplementedError

    def hold(self, queue_ids: Sequence[str]) -> Set[str]:
        raise NotImplementedError

    def release(self, queue_ids: Sequence[str]) -> Set[str]:
        raise NotImplementedError

    def send(self, requests: Sequence[SendRequest], journal: HandOverJournal) -> Dict[str, Outcome]:
        """Ask the MTA to deliver each message (in the order given), each by its route; queue id -> outcome."""
        raise NotImplementedError

    def remove(self, queue_ids: Sequence[str]) -> Set[str]:
        """Remove originals whose copy a sender's route accepted."""
        raise NotImplementedError

    def hand_back(self, queue_ids: Sequence[str]) -> Set[str]:
        """Give messages back to the MTA's own scheduling (Exim: its default queue); nothing elsewhere."""
        return set()

    def give_up(self, queue_ids: Sequence[str]) -> Set[str]:
        """Have the MTA return each message to its sender (its own bounce) instead of delivering it.

        For mail past ``max_hold_age`` with ``on_hold_expiry = "bounce"``;
        qrunner's holds among them too, without a release first. The ids
        the MTA took the request for; a message being delivered is left as
        it is. Only where :attr:`cannot_return` is None.
        """
        return set()

    def close(self) -> None:
        """Release whatever the back end holds open."""


def send_copying_routes(backend: Backend, requests: Sequence[SendRequest], journal: HandOverJournal,
                        schedule: Callable[[str], Outcome],
                        hand_over: Callable[[SendRequest, HandOverJournal], Outcome]) -> Dict[str, Outcome]:
    """``send`` for a back end that copies routed messages into their route (Postfix, memory).

    The originals of the routed messages are held first (those on qrunner's
    hold already stay there), recorded before and confirmed after through
    ``journal``, so that nothing else sends them while they are copied; then
    each message in the order given: the default route's by
    ``schedule(queue_id)``, a routed one by ``hand_over`` (which records the
    copy through ``journal``, then removes the original); one whose hold was
    not confirmed is gone. Each outcome goes to ``journal.sent`` at once.
    """
    routed = [r for r in requests if r.route is not None]
    held = {r.message.queue_id for r in routed if r.held}
    if routed:
        journal.holding(routed)
        fresh = [r for r in routed if not r.held]
        confirmed = backend.hold([r.message.queue_id for r in fresh]) if fresh else set()
        journal.held(fresh, confirmed)
        held |= confirmed
    outcomes = {}
    for request in requests:
        queue_id = request.message.queue_id
        if request.route is None:
            outcome = schedule(queue_id)
        elif queue_id not in held:
            outcome = Outcome(Result.VANISHED)
        else:
            outcome = hand_over(request, journal)
        outcomes[queue_id] = outcome
        journal.sent(request, outcome)
    return outcomes


def finish_hand_over(backend: Backend, request: SendRequest, journal: HandOverJournal, new_id: str,
                     held: bool) -> Outcome:
    """After the listener's 250: record the copy, remove the original, then release the copy (when held).

    The order closes the duplicate window: until the record is written the
    copy waits on hold (a crash leaves it for the next run to remove, since
    its original still waits); until the original is gone the copy is not
    released. A listener that does not hold copies (an older master.cf)
    leaves today's order, at-least-once: a crash before the record can
    deliver twice.
    """
    journal.copied(request, new_id, held)
    removed = removed_now(backend, request.message.queue_id)
    released = False
    if held and removed:
        released = released_now(backend, new_id)
        if released:
            journal.copy_released(request, new_id)
    return Outcome(Result.ROUTED, new_id=new_id, original_removed=removed, copy_held=held and not released)


def released_now(backend: Backend, queue_id: str) -> bool:
    """Release a copy whose original is gone; False (the next run releases it) when the MTA would not."""
    try:
        return queue_id in backend.release_copies([queue_id])
    except QrunnerError as error:
        logging.getLogger("qrunner").error("%s: the copy was not released from the listener's hold (%s); the next "
                                           "run releases it", queue_id, error.message)
        return False


def removed_now(backend: Backend, queue_id: str) -> bool:
    """Remove an original whose copy was recorded; False (the next run removes it) when the MTA would not.

    The copy has left by then: a failure here must not stop the run from
    logging and recording it.
    """
    try:
        return queue_id in backend.remove([queue_id])
    except QrunnerError as error:
        logging.getLogger("qrunner").error("%s: the original of an accepted copy was not removed (%s); the next "
                                           "run removes it", queue_id, error.message)
        return False
