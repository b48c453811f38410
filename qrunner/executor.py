"""The executor: the one place where qrunner changes the queue.

It carries out a :class:`~qrunner.plan.Plan` in the order that makes a
crash harmless: every change is recorded in the state database before the
MTA is asked, confirmed from the MTA's answer, then marked done, so that
the next run's reconcile can settle whatever a crash left half-way. Each
action writes one log line in Postfix's style (``ID: action=hold ...``);
admins grep these, so their format is fixed (tests/test_log_format.py).
Each action is also kept in the state database's history, written once per
step of the plan (not once per message), which ``qrunner explain`` shows.

Pacing that depends on the moment (``max_active``, ``max_run_seconds``,
strict priority) acts here, while the run hands over: the sends go to the
back end in steps, the limits are looked at between steps (the back end
says how much it is delivering, and whether a level has left), and what a
limit stops waits where it is for the next run, with its reason.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from qrunner.config import NO_PACING, Pacing
from qrunner.decision import Decision, MessageKey
from qrunner.exceptions import StateError
from qrunner.message import Message
from qrunner.mta.base import Backend, Outcome, Result, SendRequest
from qrunner.plan import Expire, HandBack, Plan, Release, ReleaseCopy, Remove, RemoveCopy, Send, Wait
from qrunner.progress import NONE as NO_PROGRESS, Progress, Tick, no_tick
from qrunner.state import Event, RunSummary, State

log = logging.getLogger("qrunner")

CHUNK = 1000  # messages per step of a long hold, release or move while a progress bar is drawn
# Actions kept in memory before they are written to the history: a stage that holds 100,000 messages
# must not keep an Event per message until it ends (about 200 bytes each); one transaction per this many.
HISTORY_BATCH = 5000


def quote(text: str) -> str:
    """A value for a ``key="..."`` log field, on one line."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def seconds(value: float) -> str:
    """A number of seconds as the admin wrote it: 300, 2.5."""
    return f"{value:g}"


class Stage(NamedTuple):
    """One stage of :meth:`Executor.execute`: the method that takes it and its share of the plan (its arguments)."""

    name: str
    share: Callable[[Plan, Set[MessageKey], int], tuple]


# The stages of every run, in order. A hold the policy now allows and this run sends is released in the send
# stage, just before its send. tests/test_faults.py kills a run in each stage (and at each call a stage makes
# to the state or the back end): a stage added here without a fault case fails the suite.
STAGES: Tuple[Stage, ...] = (
    Stage("remove", lambda plan, sending, run_id: (plan.remove,)),
    Stage("release_copies", lambda plan, sending, run_id: (plan.release_copies,)),
    Stage("hold", lambda plan, sending, run_id: (plan.hold,)),
    Stage("keep", lambda plan, sending, run_id: (plan.keep, plan.named)),
    Stage("release", lambda plan, sending, run_id: ([r for r in plan.release if r.key not in sending],)),
    Stage("hand_back", lambda plan, sending, run_id: (plan.hand_back,)),
    Stage("return_to_sender", lambda plan, sending, run_id: ([step for step in plan.expire if step.bounce],)),
    Stage("send", lambda plan, sending, run_id: (plan.send, run_id, [r for r in plan.release if r.key in sending])),
)


