"""The plan: every action a run will take, decided before the first is taken.

Pure functions, no I/O. The runner lists the queue and asks the back end a
few facts about each message (:class:`Listed`); :func:`triage` sorts them
into what recovery finishes (originals of copies already accepted, mail too
old to keep), what the policy decides, and what qrunner leaves alone; the
policy decides; :func:`make_plan` turns the decisions into holds, releases,
sends in dispatch order and waits. Mail past ``max_hold_age`` never reaches
the policy: triage makes it an :class:`Expire` step (:class:`HoldAge`). ``qrunner plan`` and dry runs print the
:class:`Plan`; the executor carries it out. Every ordering rule is tested
here without an MTA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from qrunner.config import NO_PACING, Pacing, Sender
from qrunner.decision import Decision, MessageKey
from qrunner.message import Message, frozen_record
from qrunner.mta.base import Due

OVERRIDDEN = "policy overridden by the admin"  # why a flush --ignore-policy sends
EXPIRED_PRIORITY = 50  # an expired message is sent at the Actions table's default: no policy gave it one


def duration(seconds: float) -> str:
    """A length of time as an admin writes it: "4 days", "6 h", "30 min", "90 s"."""
    if seconds == int(seconds):
        whole = int(seconds)
        for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
            if whole >= size and whole % size == 0:
                count = whole // size
                return f"{count} {unit}s" if unit == "day" and count != 1 else f"{count} {unit}"
    return f"{seconds:g} s"


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
    ``held_copy``: a copy that a sender's listener put on hold as it
    accepted it and that qrunner has not released yet (:class:`HeldCopy`).
    """

    message: Message
    ours: bool = False
    unfit: Optional[str] = None
    expired: Optional[str] = None
    copy: Optional[str] = None
    handed: Optional[Tuple[str, str]] = None
    held_copy: Optional["HeldCopy"] = None


@dataclass(frozen=True)
class HeldCopy:
    """A copy on its listener's hold: for which sender, of which original, and whether that original is gone.

    ``original_gone``: the original is no longer queued, or this run removes
    it first (its copy was recorded); then the copy is released to its
    route. Otherwise the original still waits to be handed over (a crash
    came between the listener's 250 and qrunner's record): the copy is
    removed, and the original is decided again, so the message leaves once.
    """

    sender: str
    original: str
    original_gone: bool


@frozen_record
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
    """Recovery: remove an original whose copy a sender's route accepted (a run stopped before it did), or a
    held copy whose original still waits."""


class RemoveCopy(Remove):
    """Recovery: remove a copy on its listener's hold whose original still waits (and the copy's record, if any)."""


@frozen_record
class ReleaseCopy(Step):
    """Recovery: release a copy from its listener's hold once its original (``original``) is gone."""

    original: str = ""


@frozen_record
class HandBack(Step):
    """Give a message back to the MTA's own scheduling (Exim: its default queue); ``by_admin``: ``release``."""

    by_admin: bool = False


@frozen_record
class Release(Step):
    """Release one of qrunner's holds back to the MTA; ``by_admin``: the ``release`` command, not the policy."""

    by_admin: bool = False


class LeftAlone(Step):
    """A message the admin named that qrunner may not act on."""


@frozen_record
class Expire(Step):
    """Past ``max_hold_age``: the policy is not asked; sent by the MTA's own routing, or (``bounce``) returned
    to its sender."""

    bounce: bool = False


@dataclass(frozen=True)
class HoldAge:
    """``max_hold_age`` and ``on_hold_expiry``, with the clock triage reads them by.

    A policy that skips a message means "not now", not "never": past
    ``limit`` seconds since arrival the message goes by the MTA's own
    routing (``bounce``: back to its sender) before the MTA's queue lifetime
    would bounce it at its first attempt anyway. ``now`` is the real clock
    (``--now`` moves only the script's). A bounce (null sender) is never
    returned: there is no one to return it to, so it is sent.
    """

    limit: float
    now: float
    bounce: bool = False

    def expiry(self, message: Message) -> Optional[Expire]:
        """The expire step for ``message``, or None while it is younger than the limit."""
        if self.now - message.arrival <= self.limit:
            return None
        past = f"past max_hold_age ({duration(self.limit)} since arrival)"
        if self.bounce and message.sender:
            return Expire(message, f"{past}: returned to its sender", bounce=True)
        if self.bounce:
            return Expire(message, f"{past}: a bounce has no sender to return it to, so it goes by the MTA's "
                                   "own routing")
        return Expire(message, f"{past}: sent by the MTA's own routing without asking the policy")


