"""One run: lock, list, decide, plan, execute, record.

The order of every write is what makes a crash harmless: a hold is recorded,
then made, then marked done; a release is marked, then made, then the record
dropped. The next run reconciles whatever a crash left half-way before it
does anything else (see :mod:`qrunner.state`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from qrunner.config import Config, Sender, check_routes
from qrunner.message import Message
from qrunner.mta.base import HandOverError
from qrunner.plan import Plan, make_plan, message_key
from qrunner.policy import Decision, PolicyEngine, PolicySettings
from qrunner.state import RunLock, RunSummary, State

log = logging.getLogger("qrunner")

OVERRIDDEN = "policy overridden by the admin"  # the reason of a flush --ignore-policy decision


def quote(text: str) -> str:
    """A value for a ``key="..."`` log field, on one line."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ").replace("\r", " ") + '"'


def queue_map(messages: Sequence[Message]) -> Dict[Tuple[str, int], str]:
    """(queue id, arrival second) -> where the message is: "hold" when held, else its queue's name."""
    return {(m.queue_id, int(m.arrival)): "hold" if m.held else m.queue_name for m in messages}


def is_routed_copy(message: Message, routed: Dict[str, Tuple[float, float]]) -> bool:
    """A copy qrunner handed to a sender: same id, and it arrived while the hand-over ran.

    The time window tells the copy from a later message that reuses the
    short queue id (Postfix does), which must be decided like any other.
    """
    window = routed.get(message.queue_id)
    return window is not None and window[0] - 2 <= message.arrival <= window[1] + 2


def routed_sender(decision: Decision) -> bool:
    """Does this send go by a sender's own route rather than the MTA's routing?"""
    return decision.sender is not None and not decision.sender.default


def senders_of(decision: Decision) -> str:
    """Who decided: the sending sender, or every sender that skipped."""
    if decision.sender is not None:
        return decision.sender.name
    return ",".join(v.sender.name for v in decision.verdicts) or "-"


def decide_offline(policy: PolicySettings, senders: Sequence[Sender], backend=None) -> List[Decision]:
    """``plan --queue-file`` and ``check``: the list and decide stages only; nothing acts, no lock.

    Every sender's script is loaded, even for a sender no message reaches,
    so a script that fails to load for any sender stops here (exit 78).
    Without a back end (``check`` with no snapshot) nothing is decided.
    """
    messages = backend.list_messages() if backend is not None else None
    with PolicyEngine(policy) as engine:
        if messages is not None:
            return engine.decide(messages, senders)  # each sender's pass loads its script first
        for sender in senders:
            engine.load(sender)
        return []


@dataclass
class RunResult:
    """What a run decided and did; the CLI prints it and picks the exit code."""

    decisions: List[Decision]
    plan: Plan
    summary: RunSummary
    senders: Sequence[Sender] = ()
    hands_over: bool = False
    run_id: Optional[int] = None
    not_candidates: List[str] = field(default_factory=list)

    @property
    def policy_errors(self) -> int:
        return sum(1 for d in self.decisions if d.errors)