class Executor:
    """Carries out one plan against one back end, recording each step in ``state``.

    ``pacing``: the limits that act while the run hands over; ``started``:
    when the run began (``time.monotonic()``), which ``max_run_seconds``
    counts from, so that deciding counts too. ``progress`` draws the bars of
    long steps; ``rate`` (``--rate``) paces the sends and moves.
    """

    def __init__(self, backend: Backend, state: State, summary: RunSummary, pacing: Pacing = NO_PACING,
                 started: Optional[float] = None, progress: Progress = NO_PROGRESS, rate: Optional[float] = None):
        self.backend = backend
        self.state = state
        self.summary = summary
        self.pacing = pacing
        self.progress = progress
        self.rate = rate  # messages per second handed to the MTA's delivery (flush, release --to-default-queue)
        self._tick: Tick = no_tick
        self._rate_from: Optional[float] = None  # when the first paced step of --rate started
        self._rate_count = 0  # messages --rate has let through since then
        started = time.monotonic() if started is None else started
        self.deadline = started + pacing.max_run_seconds if pacing.max_run_seconds else None
        self._not_released: Set[str] = set()
        self._not_removed: Set[str] = set()  # recovery removals the MTA did not confirm: their copies stay held
        self._sending: Dict[str, Send] = {}
        self._outcomes: Dict[str, Outcome] = {}
        self._room: Optional[int] = 0  # max_active: how many more the MTA may take before it is asked again
        self._handed_any = False   # a run always hands over its first step, however long deciding took
        self._warned_slow = False
        self.paced: List[Wait] = []  # what a limit left for the next run while handing over
        self._seq = 0              # the run's dispatch records, in order
        self.run_id: Optional[int] = None
        self.tally: Dict[Tuple[str, str], int] = {}  # (counter, sender) -> how many this run: the metrics' counters
        self._events: List[Event] = []  # this step's actions, for the history (written by _write_history)
        self._history_failed = False  # a mid-step write of the history failed: the step's end tries again

    def _in_chunks(self, what: str, items: Sequence, act: Callable[[Sequence], None], paced: bool = False) -> None:
        """``act`` on ``items`` a chunk at a time, so a long stage shows progress and a paced one keeps its rate.

        Each chunk is recorded, acted on and confirmed before the next (the
        crash-safe order holds per chunk). Paced (``rate``), a chunk is as
        many messages as one second allows and starts no earlier than the
        rate lets it. With no bar to draw (cron, the timer, ``-q``) the
        whole stage is one chunk: one record, one call to the MTA (the back
        end splits it where a command line would grow too long) and one
        confirmation, not a process and two transactions per thousand. A
        crash leaves no more than it could before: each message of the
        chunk is held with its record, or its record says ``holding`` (or
        ``releasing``) and the next run settles it from the queue.
        """
        if paced and self.rate:
            size = max(1, int(self.rate))
        else:
            size = CHUNK if self.progress.enabled else max(1, len(items))
        with self.progress.bar(what, len(items)) as tick:
            for done in range(0, len(items), size):
                chunk = items[done:done + size]
                if paced and self.rate:
                    self._keep_rate(len(chunk))
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
        if len(self._events) >= HISTORY_BATCH and not self._history_failed:
            self._write_some_history()

    def execute(self, plan: Plan, run_id: int) -> None:
        """Every action of the plan, in the crash-safe order; each step's history written as it ends.

        A hold the policy now allows and this run sends is released just
        before its send (in the same step), so that one a pacing limit
        leaves for the next run stays on hold.
        """
        self.run_id = run_id
        sending = {s.key for s in plan.send}
        try:
            for stage in STAGES:
                getattr(self, stage.name)(*stage.share(plan, sending, run_id))
                self._write_history()
        finally:
            self._write_history()  # what a failing step did before it failed
        self.wait(self.paced + plan.wait)

    def wait(self, waits: Sequence[Wait]) -> None:
        """The allowed messages not sent this run, each with its reason; a paced one is recorded.

        A paced hold of qrunner's stays held, its record saying why; a paced
        waiting message gets a line in the run's dispatch record. Both are
        the next run's to send.
        """
        rows = []
        for wait in waits:
            d = wait.decision
            if wait.paced:
                self._count("paced", d.senders)
                self._say(logging.INFO, d.message, "wait", "%s: action=wait sender=%s priority=%d reason=%s",
                          wait.queue_id, d.senders, d.priority, quote(wait.reason),
                          priority=d.priority, sender=d.senders, reason=wait.reason, recorded=False)
                self._seq += 1
                rows.append((self._seq, wait.key, d.priority, d.senders, f"not sent: {wait.paced}"))
                continue
            self._say(logging.INFO, d.message, "wait", "%s: action=wait sender=%s priority=%d next_retry=%s reason=%s",
                      wait.queue_id, d.senders, d.priority,
                      time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wait.until)), quote(wait.reason),
                      priority=d.priority, sender=d.senders, reason=wait.reason, recorded=False)
        held = [w for w in waits if w.paced and w.message.held]
        if held:
            self.state.update_reason((w.key, w.decision.senders, f"allowed by sender {w.decision.senders}; "
                                      f"{w.paced}", w.message.sender, w.decision.priority) for w in held)
        if rows and self.run_id is not None:
            self.state.record_dispatches(self.run_id, rows)

    def _write_history(self) -> None:
        """What the step did so far, in one transaction."""
        events, self._events = self._events, []
        if events and self.run_id is not None:
            self.state.record_history(self.run_id, events)
            self._history_failed = False

    def _write_some_history(self) -> None:
        """Mid-step (every HISTORY_BATCH actions): a write that fails is left to the step's end, where it is
        tried again and stops the run, so that what the step already did to the queue is still logged (and
        a locked database costs its busy timeout once, not once per action)."""
        events = self._events
        try:
            self._write_history()
        except StateError:
            self._events = events  # written at the step's end, or the run stops there
            self._history_failed = True

    # -- recovery ------------------------------------------------------------

    def remove(self, steps: Sequence[Remove]) -> None:
        """Originals whose copy a sender's route already accepted: handing them over again would send twice."""
        if not steps:
            return
        removed = self.backend.remove([s.queue_id for s in steps])
        self._not_removed.update(s.queue_id for s in steps if s.queue_id not in removed)
        self.state.forget(s.key for s in steps if s.queue_id in removed)
        self.state.forget_copies(s.queue_id for s in steps if isinstance(s, RemoveCopy) and s.queue_id in removed)
        for step in steps:
            if step.queue_id in removed:
                self._say(logging.INFO, step.message, "delete", "%s: action=delete reason=%s", step.queue_id,
                          quote(step.reason), reason=step.reason)

    def release_copies(self, steps: Sequence[ReleaseCopy]) -> None:
        """Copies on the listener's hold whose original is gone (or was just removed): released to their route.

        One whose original this run could not remove stays held for the
        next run: released now, it would leave beside its original.
        """
        steps = [s for s in steps if s.original not in self._not_removed]
        if not steps:
            return
        released = self.backend.release_copies([s.queue_id for s in steps])
        self.state.mark_copies_released(s.queue_id for s in steps if s.queue_id in released)
        for step in steps:
            if step.queue_id in released:
                self._say(logging.INFO, step.message, "release", "%s: action=release reason=%s", step.queue_id,
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

    def send(self, sends: Sequence[Send], run_id: int, releases: Sequence[Release] = ()) -> None:
        """Every send in dispatch order, each by its route, paced; then the run's dispatch record.

        ``releases``: the holds among ``sends`` to release first, each just
        before its step. Each outcome is logged and recorded as the back end
        reports it (:meth:`sent`), so a failure later in the batch cannot
        take the record of what already left with it: the dispatch record is
        written even then. What a pacing limit stops is in :attr:`paced`.
        """
        if not sends:
            return
        self._sending = {s.queue_id: s for s in sends}
        handed: List[Send] = []
        completed = False
        try:
            with self.progress.bar("sending", len(sends)) as self._tick:
                self.paced = self._hand_over(list(sends), {r.key: r for r in releases}, handed)
            completed = True
        finally:
            self._tick = no_tick
            if completed:
                for send in handed:
                    if send.queue_id not in self._outcomes:
                        self.sent(SendRequest(send.message, send.route), Outcome(Result.FAILED, "not dispatched"))
            rows = [(seq, s.key, s.priority, s.decision.senders, str(self._outcomes[s.queue_id]))
                    for seq, s in enumerate(handed, 1) if s.queue_id in self._outcomes]
            self._seq = len(handed)
            self.state.record_dispatches(run_id, rows)
            self.state.note_attempts(s.key for s in handed if s.queue_id in self._outcomes
                                     and self._outcomes[s.queue_id].result is Result.DEFERRED)

    # -- pacing while handing over ------------------------------------------------

    def _hand_over(self, sends: List[Send], releases: Dict[MessageKey, Release], handed: List[Send]) -> List[Wait]:
        """Hand the sends over, level by level under strict priority; the waits for what a limit stopped."""
        levels = [list(group) for _, group in itertools.groupby(sends, key=lambda s: s.priority)] \
            if self.pacing.strict_priority else [sends]
        for number, level in enumerate(levels):
            later = [s for rest in levels[number + 1:] for s in rest]
            stopped = self._hand_over_level(level, releases, handed)
            if stopped is not None:
                index, reason = stopped
                return [Wait(s.decision, paced=reason) for s in level[index:] + later]
            reason = self._wait_for_level(level) if later else None
            if reason is not None:
                return [Wait(s.decision, paced=reason) for s in later]
        return []

    def _hand_over_level(self, level: List[Send], releases: Dict[MessageKey, Release],
                         handed: List[Send]) -> Optional[Tuple[int, str]]:
        """One level (or, without strict priority, every send) in steps; (where, why) a limit stopped it."""
        paced = self.pacing.max_active or self.pacing.max_run_seconds
        done = 0
        while done < len(level):
            reason = self._limit_reached()
            if reason is not None:
                return done, reason
            step = self.backend.hand_over_batch if paced else len(level)
            if self.pacing.max_active and self._room is not None:
                step = min(step, self._room)
            if self.rate:
                step = min(step, max(1, int(self.rate)))
            chunk = level[done:done + step]
            if self.rate:
                self._keep_rate(len(chunk))
            done += len(chunk)
            self._send_step(chunk, releases, handed)
        return None

    def _keep_rate(self, count: int) -> None:
        """``--rate``: wait until ``count`` more messages may go to the MTA, one clock for the moves and the sends."""
        now = time.monotonic()
        if self._rate_from is None:
            self._rate_from = now
        else:
            time.sleep(max(0.0, self._rate_from + self._rate_count / self.rate - now))
        self._rate_count += count

    def _limit_reached(self) -> Optional[str]:
        """Why the run may hand over nothing more now, or None; ``max_active`` asks the MTA when the room is used up."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            if self._handed_any:
                return f"max_run_seconds ({seconds(self.pacing.max_run_seconds)}) reached: left for the next run"
            if not self._warned_slow:
                self._warned_slow = True
                log.warning("deciding took longer than max_run_seconds (%s): this run hands over its first step "
                            "only; raise max_run_seconds or make the policy faster",
                            seconds(self.pacing.max_run_seconds))
        if self.pacing.max_active and self._room is not None and self._room <= 0:
            active = self.backend.delivering()
            if active is None:
                log.warning("max_active is set, but this MTA cannot say how much it is delivering; not applied")
                self._room = None
            else:
                self._room = self.pacing.max_active - active
                if self._room <= 0:
                    return (f"max_active ({self.pacing.max_active}) reached: the MTA is delivering {active} "
                            f"message{'' if active == 1 else 's'}; left for the next run")
        return None

    def _send_step(self, chunk: List[Send], releases: Dict[MessageKey, Release], handed: List[Send]) -> None:
        """Release the step's holds, then hand its messages to the back end (one ``send`` call)."""
        self.release([releases[s.key] for s in chunk if s.key in releases])
        chunk = [s for s in chunk if s.queue_id not in self._not_released]
        if not chunk:
            return
        handed.extend(chunk)
        self._handed_any = True
        if self.pacing.max_active and self._room is not None:
            self._room -= len(chunk)
        self.backend.send([SendRequest(s.message, s.route, s.from_hold, s.priority, forced=s.overridden)
                           for s in chunk], self)

    def _wait_for_level(self, level: List[Send]) -> Optional[str]:
        """Strict priority: wait until the level's messages have left the MTA's delivery; why not, or None.

        Watched are the messages the MTA took to deliver on its own
        (scheduled, or a routed copy by its new id); an attempt that is
        known to have ended (Exim's ``-Mc`` returned) has left already. The
        wait ends at ``strict_priority_wait``, or at the run's deadline.
        """
        watch = [self._watched_id(s) for s in level]
        watch = [queue_id for queue_id in watch if queue_id]
        if not watch:
            return None
        now = time.monotonic()
        until = now + self.pacing.strict_priority_wait
        if self.deadline is not None:
            until = min(until, self.deadline)
        pause = 0.05
        while True:
            left = self.backend.still_delivering(watch)
            if left is None:
                log.warning("strict_priority is set, but this MTA cannot say whether a level has left its delivery; "
                            "not waited for")
                return None
            if not left:
                return None
            watch = sorted(left)
            now = time.monotonic()
            if now >= until:
                break
            time.sleep(min(pause, until - now))
            pause = min(pause * 2, 1.0)
        priority = level[0].priority
        if self.deadline is not None and now >= self.deadline:
            return (f"max_run_seconds ({seconds(self.pacing.max_run_seconds)}) reached while priority {priority} "
                    "was still being delivered: left for the next run")
        log.warning("strict_priority: %d messages of priority %d had not left the MTA's delivery after "
                    "strict_priority_wait (%s s): the lower priorities wait for the next run (%s)", len(watch),
                    priority, seconds(self.pacing.strict_priority_wait), " ".join(watch[:10]))
        return (f"strict_priority: priority {priority} had not left the MTA's delivery after strict_priority_wait "
                f"({seconds(self.pacing.strict_priority_wait)} s): left for the next run")

    def _watched_id(self, send: Send) -> str:
        """The id to watch until it leaves the MTA's delivery: "" when it has left or was never taken."""
        outcome = self._outcomes.get(send.queue_id)
        if outcome is None:
            return ""
        if outcome.result is Result.SCHEDULED:
            return send.queue_id
        if outcome.result is Result.ROUTED:
            return outcome.new_id
        return ""

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
            if not outcome.original_removed or outcome.copy_held:
                self.summary.unfinished += 1  # the MTA would not: a monitor should hear of it now, not next run
            later = ("" if outcome.original_removed else " (original not deleted yet: the next run deletes it"
                     + (", then releases the copy)" if outcome.copy_held else ")"))
            if outcome.original_removed and outcome.copy_held:
                later = (" (copy not confirmed released from its listener's hold: the next run releases it if "
                         "still held)")
            self._say(logging.INFO, send.message, "route", "%s: action=route sender=%s priority=%d new_queue_id=%s%s",
                      send.queue_id, senders, send.priority, outcome.new_id, later,
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

    def copied(self, request: SendRequest, new_id: str, held: bool = False) -> None:
        send = self._sending[request.message.queue_id]
        self.state.record_copy(new_id, send.key, send.decision.senders, held=held)

    def copy_released(self, request: SendRequest, new_id: str) -> None:
        self.state.mark_copies_released([new_id])

    def sent(self, request: SendRequest, outcome: Outcome) -> None:
        send = self._sending[request.message.queue_id]
        self._outcomes[send.queue_id] = outcome
        self._report(send, outcome)
        self._tick(1)