@frozen_record
class Send:
    """Ask the MTA to deliver a message now, by its sender's route (None: the MTA's own routing).

    ``from_hold``: one of qrunner's holds, sent by its route as it is held
    (the back end copies it from the hold), so it is never released first.
    ``expired``: past ``max_hold_age``, sent without asking the policy (the
    decision's reason says so).
    """

    decision: Decision
    overridden: bool = False
    from_hold: bool = False
    expired: bool = False

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
        if self.expired:
            return self.decision.reason
        return OVERRIDDEN if self.overridden else f"allowed by sender {self.decision.senders}"


@frozen_record
class Wait:
    """An allowed message that is not sent this run, and why; it stays where it is (waiting, or on qrunner's hold).

    Either its retry time has not come (``due``: until when, and whose retry
    time it is, the MTA's own or qrunner's backoff), so the MTA's backoff
    is kept and a dead relay not hammered; or a pacing limit left it for
    the next run (``paced``: which limit, in the admin's words).
    """

    decision: Decision
    due: Optional[Due] = None
    paced: str = ""

    @property
    def queue_id(self) -> str:
        return self.decision.queue_id

    @property
    def key(self) -> MessageKey:
        return self.decision.key

    @property
    def message(self) -> Message:
        return self.decision.message

    @property
    def until(self) -> Optional[float]:
        return self.due.at if self.due is not None else None

    @property
    def reason(self) -> str:
        return self.paced or (self.due.describe() if self.due is not None else "")


@dataclass
class Plan:
    """What a run does, in the order the executor does it.

    ``remove`` (recovery) first; then ``hold`` (new holds) and ``keep``
    (holds that stay, their reason refreshed); ``release`` (qrunner's holds
    the policy now allows, or the admin releases, or past ``max_hold_age``);
    ``hand_back``; the ``expire`` steps that return mail to its sender;
    ``send`` in dispatch order (expired mail among it); ``wait`` is only
    reported. ``expire`` lists every message past ``max_hold_age``, for the
    report (those sent are also in ``send`` or ``wait``). ``left_alone`` are
    named messages qrunner may not touch; ``decisions`` every policy
    decision, for the report; ``listed`` how many messages the policy was
    asked about.
    """

    remove: List[Remove] = field(default_factory=list)
    release_copies: List[ReleaseCopy] = field(default_factory=list)
    hold: List[Decision] = field(default_factory=list)
    keep: List[Decision] = field(default_factory=list)
    release: List[Release] = field(default_factory=list)
    hand_back: List[HandBack] = field(default_factory=list)
    expire: List[Expire] = field(default_factory=list)
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
    """The listing sorted before the policy runs: recovery, expiry, the policy's share, and what is left alone."""

    candidates: List[Message] = field(default_factory=list)
    ours: Set[MessageKey] = field(default_factory=set)
    remove: List[Remove] = field(default_factory=list)
    release_copies: List[ReleaseCopy] = field(default_factory=list)
    hand_back: List[HandBack] = field(default_factory=list)
    expire: List[Expire] = field(default_factory=list)
    left_alone: List[LeftAlone] = field(default_factory=list)
    named: bool = False


def triage(listed: Iterable[Listed], only_ids: Optional[Sequence[str]] = None,
           hold_age: Optional[HoldAge] = None) -> Triage:
    """Sort the listing; ``only_ids`` (a flush of named messages) narrows what the policy sees.

    Recovery happens whatever the admin named: a copy is never decided, the
    original of an accepted copy is removed rather than handed over twice,
    and expired mail (never one of qrunner's own holds: those stay, warned
    about) goes back to the MTA's own rules. ``hold_age``: a message the
    policy would decide that is past ``max_hold_age`` is an expire step
    instead, never a candidate; what qrunner may not touch (an admin's hold,
    a message being delivered) never expires.
    """
    result = Triage(named=only_ids is not None)
    named = None if only_ids is None else set(only_ids)
    seen: Set[str] = set()
    for item in listed:
        message = item.message
        seen.add(message.queue_id)
        if item.ours:
            result.ours.add(MessageKey.of(message))
        if item.held_copy is not None:
            _settle_held_copy(item, result.remove, result.release_copies)
            continue
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
            expire = hold_age.expiry(message) if hold_age is not None else None
            if expire is not None:
                result.expire.append(expire)
            else:
                result.candidates.append(message)
    for queue_id in [] if only_ids is None else only_ids:
        if queue_id not in seen:
            result.left_alone.append(LeftAlone(Message(queue_id, 0.0, 0, "", ()), "not in the queue; nothing to do"))
    return result


