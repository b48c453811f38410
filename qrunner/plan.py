"""The plan: from decisions to what happens, in which order.

Pure functions, no I/O, so that every ordering rule is tested exhaustively
without an MTA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Optional, Set, Tuple

from qrunner.policy import Decision


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


def message_key(decision: Decision) -> Tuple[str, int]:
    """How qrunner's records name a message: queue id and arrival second."""
    return (decision.queue_id, int(decision.message.arrival))


@dataclass
class Plan:
    """What a run does, in the order it does it.

    ``release`` (qrunner's holds the policy now allows) happens first, then
    ``send`` in dispatch order; ``hold`` are new holds, ``keep`` holds that
    stay (their reason refreshed), ``wait`` allowed messages whose retry time
    has not come (Postfix's backoff is kept, a dead relay is not hammered).
    """

    hold: List[Decision] = field(default_factory=list)
    keep: List[Decision] = field(default_factory=list)
    release: List[Decision] = field(default_factory=list)
    send: List[Decision] = field(default_factory=list)
    wait: List[Tuple[Decision, float]] = field(default_factory=list)


def make_plan(decisions: Iterable[Decision], held_by_us: Set[Tuple[str, int]],
              next_retry: Mapping[str, Optional[float]]) -> Plan:
    """The plan for ``decisions``, given qrunner's holds and each message's next retry.

    ``next_retry`` maps a queue id to the time Postfix would retry it by
    itself, or None (or no entry) when it is due now.
    """
    plan = Plan()
    for decision in sorted(decisions, key=lambda d: (d.message.arrival, d.queue_id)):
        ours = message_key(decision) in held_by_us
        if not decision.send:
            (plan.keep if ours else plan.hold).append(decision)
            continue
        if ours:
            plan.release.append(decision)
        retry = next_retry.get(decision.queue_id)
        if retry is None:
            plan.send.append(decision)
        else:
            plan.wait.append((decision, retry))
    plan.send.sort(key=dispatch_key)
    return plan
