"""The executor: the one place where qrunner changes the queue.

It carries out a :class:`~qrunner.plan.Plan` in the order that makes a
crash harmless: every change is recorded in the state database before the
MTA is asked, confirmed from the MTA's answer, then marked done, so that
the next run's reconcile can settle whatever a crash left half-way. Each
action writes one log line in Postfix's style (``ID: action=hold ...``);
admins grep these, so their format is fixed (tests/test_log_format.py).
Each action is also kept in the state database's history, written once per
step of the plan (not once per message), which ``qrunner explain`` shows.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from qrunner.decision import Decision, MessageKey
from qrunner.message import Message
from qrunner.mta.base import Backend, Outcome, Result, SendRequest
from qrunner.plan import Expire, HandBack, Plan, Release, Remove, Send
from qrunner.progress import NONE as NO_PROGRESS, Progress, Tick
from qrunner.state import Event, RunSummary, State

log = logging.getLogger("qrunner")

CHUNK = 1000  # messages per postsuper/exim call in a long hold, release or move: progress shows, argv stays short


def quote(text: str) -> str:
    """A value for a ``key="..."`` log field, on one line."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def _no_tick(count: int = 1) -> None:
    pass


class Executor:
    """Carries out one plan against one back end, recording each step in ``state``."""

    def __init__(self, backend: Backend, state: State, summary: RunSummary, progress: Progress = NO_PROGRESS,
                 rate: Optional[float] = None):
        self.backend = backend
        self.state = state
        self.summary = summary
        self.progress = progress
        self.rate = rate  # messages per second handed to the MTA's delivery (flush, release --to-default-queue)
        self._tick: Tick = _no_tick
        self._not_released: Set[str] = set()
        self._sending: Dict[str, Send] = {}
        self._outcomes: Dict[str, Outcome] = {}
        self.run_id: Optional[int] = None
        self.tally: Dict[Tuple[str, str], int] = {}  # (counter, sender) -> how many this run: the metrics' counters
        self._events: List[Event] = []  # this step's actions, for the history (written by _write_history)

    def _in_chunks(self, what: str, items: Sequence, act: Callable[[Sequence], None], paced: bool = False) -> None:
        """``act`` on ``items`` a chunk at a time, so a long stage shows progress and a paced one keeps its rate.

        Each chunk is recorded, acted on and confirmed before the next (the
        crash-safe order holds per chunk). Paced (``rate``), a chunk is as
        many messages as one second allows and starts no earlier than the
        rate lets it.
        """
        size = max(1, int(self.rate)) if paced and self.rate else CHUNK
        started = time.monotonic()
        with self.progress.bar(what, len(items)) as tick:
            for done in range(0, len(items), size):
                if paced and self.rate and done:
                    time.sleep(max(0.0, started + done / self.rate - time.monotonic()))
                chunk = items[done:done + size]
                act(chunk)
                tick(len(chunk))

    def _count(self, counter: str, sender: str) -> None:
        self.tally[(counter, sender)] = self.tally.get((counter, sender), 0) + 1

    def _say(self, level: int, message: Message, action: str, text: str, *args,
             recorded: Union[bool, Event] = True, **fields) -> None:
        """One action line; in the journal also as fields (``journalctl -t qrunner QUEUE_ID=...``).

        ``fields``: ``priority``, ``sender`` (qrunner's sender), ``reason``, ``new_id``.
        ``recorded``: the line's action goes into the message's history as
        these fields say (True), as another :class:`Event` says (a failure
        named as such), or not at all (False: a wait or a kept hold, said
        again every run, would only bury what happened).
        """
        if recorded is True:
            recorded = Event(MessageKey.of(message), action, fields.get("sender") or "", fields.get("priority"),
                             fields.get("reason") or "", fields.get("new_id") or "")
        if recorded:
            self._events.append(recorded)
        journal = {"QUEUE_ID": message.queue_id, "ARRIVAL": str(int(message.arrival)), "ACTION": action,
                   "ENVELOPE_SENDER": message.sender}
        if self.run_id is not None:
            journal["RUN_ID"] = str(self.run_id)
        names = {"priority": "QRUNNER_PRIORITY", "sender": "QRUNNER_SENDER", "reason": "REASON",
                 "new_id": "NEW_QUEUE_ID"}
        journal.update({names[k]: str(v) for k, v in fields.items() if v is not None})
        log.log(level, text, *args, extra={"journal": journal})

    def execute(self, plan: Plan, run_id: int) -> None:
        """Every action of the plan, in the crash-safe order; each step's history written as it ends."""
        self.run_id = run_id
        steps = (lambda: self.remove(plan.remove), lambda: self.hold(plan.hold),
                 lambda: self.keep(plan.keep, named=plan.named), lambda: self.release(plan.release),
                 lambda: self.hand_back(plan.hand_back),
                 lambda: self.return_to_sender([step for step in plan.expire if step.bounce]),
                 lambda: self.send(plan.send, run_id))
        try:
            for step in steps:
                step()
                self._write_history()
        finally:
            self._write_history()  # what a failing step did before it failed
        for wait in plan.wait:
            d = wait.decision
            self._say(logging.INFO, d.message, "wait", "%s: action=wait sender=%s priority=%d next_retry=%s reason=%s",
                      wait.queue_id, d.senders, d.priority,
                      time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wait.until)), quote(wait.reason),
                      priority=d.priority, sender=d.senders, reason=wait.reason, recorded=False)

    def _write_history(self) -> None:
        events, self._events = self._events, []
        if events and self.run_id is not None:
            self.state.record_history(self.run_id, events)

    # -- recovery ------------------------------------------------------------

    def remove(self, steps: Sequence[Remove]) -> None:
        """Originals whose copy a sender's route already accepted: handing them over again would send twice."""
        if not steps:
            return
        removed = self.backend.remove([s.queue_id for s in steps])
        self.state.forget(s.key for s in steps if s.queue_id in removed)
        for step in steps:
            if step.queue_id in removed:
                self._say(logging.INFO, step.message, "delete", "%s: action=delete reason=%s", step.queue_id,
                          quote(step.reason), reason=step.reason)

    def hand_back(self, steps: Sequence[HandBack]) -> None:
        """To the MTA's own scheduling; never a hold of qrunner's that this run could not release."""
        steps = [s for s in steps if s.queue_id not in self._not_released]
        self._in_chunks("moving", steps, self._hand_back, paced=True)

    def _hand_back(self, steps: Sequence[HandBack]) -> None:
        handed = self.backend.hand_back([s.queue_id for s in steps])
        self.summary.moved += len(handed)
        for step in steps:
            if step.queue_id not in handed:
                continue
            if step.by_admin:
                self._say(logging.INFO, step.message, "move", "%s: action=move to=default-queue", step.queue_id,
                          reason=step.reason)
            else:
                self._say(logging.INFO, step.message, "handback", "%s: action=handback reason=%s", step.queue_id,
                          quote(step.reason), reason=step.reason)

    def return_to_sender(self, steps: Sequence[Expire]) -> None:
        """Past max_hold_age with ``on_hold_expiry = "bounce"``: the MTA gives up on each and bounces it.

        A hold of qrunner's is marked ``releasing`` first, so that a crash
        leaves a record the next run settles from the queue (still held:
        qrunner's again; gone: forgotten); each one the MTA confirmed gone
        is forgotten. One the MTA did not give up on (being delivered, or no
        longer there) is tried again by the next run, if still queued.
        """
        if not steps:
            return
        self.state.mark_releasing(s.key for s in steps)
        returned = self.backend.give_up([s.queue_id for s in steps])
        self.state.forget(s.key for s in steps if s.queue_id in returned)
        for step in steps:
            if step.queue_id in returned:
                self.summary.expired += 1
                self._count("expired", "")
                self._say(logging.WARNING, step.message, "expire", "%s: action=expire to=return-path reason=%s",
                          step.queue_id, quote(step.reason), reason=step.reason)
            else:
                self._say(logging.INFO, step.message, "vanished", "%s: action=vanished (not returned to its sender: "
                          "no longer in the queue, or being delivered)", step.queue_id)

    # -- holds -----------------------------------------------------------------

    def hold(self, decisions: Sequence[Decision]) -> None:
        self._in_chunks("holding", decisions, self._hold)

    def _hold(self, decisions: Sequence[Decision]) -> None:
        self.state.record_holding((d.key, d.senders, d.reason, d.message.sender, d.priority) for d in decisions)
        confirmed = self.backend.hold([d.queue_id for d in decisions])
        # An unconfirmed hold keeps its 'holding' record: the next run's reconcile
        # settles it from the queue, so a hold the MTA made but did not report can
        # never pass for an admin's.
        self.state.mark_held(d.key for d in decisions if d.queue_id in confirmed)
        for decision in decisions:
            if decision.queue_id in confirmed:
                self._count("held", decision.senders)
                self._say(logging.INFO, decision.message, "hold", "%s: action=hold sender=%s priority=%d reason=%s",
                          decision.queue_id, decision.senders, decision.priority, quote(decision.reason),
                          priority=decision.priority, sender=decision.senders, reason=decision.reason)
            else:
                self._say(logging.INFO, decision.message, "vanished", "%s: action=vanished (not confirmed on hold: "
                          "no longer in the queue?); the next run settles its record", decision.queue_id,
                          recorded=Event(decision.key, "vanished", decision.senders, decision.priority,
                                         "not confirmed on hold: no longer in the queue?"))
        self.summary.held += len(confirmed)

    def keep(self, decisions: Sequence[Decision], named: bool = False) -> None:
        """Holds that stay: the latest run's senders and reason; said when the admin named them (flush)."""
        for decision in decisions:
            self._say(logging.INFO if named else logging.DEBUG, decision.message, "keep",
                      "%s: action=keep sender=%s reason=%s", decision.queue_id, decision.senders,
                      quote(decision.reason), sender=decision.senders, reason=decision.reason, recorded=False)
        self.state.update_reason((d.key, d.senders, d.reason, d.message.sender, d.priority) for d in decisions)

    def release(self, steps: Sequence[Release]) -> None:
        self._in_chunks("releasing", steps, self._release)

    def _release(self, steps: Sequence[Release]) -> None:
        self.state.mark_releasing(s.key for s in steps)
        confirmed = self.backend.release([s.queue_id for s in steps])
        # An unconfirmed release keeps its 'releasing' record: the next run's reconcile
        # makes it 'held' again if the message is still held, so no hold loses its record.
        self.state.forget(s.key for s in steps if s.queue_id in confirmed)
        for step in steps:
            if step.queue_id in confirmed:
                self._count("released", "")
                self._say(logging.INFO, step.message, "release", "%s: action=release", step.queue_id,
                          reason=step.reason)
            elif step.by_admin:
                self.summary.failed += 1
                self._say(logging.ERROR, step.message, "release", "%s: action=release failed (being delivered, or "
                          "gone?); the next run settles its record", step.queue_id,
                          recorded=Event(step.key, "release failed", reason="being delivered, or gone?"))
            else:
                self._say(logging.INFO, step.message, "vanished", "%s: action=vanished (not released: no longer on "
                          "hold)", step.queue_id, recorded=Event(step.key, "vanished", reason="not released: no longer "
                                                                 "on hold"))
        self._not_released.update(s.queue_id for s in steps if s.queue_id not in confirmed)
        self.summary.released += len(confirmed)

    # -- sends -----------------------------------------------------------------

    def send(self, sends: Sequence[Send], run_id: int) -> None:
        """Every send in dispatch order, each by its route; then the run's dispatch record.

        Each outcome is logged and recorded as the back end reports it
        (:meth:`sent`), so a failure later in the batch cannot take the
        record of what already left with it: the dispatch record is written
        even then.
        """
        sends = [s for s in sends if s.queue_id not in self._not_released]
        if not sends:
            return
        self._sending = {s.queue_id: s for s in sends}
        completed = False
        try:
            if self.rate:
                self._in_chunks("sending", sends, self._dispatch, paced=True)
            else:
                with self.progress.bar("sending", len(sends)) as self._tick:
                    self._dispatch(sends)
            completed = True
        finally:
            self._tick = _no_tick
            if completed:
                for send in sends:
                    if send.queue_id not in self._outcomes:
                        self.sent(SendRequest(send.message, send.route), Outcome(Result.FAILED, "not dispatched"))
            rows = [(seq, s.key, s.priority, s.decision.senders, str(self._outcomes[s.queue_id]))
                    for seq, s in enumerate(sends, 1) if s.queue_id in self._outcomes]
            self.state.record_dispatches(run_id, rows)
            self.state.note_attempts(s.key for s in sends if s.queue_id in self._outcomes
                                     and self._outcomes[s.queue_id].result is Result.DEFERRED)

    def _dispatch(self, sends: Sequence[Send]) -> None:
        self.backend.send([SendRequest(s.message, s.route, s.from_hold, s.priority, forced=s.overridden)
                           for s in sends], self)

    def _report(self, send: Send, outcome: Outcome) -> None:
        """The log line of one send; a failed hand-over leaves the original held with the failure as reason."""
        senders = send.decision.senders
        if outcome.result is Result.VANISHED:
            self._say(logging.INFO, send.message, "vanished", "%s: action=vanished (no longer waiting: delivered, "
                      "deleted or being delivered)", send.queue_id,
                      recorded=Event(send.key, "vanished", senders, send.priority,
                                     "no longer waiting: delivered, deleted or being delivered"))
        elif outcome.result is Result.FAILED:
            self.summary.failed += 1
            if send.route is not None:
                self.state.update_reason([(send.key, senders, f"hand-over to sender {senders} failed: "
                                           f"{outcome.detail}", send.message.sender, send.priority)])
            if send.expired:
                self._say(logging.ERROR, send.message, "expire", "%s: action=expire to=default-route failed: %s",
                          send.queue_id, outcome.detail, priority=send.priority, reason=outcome.detail,
                          recorded=Event(send.key, "expire failed", "", send.priority, outcome.detail))
            else:
                self._say(logging.ERROR, send.message, "send", "%s: action=send sender=%s failed: %s", send.queue_id,
                          senders, outcome.detail, priority=send.priority, sender=senders, reason=outcome.detail,
                          recorded=Event(send.key, "send failed", senders, send.priority, outcome.detail))
        elif outcome.result is Result.ROUTED:
            self.summary.sent += 1
            self._count("sent", senders)
            self._count("routed", senders)
            if outcome.original_removed:
                self.state.forget([send.key])
            self._say(logging.INFO, send.message, "route", "%s: action=route sender=%s priority=%d new_queue_id=%s%s",
                      send.queue_id, senders, send.priority, outcome.new_id,
                      "" if outcome.original_removed else " (original not deleted yet: the next run deletes it)",
                      priority=send.priority, sender=senders, new_id=outcome.new_id)
        elif send.expired:
            self.summary.expired += 1
            self._count("expired", "")
            self._say(logging.WARNING, send.message, "expire", "%s: action=expire to=default-route priority=%d%s "
                      "reason=%s", send.queue_id, send.priority,
                      "" if outcome.result is Result.SCHEDULED else f" result={outcome}", quote(send.reason),
                      priority=send.priority, reason=send.reason)
        else:
            self.summary.sent += 1
            self._count("sent", senders)
            self._say(logging.INFO, send.message, "send", "%s: action=send sender=%s priority=%d%s%s", send.queue_id,
                      senders, send.priority, " policy=overridden" if send.overridden else "",
                      "" if outcome.result is Result.SCHEDULED else f" result={outcome}",
                      priority=send.priority, sender=senders, reason=send.reason)

    # -- the hand-over journal (see qrunner.mta.base.HandOverJournal) ------------

    def holding(self, requests: Sequence[SendRequest]) -> None:
        """Recorded before the hold; one of qrunner's holds keeps its state and age, with the new reason."""
        sends = [self._sending[r.message.queue_id] for r in requests]
        self.state.record_holding((s.key, s.decision.senders, f"being handed to sender {s.decision.senders}",
                                   s.message.sender, s.priority) for s in sends)

    def held(self, requests: Sequence[SendRequest], confirmed: Set[str]) -> None:
        self.state.mark_held(MessageKey.of(r.message) for r in requests if r.message.queue_id in confirmed)

    def copied(self, request: SendRequest, new_id: str) -> None:
        send = self._sending[request.message.queue_id]
        self.state.record_copy(new_id, send.key, send.decision.senders)

    def sent(self, request: SendRequest, outcome: Outcome) -> None:
        send = self._sending[request.message.queue_id]
        self._outcomes[send.queue_id] = outcome
        self._report(send, outcome)
        self._tick(1)