def _handed_over(item: Listed) -> bool:
    """One of qrunner's holds whose copy a sender's route already accepted (a run stopped before it removed it)."""
    return item.handed is not None and item.ours


def _settle_held_copy(item: Listed, remove: List[Remove], release: List[ReleaseCopy]) -> None:
    """A copy on its listener's hold: released when its original is gone, removed while the original waits."""
    copy = item.held_copy
    if copy.original_gone:
        why = f"copy for sender {copy.sender} of {copy.original}: released to its route now that the original is gone"
        release.append(ReleaseCopy(item.message, why, original=copy.original))
    else:
        remove.append(RemoveCopy(item.message, f"copy for sender {copy.sender} held by its listener; its original "
                                               f"{copy.original} is still queued and is decided again"))


def _remove(item: Listed) -> Remove:
    copy_id, sender = item.handed
    return Remove(item.message, f"already handed to sender {sender} as {copy_id} by an interrupted run")


def dispatch_key(decision: Decision):
    """Priority descending, then arrival ascending, then queue id."""
    message = decision.message
    return (-decision.priority, message.arrival, message.queue_id)


def _arrival_key(decision: Decision):
    message = decision.message
    return (message.arrival, message.queue_id)


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
              overridden: bool = False, from_hold: Set[MessageKey] = frozenset(),
              pacing: Pacing = NO_PACING) -> Plan:
    """The plan for the policy's ``decisions`` over ``sorted_out.candidates``.

    ``due`` maps an allowed message (or one past ``max_hold_age`` that is
    sent) to when (and by whose retry time) it is next due, or None (or no
    entry) when it is due now. ``overridden`` (flush --ignore-policy) sends
    every allowed message now, whatever its retry time. ``from_hold``:
    qrunner's holds that the back end can send by their route as they are
    held; sent now, they are not released first. ``pacing``: the
    ``max_per_run`` limits (the run's, each sender's); what they leave for
    the next run waits where it is (a hold of qrunner's is not released for
    it). Mail past ``max_hold_age`` is not paced: it is sent regardless. The
    limits that act while the run hands over (``max_active``,
    ``max_run_seconds``, strict priority) are the executor's.
    """
    decisions = sorted(decisions, key=_arrival_key)
    plan = Plan(remove=list(sorted_out.remove), release_copies=list(sorted_out.release_copies),
                hand_back=list(sorted_out.hand_back),
                expire=list(sorted_out.expire), left_alone=list(sorted_out.left_alone), decisions=decisions,
                listed=len(decisions), named=sorted_out.named)
    for step in sorted_out.expire:
        if not step.bounce:
            _plan_expired_send(plan, step, step.key in sorted_out.ours, due.get(step.key))
    expired_sends = bool(plan.send)
    due_now = []
    ours_keys = sorted_out.ours
    due = due if due and not overridden else {}
    hold, keep = plan.hold.append, plan.keep.append
    for decision in decisions:
        key = decision.key if ours_keys or due else None  # one key per decision, and none when nothing needs it
        ours = bool(ours_keys) and key in ours_keys
        if not decision.send:
            (keep if ours else hold)(decision)
            continue
        retry = due.get(key) if due else None
        if retry is None:
            due_now.append(decision)
            continue
        if ours:
            plan.release.append(Release(decision.message, "released: the policy allows it now"))
        plan.wait.append(Wait(decision, retry))
    sends, paced = per_run_limits(sorted(due_now, key=dispatch_key), pacing)
    send = plan.send.append
    for decision in sends:
        ours = bool(ours_keys) and decision.key in ours_keys
        kept = ours and decision.key in from_hold
        if ours and not kept:
            plan.release.append(Release(decision.message, "released: the policy allows it now"))
        send(Send(decision, overridden, from_hold=kept))
    if expired_sends:  # the policy's sends are in dispatch order already; expired ones go among them
        plan.send.sort(key=lambda s: dispatch_key(s.decision))
    plan.release.sort(key=lambda r: (r.message.arrival, r.queue_id))
    plan.wait.extend(paced)
    return plan


