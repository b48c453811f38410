"""The plan: every action a run will take, decided before the first is taken.

Pure functions, no I/O. The runner lists the queue and asks the back end a
few facts about each message (:class:`Listed`); :func:`triage` sorts them
into what recovery finishes (originals of copies already accepted, mail too
old to keep), what the policy decides, and what qrunner leaves alone; the
policy decides; :func:`make_plan` turns the decisions into holds, releases,
sends in dispatch order and waits. ``qrunner plan`` and dry runs print the
:class:`Plan`; the executor carries it out. Every ordering rule is tested
here without an MTA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from qrunner.config import Sender
from qrunner.decision import Decision, MessageKey
from qrunner.message import Message, frozen_record
from qrunner.mta.base import Due

OVERRIDDEN = "policy overridden by the admin"  # why a flush --ignore-policy sends


@frozen_record
class Listed:
    """One listed message and what the runner learned about it before the policy runs.

    ``ours``: on hold, and qrunner's records say qrunner held it.
    ``unfit``: None when the policy may decide it, else the back end's
    reason for leaving it alone (being delivered, someone else's hold).
    ``expired``: None, or why the MTA's own rules should take it over now.
    ``copy``: the name of the sender whose route this message is a copy on
    (qrunner handed it over); it leaves on that route and is never decided
    again. ``handed``: for an original whose copy
    a sender's route already accepted, (the copy's id, the sender's name).
    """

    message: Message
    ours: bool = False
    unfit: Optional[str] = None
    expired: Optional[str] = None
    copy: Optional[str] = None
    handed: Optional[Tuple[str, str]] = None


@dataclass(frozen=True)
class Step:
    """One action on one message, with the reason the log and the plan show."""

    message: Message
    reason: str

    @property
    def queue_id(self) -> str:
        return self.message.queue_id

    @property
    def key(self) -> MessageKey:
        return MessageKey.of(self.message)


class Remove(Step):
    """Recovery: remove an original whose copy a sender's route accepted (a run stopped before it did)."""


@dataclass(frozen=True)
class HandBack(Step):
    """Give a message back to the MTA's own scheduling (Exim: its default queue); ``by_admin``: ``release``."""

    by_admin: bool = False


@dataclass(frozen=True)
class Release(Step):
    """Release one of qrunner's holds back to the MTA; ``by_admin``: the ``release`` command, not the policy."""

    by_admin: bool = False


class LeftAlone(Step):
    """A message the admin named that qrunner may not act on."""


@frozen_record
class Send:
    """Ask the MTA to deliver a message now, by its sender's route (None: the MTA's own routing).

    ``from_hold``: one of qrunner's holds, sent by its route as it is held
    (the back end copies it from the hold), so it is never released first.
    """

    decision: Decision
    overridden: bool = False
    from_hold: bool = False

    @property
    def message(self) -> Message:
        return self.decision.message

    @property
    def queue_id(self) -> str:
        return self.decision.queue_id

    @property
    def key(self) -> MessageKey:
        return self.decision.key

    @property
    def priority(self) -> int:
        return self.decision.priority

    @property
    def route(self) -> Optional[Sender]:
        sender = self.decision.sender
        return None if sender is None or sender.default else sender

    @property
    def reason(self) -> str:
        return OVERRIDDEN if self.overridden else f"allowed by sender {self.decision.senders}"


@frozen_record
class Wait:
    """An allowed message whose retry time has not come: the MTA's backoff is kept, a dead relay not hammered.

    ``due`` says until when and whose retry time it is (the MTA's own, or
    qrunner's backoff), so the admin sees why a message that may go waits.
    """

    decision: Decision
    due: Due

    @property
    def queue_id(self) -> str:
        return self.decision.queue_id

    @property
    def until(self) -> float:
        return self.due.at

    @property
    def reason(self) -> str:
        return self.due.describe()


@dataclass
class Plan:
    """What a run does, in the order the executor does it.

    ``remove`` (recovery) first; then ``hold`` (new holds) and ``keep``
    (holds that stay, their reason refreshed); ``release`` (qrunner's holds
    the policy now allows, or the admin releases); ``hand_back``; ``send``
    in dispatch order; ``wait`` is only reported. ``left_alone`` are named
    messages qrunner may not touch; ``decisions`` every policy decision, for
    the report; ``listed`` how many messages the policy was asked about.
    """

    remove: List[Remove] = field(default_factory=list)
    hold: List[Decision] = field(default_factory=list)
    keep: List[Decision] = field(default_factory=list)
    release: List[Release] = field(default_factory=list)
    hand_back: List[HandBack] = field(default_factory=list)
    send: List[Send] = field(default_factory=list)
    wait: List[Wait] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    decisions: List[Decision] = field(default_factory=list)
    listed: int = 0
    named: bool = False  # the admin named the messages (flush ID...): what stays as it is is said too

    @property
    def policy_errors(self) -> int:
        return sum(1 for d in self.decisions if d.errors)


@dataclass
class Triage:
    """The listing sorted before the policy runs: recovery, the policy's share, and what is left alone."""

    candidates: List[Message] = field(default_factory=list)
    ours: Set[MessageKey] = field(default_factory=set)
    remove: List[Remove] = field(default_factory=list)
    hand_back: List[HandBack] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    named: bool = False


def triage(listed: Iterable[Listed], only_ids: Optional[Sequence[str]] = None) -> Triage:
    """Sort the listing; ``only_ids`` (a flush of named messages) narrows what the policy sees.

    Recovery happens whatever the admin named: a copy is never decided, the
    original of an accepted copy is removed rather than handed over twice,
    and expired mail (never one of qrunner's own holds: those stay, warned
    about) goes back to the MTA's own rules.
    """
    result = Triage(named=only_ids is not None)
    named = None if only_ids is None else set(only_ids)
    seen: Set[str] = set()
    for item in listed:
        message = item.message
        seen.add(message.queue_id)
        if item.ours:
            result.ours.add(MessageKey.of(message))
        if item.copy is not None:
            if named is not None and message.queue_id in named:
                result.left_alone.append(LeftAlone(message, f"a copy qrunner handed to sender {item.copy}; the MTA "
                                                            "delivers it on that route"))
            continue
        if _handed_over(item):
            result.remove.append(_remove(item))
        elif item.expired is not None and not item.ours:
            result.hand_back.append(HandBack(message, item.expired))
        elif named is not None and message.queue_id not in named:
            continue
        elif item.unfit is not None:
            if named is not None:
                result.left_alone.append(LeftAlone(message, item.unfit))
        else:
            result.candidates.append(message)
    for queue_id in [] if only_ids is None else only_ids:
        if queue_id not in seen:
            result.left_alone.append(LeftAlone(Message(queue_id, 0.0, 0, "", ()), "not in the queue; nothing to do"))
    return result


def _handed_over(item: Listed) -> bool:
    """One of qrunner's holds whose copy a sender's route already accepted (a run stopped before it removed it)."""
    return item.handed is not None and item.ours


def _remove(item: Listed) -> Remove:
    copy_id, sender = item.handed
    return Remove(item.message, f"already handed to sender {sender} as {copy_id} by an interrupted run")


def dispatch_key(decision: Decision):
    """Priority descending, then arrival ascending, then queue id."""
    return (-decision.priority, decision.message.arrival, decision.queue_id)


def dispatch_order(decisions: Iterable[Decision]) -> List[Decision]:
    """The messages to send, in the order the MTA is asked to deliver them."""
    return sorted((d for d in decisions if d.send), key=dispatch_key)


def held_in_arrival_order(decisions: Iterable[Decision]) -> List[Decision]:
    """The messages every sender skipped, oldest first."""
    return sorted((d for d in decisions if not d.send), key=lambda d: (d.message.arrival, d.queue_id))


def report_order(decisions: Iterable[Decision]) -> List[Decision]:
    """How ``plan`` lists decisions: the sends in dispatch order, then the skips."""
    decisions = list(decisions)
    return dispatch_order(decisions) + held_in_arrival_order(decisions)


def make_plan(decisions: Iterable[Decision], sorted_out: Triage, due: Mapping[MessageKey, Optional[Due]],
              overridden: bool = False, from_hold: Set[MessageKey] = frozenset()) -> Plan:
    """The plan for the policy's ``decisions`` over ``sorted_out.candidates``.

    ``due`` maps an allowed message to when (and by whose retry time) it is
    next due, or None (or no entry) when it is due now. ``overridden`` (flush
    --ignore-policy) sends every allowed message now, whatever its retry time.
    ``from_hold``: qrunner's holds that the back end can send by their
    route as they are held; sent now, they are not released first.
    """
    decisions = sorted(decisions, key=lambda d: (d.message.arrival, d.queue_id))
    plan = Plan(remove=list(sorted_out.remove), hand_back=list(sorted_out.hand_back),
                left_alone=list(sorted_out.left_alone), decisions=decisions, listed=len(decisions),
                named=sorted_out.named)
    for decision in decisions:
        ours = decision.key in sorted_out.ours
        if not decision.send:
            (plan.keep if ours else plan.hold).append(decision)
            continue
        retry = None if overridden else due.get(decision.key)
        kept = ours and retry is None and decision.key in from_hold
        if ours and not kept:
            plan.release.append(Release(decision.message, "released: the policy allows it now"))
        if retry is None:
            plan.send.append(Send(decision, overridden, from_hold=kept))
        else:
            plan.wait.append(Wait(decision, retry))
    plan.send.sort(key=lambda s: dispatch_key(s.decision))
    return plan


def release_plan(listed: Iterable[Listed], only_ids: Optional[Sequence[str]], to_default_queue: bool) -> Plan:
    """``qrunner release``: qrunner's holds (the named ones, or all) back to the MTA, nothing sent.

    ``to_default_queue`` hands the released messages back to the MTA's own
    scheduling too; with every hold (``only_ids`` None) it hands back every
    listed message, held by qrunner or not, so that the way out leaves no
    mail in qrunner's queue. Holds qrunner did not make are never released.
    The original of a copy a sender's route already accepted is removed,
    as a run would: released, the MTA would send it a second time.
    """
    plan = Plan(named=only_ids is not None)
    named = None if only_ids is None else set(only_ids)
    for item in listed:
        message = item.message
        if _handed_over(item):
            plan.remove.append(_remove(item))
            continue
        chosen = named is None or message.queue_id in named
        if item.ours and chosen:
            plan.release.append(Release(message, "released by the admin", by_admin=True))
        if to_default_queue and (named is None or (item.ours and chosen)):
            plan.hand_back.append(HandBack(message, "moved to the MTA's default queue by the admin", by_admin=True))
    if named is not None:
        acted = {r.queue_id for r in plan.release} | {r.queue_id for r in plan.remove}
        plan.left_alone = [LeftAlone(Message(q, 0.0, 0, "", ()), "not held by qrunner; left alone")
                           for q in sorted(named - acted)]
    return plan