class Runner:
    """Runs the pipeline against one MTA back end."""

    def __init__(self, config: Config, backend, policy: PolicySettings, senders: Sequence[Sender]):
        self.config = config
        self.backend = backend
        self.policy = policy
        self.senders = senders

    # -- the job -----------------------------------------------------------

    def run(self, command: str = "run", dry_run: bool = False, only_ids: Optional[Sequence[str]] = None,
            ignore_policy: bool = False) -> RunResult:
        """A whole run (``run``, ``flush``) or a look at one (``--dry-run``, ``plan``)."""
        check_routes(self.senders, self.backend.name, self.config.path or "the configuration")
        self.backend.check_routes(self.senders)
        if dry_run:
            self.backend.check_running()
            state = State(self.config.state_dir, self.backend.instance, readonly=True)
            try:
                return self._decide_and_plan(command, state, dry_run=True, only_ids=only_ids,
                                             ignore_policy=ignore_policy)
            finally:
                state.close()
        self.backend.check_can_act()
        with RunLock(self.config.state_dir):
            state = State(self.config.state_dir, self.backend.instance)
            try:
                result = self._decide_and_plan(command, state, dry_run=False, only_ids=only_ids,
                                               ignore_policy=ignore_policy)
                self._execute(state, result)
                return result
            finally:
                state.close()

    def _decide_and_plan(self, command: str, state: State, dry_run: bool, only_ids: Optional[Sequence[str]],
                         ignore_policy: bool) -> RunResult:
        if ignore_policy:
            return self._plan(command, state, dry_run, only_ids, None)
        with PolicyEngine(self.policy) as engine:
            if self.senders:
                engine.prepare(self.senders[0])  # Lua starts while the MTA lists its queue
            return self._plan(command, state, dry_run, only_ids, engine)

    def _plan(self, command: str, state: State, dry_run: bool, only_ids: Optional[Sequence[str]],
              engine: Optional[PolicyEngine]) -> RunResult:
        summary = RunSummary(command=command, started=time.time())
        messages = self.backend.list_messages()
        queue = queue_map(messages)
        if not dry_run:
            for note in state.reconcile(queue):
                log.info("%s", note)
        ours = {key for key in state.holds() if queue.get(key) == "hold"}
        self._warn_old_holds(ours)
        routed = state.routed()
        candidates = [m for m in messages if self.backend.is_candidate(m, (m.queue_id, int(m.arrival)) in ours)
                      and not is_routed_copy(m, routed)]
        candidates = self._finish_hand_overs(state, candidates, ours, dry_run)
        candidates = self._hand_back_expired(messages, candidates, ours, dry_run)
        not_candidates: List[str] = []
        if only_ids is not None:
            candidates, not_candidates = self._only(candidates, messages, only_ids)
        summary.listed = len(candidates)
        if engine is None:
            sender = next((s for s in self.senders if s.default), self.senders[0] if self.senders else None)
            decisions = [Decision(m, True, 50, sender, OVERRIDDEN) for m in candidates]
            next_retry: Dict[str, Optional[float]] = {}
        else:
            decisions = engine.decide(candidates, self.senders)
            attempts = state.attempts()
            next_retry = {d.queue_id: self.backend.next_retry(d.message, attempts.get(message_key(d)))
                          for d in decisions if d.send}
        plan = make_plan(decisions, ours, next_retry)
        return RunResult(decisions, plan, summary, self.senders, self.backend.hands_over,
                         not_candidates=not_candidates)

    def _finish_hand_overs(self, state: State, candidates: List[Message], ours: Set[Tuple[str, int]],
                           dry_run: bool) -> List[Message]:
        """Originals whose copy a listener already accepted (a run stopped before the delete): delete them.

        Handing them over again would send the message twice.
        """
        handed = state.handed_over()
        done = [m for m in candidates if (m.queue_id, int(m.arrival)) in handed and (m.queue_id, int(m.arrival)) in ours]
        if not done:
            return candidates
        deleted = {m.queue_id for m in done} if dry_run else self.backend.delete([m.queue_id for m in done])
        for message in done:
            key = (message.queue_id, int(message.arrival))
            copy, sender = handed[key]
            if message.queue_id in deleted:
                if not dry_run:
                    state.forget([key])
                log.info("%s: action=delete reason=%s", message.queue_id,
                         quote(f"already handed to sender {sender} as {copy} by an interrupted run"))
        return [m for m in candidates if m.queue_id not in deleted]

    def _warn_old_holds(self, ours: Set[Tuple[str, int]]) -> None:
        """Nothing should sit on hold unnoticed until releasing it means a bounce."""
        limit = self.backend.hold_age_limit()
        if not limit:
            return
        now = time.time()
        for queue_id, arrival in sorted(ours):
            if now - arrival > limit:
                log.warning("%s: held by qrunner for longer than the MTA's queue lifetime (%d days since arrival): "
                            "it will bounce on its first delivery attempt after release", queue_id,
                            (now - arrival) // 86400)

    def _hand_back_expired(self, messages: Sequence[Message], candidates: List[Message],
                           ours: Set[Tuple[str, int]], dry_run: bool) -> List[Message]:
        """Mail too old to keep (Exim's max_queue_time) goes back to the MTA's own handling.

        Never a hold of qrunner's own (those stay, and each run warns about
        them); waiting mail and mail someone else (or Exim) froze.
        """
        expired = [m for m in messages if (m.queue_id, int(m.arrival)) not in ours and self.backend.is_expired(m)]
        if not expired:
            return candidates
        handed = {m.queue_id for m in expired} if dry_run else self.backend.hand_back([m.queue_id for m in expired])
        for message in expired:
            if message.queue_id in handed:
                log.info("%s: action=handback reason=%s", message.queue_id,
                         quote("older than max_queue_time: handed to the MTA's own retry and freeze rules"))
        return [m for m in candidates if m.queue_id not in handed]

    def _only(self, candidates: List[Message], messages: List[Message],
              only_ids: Sequence[str]) -> Tuple[List[Message], List[str]]:
        """The candidates the admin named; the named ids qrunner may not act on, logged."""
        wanted = set(only_ids)
        chosen = [m for m in candidates if m.queue_id in wanted]
        found = {m.queue_id for m in chosen}
        where = {m.queue_id: m for m in messages}
        missing = []
        for queue_id in only_ids:
            if queue_id in found:
                continue
            missing.append(queue_id)
            if queue_id not in where:
                log.warning("%s: not in the queue; nothing to do", queue_id)
            else:
                log.warning("%s: %s", queue_id, self.backend.why_not_candidate(where[queue_id]))
        return chosen, missing

    # -- execute -------------------------------------------------------------

    def _execute(self, state: State, result: RunResult) -> None:
        plan, summary = result.plan, result.summary
        run_id = result.run_id = state.start_run(summary)
        try:
            handed = [d for d in plan.send if routed_sender(d)] if self.backend.hands_over else []
            handed_ids = {d.queue_id for d in handed}
            self._hold(state, plan, summary)
            self._release(state, [d for d in plan.release if d.queue_id not in handed_ids], summary)
            outcomes = self._hand_over(state, handed, {message_key(d) for d in plan.release}, summary)
            self._send(state, run_id, plan, summary, [d for d in plan.send if d.queue_id not in handed_ids],
                       outcomes)
            for decision, retry in plan.wait:
                log.info("%s: action=wait sender=%s priority=%d next_retry=%s", decision.queue_id,
                         senders_of(decision), decision.priority,
                         time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(retry)))
            summary.errors = result.policy_errors
            summary.outcome = "ok"
        except BaseException as exc:
            summary.outcome = f"failed: {exc}"
            raise
        finally:
            summary.finished = time.time()
            state.finish_run(run_id, summary)
            log.info("%s: listed=%d sent=%d held=%d released=%d errors=%d seconds=%.2f", summary.command,
                     summary.listed, summary.sent, summary.held, summary.released, summary.errors,
                     summary.seconds)

    def _hold(self, state: State, plan: Plan, summary: RunSummary) -> None:
        for decision in plan.keep:
            log.debug("%s: action=keep sender=%s reason=%s", decision.queue_id, senders_of(decision),
                      quote(decision.reason))
        state.update_reason((d.queue_id, int(d.message.arrival), senders_of(d), d.reason) for d in plan.keep)
        if not plan.hold:
            return
        state.record_holding((d.queue_id, int(d.message.arrival), senders_of(d), d.reason) for d in plan.hold)
        confirmed = self.backend.hold([d.queue_id for d in plan.hold])
        # An unconfirmed hold keeps its 'holding' record: the next run's
        # reconcile settles it from the queue, so a hold the MTA made but did
        # not report can never pass for an admin's.
        state.mark_held(message_key(d) for d in plan.hold if d.queue_id in confirmed)
        for decision in plan.hold:
            if decision.queue_id in confirmed:
                log.info("%s: action=hold sender=%s priority=%d reason=%s", decision.queue_id,
                         senders_of(decision), decision.priority, quote(decision.reason))
            else:
                log.info("%s: action=vanished (not confirmed on hold: no longer in the queue?); "
                         "the next run settles its record", decision.queue_id)
        summary.held = len(confirmed)

    def _release(self, state: State, decisions: Sequence[Decision], summary: RunSummary) -> Set[str]:
        if not decisions:
            return set()
        state.mark_releasing(message_key(d) for d in decisions)
        confirmed = self.backend.release([d.queue_id for d in decisions])
        # An unconfirmed release keeps its 'releasing' record: the next run's reconcile
        # makes it 'held' again if the message is still held, so no hold loses its record.
        state.forget(message_key(d) for d in decisions if d.queue_id in confirmed)
        for decision in decisions:
            if decision.queue_id in confirmed:
                log.info("%s: action=release", decision.queue_id)
            else:
                log.info("%s: action=vanished (not released: no longer on hold)", decision.queue_id)
        summary.released += len(confirmed)
        return confirmed

    def _hand_over(self, state: State, decisions: List[Decision], held_by_us: Set[Tuple[str, int]],
                   summary: RunSummary) -> Dict[str, str]:
        """Postfix: give each message to its sender's listener, then delete the original.

        The original is held (recorded first) before the copy is made, so a
        failure leaves it held with the failure as its reason, and a crash
        between the listener's acceptance and the delete leaves at worst a
        duplicate, never a loss. Returns queue id -> outcome.
        """
        outcomes: Dict[str, str] = {}
        if not decisions:
            return outcomes
        reason = {d.queue_id: f"being handed to sender {d.sender.name}" for d in decisions}
        fresh = [d for d in decisions if message_key(d) not in held_by_us]
        fresh_ids = {d.queue_id for d in fresh}
        state.record_holding((d.queue_id, int(d.message.arrival), d.sender.name, reason[d.queue_id]) for d in fresh)
        state.update_reason((d.queue_id, int(d.message.arrival), d.sender.name, reason[d.queue_id])
                            for d in decisions if d.queue_id not in fresh_ids)
        confirmed = self.backend.hold([d.queue_id for d in fresh]) if fresh else set()
        state.mark_held(message_key(d) for d in fresh if d.queue_id in confirmed)
        for decision in decisions:
            if decision.queue_id in fresh_ids and decision.queue_id not in confirmed:
                outcomes[decision.queue_id] = "vanished"
                continue
            started = time.time()
            try:
                new_id = self.backend.hand_over(decision.message, decision.sender)
            except HandOverError as error:
                outcomes[decision.queue_id] = f"failed: {error}"
                state.update_reason([(decision.queue_id, int(decision.message.arrival), decision.sender.name,
                                      f"hand-over to sender {decision.sender.name} failed: {error}")])
                continue
            state.record_routed(new_id, message_key(decision), decision.sender.name, started, time.time())
            outcomes[decision.queue_id] = f"routed as {new_id}"
            # One delete per original, right away: a crash can then leave at most this one
            # original behind, and the next run deletes it instead of handing it over again.
            deleted = decision.queue_id in self.backend.delete([decision.queue_id])
            if deleted:
                state.forget([message_key(decision)])
            log.info("%s: action=route sender=%s priority=%d new_queue_id=%s%s", decision.queue_id,
                     decision.sender.name, decision.priority, new_id,
                     "" if deleted else " (original not deleted yet: the next run deletes it)")
        return outcomes

    def _send(self, state: State, run_id: int, plan: Plan, summary: RunSummary, direct: List[Decision],
              outcomes: Dict[str, str]) -> None:
        routes = {d.queue_id: d.sender for d in direct if routed_sender(d)}
        if direct:
            outcomes.update(self.backend.dispatch([d.message for d in direct], routes))
        rows = []
        for seq, decision in enumerate(plan.send, 1):
            outcome = outcomes.get(decision.queue_id, "failed: not dispatched")
            if outcome == "vanished":
                log.info("%s: action=vanished (no longer waiting: delivered, deleted or being delivered)",
                         decision.queue_id)
            elif outcome.startswith("failed"):
                summary.failed += 1
                log.error("%s: action=send sender=%s %s", decision.queue_id, senders_of(decision), outcome)
            elif outcome.startswith("routed"):
                summary.sent += 1
            else:
                summary.sent += 1
                log.info("%s: action=send sender=%s priority=%d%s%s", decision.queue_id, senders_of(decision),
                         decision.priority, " policy=overridden" if decision.reason == OVERRIDDEN else "",
                         "" if outcome == "scheduled" else f" result={outcome}")
            rows.append((seq, decision.queue_id, int(decision.message.arrival), decision.priority,
                         senders_of(decision), outcome))
        state.record_dispatches(run_id, rows)
        state.note_attempts(message_key(d) for d in plan.send if outcomes.get(d.queue_id) == "deferred")

    # -- release -----------------------------------------------------------

    def release(self, only_ids: Optional[Sequence[str]], to_default_queue: bool = False) -> RunSummary:
        """Release qrunner's holds (all, or the named ones) without scheduling them.

        ``to_default_queue`` (Exim) moves them to Exim's default queue too;
        with ``only_ids`` None (``--all``) every message still in qrunner's
        named queue goes there, held or not: the way out leaves no mail behind.
        """
        self.backend.check_can_act()
        with RunLock(self.config.state_dir):
            state = State(self.config.state_dir, self.backend.instance)
            try:
                messages = self.backend.list_messages()
                for note in state.reconcile(queue_map(messages)):
                    log.info("%s", note)
                holds = state.holds()
                keys = sorted(holds)
                if only_ids is not None:
                    named = set(only_ids)
                    keys = [k for k in keys if k[0] in named]
                    for queue_id in sorted(named - {k[0] for k in keys}):
                        log.warning("%s: not held by qrunner; left alone", queue_id)
                summary = RunSummary(command="release", started=time.time())
                run_id = state.start_run(summary)
                state.mark_releasing(keys)
                confirmed = self.backend.release([k[0] for k in keys], to_default_queue=to_default_queue)
                state.forget(k for k in keys if k[0] in confirmed)
                for key in keys:
                    if key[0] in confirmed:
                        log.info("%s: action=release", key[0])
                    else:
                        summary.failed += 1
                        log.error("%s: action=release failed (being delivered, or gone?); the next run settles "
                                  "its record", key[0])
                if to_default_queue and only_ids is None:
                    rest = [m.queue_id for m in self.backend.list_messages() if m.queue_id not in confirmed]
                    for queue_id in sorted(self.backend.move_to_default_queue(rest)):
                        log.info("%s: action=move to=default-queue", queue_id)
                    left = [m.queue_id for m in self.backend.list_messages()]
                    if left:
                        summary.failed += len(left)
                        log.error("%d messages are still in qrunner's queue (being delivered?): %s; run the "
                                  "release again", len(left), " ".join(left[:20]))
                summary.released = len(confirmed)
                summary.finished = time.time()
                summary.outcome = "ok"
                state.finish_run(run_id, summary)
                log.info("release: released=%d seconds=%.2f", summary.released, summary.seconds)
                return summary
            finally:
                state.close()