def _plan_expired_send(plan: Plan, step: Expire, ours: bool, retry: Optional[Due]) -> None:
    """Past max_hold_age, sent by the MTA's own routing: released first if qrunner holds it; its retry time kept.

    The retry time still counts: sending to a relay that is down would only
    defer it again, and the MTA's backoff keeps a dead relay from being
    hammered every run.
    """
    decision = Decision(step.message, True, EXPIRED_PRIORITY, None, step.reason)
    if ours:
        plan.release.append(Release(step.message, "released: past max_hold_age"))
    if retry is None:
        plan.send.append(Send(decision, expired=True))
    else:
        plan.wait.append(Wait(decision, retry))


def per_run_limits(ordered: Sequence[Decision], pacing: Pacing) -> Tuple[List[Decision], List[Wait]]:
    """Split messages due now, in dispatch order, into what this run sends and what ``max_per_run`` leaves.

    Each sender's limit first, then the run's over what is left: so what
    waits is always the lowest of each sender's priorities, and a sender
    at its limit leaves room for the others.
    """
    per_sender = dict(pacing.sender_max_per_run)
    if not per_sender and not pacing.max_per_run:
        return list(ordered), []
    counted: Dict[str, int] = {}
    sends: List[Decision] = []
    paced: List[Wait] = []
    for decision in ordered:
        name = decision.sender.name if decision.sender is not None else ""
        limit = per_sender.get(name, 0)
        if limit and counted.get(name, 0) >= limit:
            paced.append(Wait(decision, paced=f"sender {name}'s max_per_run ({limit}) reached: left for the "
                                              "next run"))
        elif pacing.max_per_run and len(sends) >= pacing.max_per_run:
            paced.append(Wait(decision, paced=f"max_per_run ({pacing.max_per_run}) reached: left for the next run"))
        else:
            counted[name] = counted.get(name, 0) + 1
            sends.append(decision)
    return sends, paced


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
        if item.held_copy is not None:
            _settle_held_copy(item, plan.remove, plan.release_copies)
            continue
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


@dataclass(frozen=True)
class Planned:
    """One step a plan takes for one message, in the admin's words: what ``explain`` reports.

    ``action`` is the word the plan table and the log use (delete, hold,
    keep, release, handback, move, send, wait, left alone); ``position`` a
    send's place in dispatch order (1 first) of ``of`` sends; ``until`` when
    a waiting message is due.
    """

    action: str
    reason: str
    priority: Optional[int] = None
    sender: Optional[str] = None
    position: Optional[int] = None
    of: Optional[int] = None
    until: Optional[float] = None


def steps_for(plan: Plan, key: MessageKey) -> List[Planned]:
    """Every step ``plan`` takes for the message ``key``, in the order the executor takes them.

    Empty when the plan does nothing with it (a message the policy was
    not asked about); :func:`explain_unplanned` then says why.
    """
    found: List[Planned] = []
    found += [Planned("delete", s.reason) for s in plan.remove if s.key == key]
    found += [Planned("release", s.reason) for s in plan.release_copies if s.key == key]
    for action, decisions in (("hold", plan.hold), ("keep", plan.keep)):
        found += [Planned(action, d.reason, d.priority, d.senders) for d in decisions if d.key == key]
    found += [Planned("release", s.reason) for s in plan.release if s.key == key]
    found += [Planned("move" if s.by_admin else "handback", s.reason) for s in plan.hand_back if s.key == key]
    for position, send in enumerate(plan.send, 1):
        if send.key == key:
            found.append(Planned("send", send.reason, send.priority, send.decision.senders, position, len(plan.send)))
    for wait in plan.wait:
        if MessageKey.of(wait.decision.message) == key:
            found.append(Planned("wait", wait.reason, wait.decision.priority, wait.decision.senders,
                                 until=wait.until))
    found += [Planned("left alone", s.reason) for s in plan.left_alone if s.key == key]
    return found


def explain_unplanned(item: Listed) -> List[Planned]:
    """Why a run takes no step for this message: triage's own rule for it, as if the admin had named it."""
    sorted_out = triage([item], [item.message.queue_id])
    return [Planned("left alone", s.reason) for s in sorted_out.left_alone]
