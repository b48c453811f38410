"""The plan: from decisions to what happens, in which order.

Pure functions, no I/O, so that every ordering rule is tested exhaustively
without an MTA.
"""

from __future__ import annotations

from typing import Iterable, List

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
