"""One run: lock, list, reconcile, decide, plan, execute, record.

Follow a message from here: the back end lists it; the records are settled
against the listing (:func:`qrunner.state.settle`); the back end answers a
few facts about it and :func:`qrunner.plan.triage` sorts it (recovery, the
policy's share, left alone); the policy decides; :func:`qrunner.plan.make_plan`
turns the decisions into a :class:`~qrunner.plan.Plan`; the executor
carries the plan out (``qrunner/executor.py``); the run's summary is
recorded. ``plan`` and ``run --dry-run`` stop after the plan: they take no
lock, write no record and act on nothing.
"""

from __future__ import annotations

import logging
import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from qrunner.config import Config, Sender, fallback_sender
from qrunner.decision import Decision, MessageKey
from qrunner.exceptions import ConfigError
from qrunner.executor import Executor
from qrunner.log import NOT_QUIETED
from qrunner import metrics
from qrunner.message import Message, QueueState
from qrunner.mta.base import Backend, Due, Gate
from qrunner.plan import OVERRIDDEN, Listed, Plan, make_plan, release_plan, triage
from qrunner.policy import PolicyEngine, PolicySettings
from qrunner.progress import NONE as NO_PROGRESS, Progress
from qrunner.selection import Choice, Selector
from qrunner.state import Hold, Records, RunLock, RunSummary, State, settle, settled

log = logging.getLogger("qrunner")


def decide_offline(policy: PolicySettings, senders: Sequence[Sender], backend: Optional[Backend] = None,
                   progress: Progress = NO_PROGRESS) -> List[Decision]:
    """``plan --queue-file`` and ``check``: the list and decide stages only; nothing acts, no lock.

    Every sender's script is loaded, even for a sender no message reaches,
    so a script that fails to load for any sender stops here (exit 78).
    Without a back end (``check`` with no snapshot) nothing is decided.
    """
    messages = backend.list() if backend is not None else None
    with PolicyEngine(policy, progress) as engine:
        if messages is not None:
            return engine.decide(messages, senders)  # each sender's pass loads its script first
        for sender in senders:
            engine.load(sender)
        return []


@dataclass
class RunResult:
    """What a run planned (and, unless a dry run, did); the CLI prints it and picks the exit code."""

    plan: Plan
    summary: RunSummary
    routes: Dict[Sender, str] = field(default_factory=dict)  # each sender -> how its mail leaves

    @property
    def trouble(self) -> bool:
        """A policy error, a message that could not be acted on, or a named one qrunner may not touch."""
        return bool(troubles(self.plan, self.summary))


def troubles(plan: Plan, summary: RunSummary) -> List[str]:
    """Why a run ends with exit 1, in words for ``status``; empty when it ends with 0."""
    found = []
    if plan.policy_errors:
        found.append(f"{plan.policy_errors} with a policy error")
    if summary.failed:
        found.append(f"{summary.failed} not acted on")
    if plan.left_alone:
        found.append(f"{len(plan.left_alone)} named but left alone")
    return found


@dataclass
class Status:
    """What ``qrunner status`` shows."""

    instance: str
    holds: List[Hold]
    past_lifetime: List[MessageKey]
    routes: Dict[Sender, str]
    last_run: Optional[RunSummary]
    gate: Gate = Gate(None, "not asked")


@dataclass
class Health:
    """``status --check``: a Nagios-style code (0 ok, 1 warning, 2 critical) and one line saying why."""

    code: int
    text: str


NEAR_LIFETIME = 0.8  # a hold this far into the MTA's queue lifetime is "near its limit"


def health(status: Status, queue_lifetime: Optional[float], max_age: float, now: float) -> Health:
    """Is qrunner doing its job? Critical: no run completed within ``max_age`` seconds, or the last one failed;
    warning: the MTA not gated (or qrunner cannot tell), holds near the queue lifetime, policy errors."""
    run = status.last_run
    if run is None:
        return Health(2, "QRUNNER CRITICAL: no run has completed yet")
    age = now - (run.finished or run.started)
    if age > max_age:
        return Health(2, f"QRUNNER CRITICAL: no run completed in the last {int(max_age)} s (the last {int(age)} s ago)")
    if run.outcome.startswith("failed"):
        return Health(2, f"QRUNNER CRITICAL: the last run ({run.command}) {run.outcome}")
    warnings = []
    if status.gate.gated is not True:
        warnings.append(("not gated: " if status.gate.gated is False else "gate unknown: ") + status.gate.why)
    near = [h for h in status.holds if queue_lifetime and now - h.arrival > NEAR_LIFETIME * queue_lifetime]
    if near:
        warnings.append(f"{len(near)} holds near the MTA's queue lifetime")
    if run.errors or run.outcome.startswith("exit 1"):
        warnings.append(f"the last run ({run.command}) ended {run.outcome}")
    if warnings:
        return Health(1, "QRUNNER WARNING: " + "; ".join(warnings))
    return Health(0, f"QRUNNER OK: {len(status.holds)} holds; the last run {int(age)} s ago ({run.command}, ok)")


def _outcome(plan: Plan, summary: RunSummary) -> str:
    """How a finished run is recorded: "ok", or the exit code and why."""
    found = troubles(plan, summary)
    return "exit 1: " + ", ".join(found) if found else "ok"


def invoker() -> str:
    """Who runs this command, for the record: the user who ran sudo (``SUDO_USER``), else this process's user."""
    sudo = os.environ.get("SUDO_USER")
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = f"uid {os.getuid()}"
    return f"{sudo} (sudo as {user})" if sudo and sudo != user else user


class Runner:
    """Runs the pipeline against one MTA back end.

    ``command_line`` is what the admin typed (recorded with each run, for
    ``status --history`` and ``explain``), ``invoked_by`` who typed it.
    ``progress`` draws the bars of a long command at a terminal; ``rate``
    paces what a command hands to the MTA's delivery.
    """

    def __init__(self, config: Config, backend: Backend, policy: PolicySettings, senders: Sequence[Sender],
                 command_line: str = "", invoked_by: Optional[str] = None, progress: Progress = NO_PROGRESS,
                 rate: Optional[float] = None):
        self.config = config
        self.progress = progress
        self.rate = rate  # flush --rate, release --to-default-queue --rate: messages per second
        self.backend = backend
        self.policy = policy
        self.senders = senders
        self.command_line = command_line
        self.invoked_by = invoker() if invoked_by is None else invoked_by
        self._messages: Sequence[Message] = ()  # the last listing, for the metrics
        self._choice: Optional[Choice] = None
        self._gate = Gate(None, "not asked")

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc_info) -> None:
        self.backend.close()

    # -- the job -----------------------------------------------------------

    def _summary(self, command: str) -> RunSummary:
        return RunSummary(command=command, started=time.time(), invoked_by=self.invoked_by,
                          command_line=self.command_line)

    def run(self, command: str = "run", dry_run: bool = False, only_ids: Optional[Sequence[str]] = None,
            ignore_policy: bool = False, choice: Optional[Choice] = None) -> RunResult:
        """A whole run (``run``, ``flush``) or a look at one (``--dry-run``, ``plan``).

        ``choice`` (a ``flush`` with selectors or a limit) narrows the named
        messages, among those a run decides, to the ones it selects.
        """
        self.backend.check(self.senders, acting=not dry_run)
        self._warn_gate()
        summary = self._summary(command)
        if choice is not None and not choice.narrowed:
            only_ids, choice = choice.ids, None
        self._choice = choice
        if dry_run:
            state = State(self.config.state_dir, self.backend.instance, readonly=True)
            try:
                plan = self._plan(state, only_ids, ignore_policy, write=False)
            finally:
                state.close()
            self._warn_left_alone(plan)
            return RunResult(plan, summary, self.routes())
        with RunLock(self.config.state_dir):
            state = State(self.config.state_dir, self.backend.instance)
            try:
                plan = self._plan(state, only_ids, ignore_policy, write=True)
                self._warn_left_alone(plan)
                self._execute(state, plan, summary)
            finally:
                state.close()
        return RunResult(plan, summary, self.routes())

    def _plan(self, state: State, only_ids: Optional[Sequence[str]], ignore_policy: bool, write: bool) -> Plan:
        """List, reconcile, decide, plan: everything up to the first action."""
        if ignore_policy:
            messages = self._messages = self.backend.list()
            records = self._reconcile(state, messages, write)
            only_ids = self._chosen(messages, records, only_ids)
            sorted_out = triage(self._listed(messages, records), only_ids)
            decisions = self._overridden(sorted_out.candidates)
            return make_plan(decisions, sorted_out, {}, overridden=True, from_hold=self._from_hold(decisions))
        with PolicyEngine(self.policy, self.progress) as engine:
            if self.senders:
                engine.prepare(self.senders[0])  # Lua starts while the MTA lists its queue
            messages = self._messages = self.backend.list()
            records = self._reconcile(state, messages, write)
            only_ids = self._chosen(messages, records, only_ids)
            sorted_out = triage(self._listed(messages, records), only_ids)
            decisions = engine.decide(sorted_out.candidates, self.senders)
        return make_plan(decisions, sorted_out, self._due(decisions, records), from_hold=self._from_hold(decisions))

    def _due(self, decisions: Sequence[Decision], records: Records) -> Dict[MessageKey, Due]:
        """The allowed messages whose retry time has not come, with when; those due now have no entry."""
        due_at = self.backend.due
        attempts = records.attempts
        waits = {}
        for decision in decisions:
            if decision.send:
                key = decision.key
                wait = due_at(decision.message, attempts.get(key) if attempts else None)
                if wait is not None:
                    waits[key] = wait
        return waits

    def _chosen(self, messages: Sequence[Message], records: Records, only_ids: Optional[Sequence[str]]
                ) -> Optional[Sequence[str]]:
        """A flush's selection: among the waiting messages and qrunner's holds, those the admin's choice picks."""
        if self._choice is None:
            return only_ids
        pool = [(m, records.holds.get(MessageKey.of(m))) for m in messages
                if m.state == QueueState.WAITING or (m.held and MessageKey.of(m) in records.holds)]
        return self._choice.pick(pool, time.time(), "waiting messages and qrunner holds")

    def _from_hold(self, decisions: Sequence[Decision]) -> set:
        """Allowed holds the back end sends by their route as they are held, never released in between."""
        return {d.key for d in decisions if d.send and d.message.held
                and self.backend.sends_from_hold(None if d.sender is None or d.sender.default else d.sender)}

    def _reconcile(self, state: State, messages: Sequence[Message], write: bool) -> Records:
        """The records settled against the queue; written (and each change logged) unless only looking."""
        records = state.load()
        settlement = settle(records, {MessageKey.of(m): m.state for m in messages})
        if write:
            state.apply(settlement)
            for note in settlement.notes:
                log.info("%s", note)
        return settled(records, settlement)

    def _listed(self, messages: Sequence[Message], records: Records) -> List[Listed]:
        """Each message with the facts the plan needs; the queue file, not the record, says what a copy is."""
        copies = records.copies_by_id()
        handed = records.handed()
        names = {s.name for s in self.senders}
        routed = [s for s in self.senders if not s.default]
        listed = []
        for message in messages:
            key = MessageKey.of(message)
            ours = message.held and key in records.holds
            hand_over = handed.get(key)
            listed.append(Listed(message, ours=ours, unfit=self.backend.unfit(message, ours),
                                 expired=self.backend.expired(message),
                                 copy=self._copy_of(message, copies.get(message.queue_id), names, routed),
                                 handed=(hand_over.queue_id, hand_over.sender) if hand_over else None))
        self._warn_old_holds([item.message for item in listed if item.ours])
        return listed

    def _copy_of(self, message: Message, record, names, routed) -> Optional[str]:
        """The sender this message is a copy for: its queue file says, the record a hint.

        A record whose sender is no longer configured has no route to compare:
        the record alone says it, and the MTA delivers the copy on the route
        stamped in it.
        """
        recorded = record is not None and record.original != MessageKey.of(message)
        if recorded and record.sender not in names:
            return record.sender
        if not routed and not recorded:
            return None
        sender = self.backend.copy_of(message, routed, recorded=recorded)
        return sender.name if sender is not None else None

    def _overridden(self, candidates: Sequence[Message]) -> List[Decision]:
        """``flush --ignore-policy``: every named message sent by the fallback sender, at priority 50."""
        sender = fallback_sender(self.senders)
        return [Decision(m, True, 50, sender, OVERRIDDEN) for m in candidates]

    def _execute(self, state: State, plan: Plan, summary: RunSummary) -> None:
        summary.listed = plan.listed
        run_id = state.start_run(summary)
        executor = Executor(self.backend, state, summary, self.progress, self.rate)
        try:
            executor.execute(plan, run_id)
            summary.errors = plan.policy_errors
        except BaseException as exc:
            self._finish(state, run_id, plan, summary, executor, exc)
            raise
        self._finish(state, run_id, plan, summary, executor)
        state.prune(self.config.history_days)

    def _finish(self, state: State, run_id: int, plan: Plan, summary: RunSummary, executor: Executor,
                error: Optional[BaseException] = None) -> None:
        """Record how the command ended, add to the counters, write the metrics, say the summary line."""
        summary.finished = time.time()
        found = troubles(plan, summary)
        if error is not None:
            summary.outcome, summary.exit_code, summary.succeeded = f"failed: {error}", getattr(
                error, "exit_code", 1), False
        else:
            summary.outcome = _outcome(plan, summary)
            summary.exit_code = 1 if found else 0
            summary.succeeded = not (summary.failed or plan.left_alone)  # policy errors alone: the plan completed
        state.finish_run(run_id, summary)
        counts = dict(executor.tally)
        counts.update({("policy_errors", sender): n for sender, n in metrics.policy_errors(plan.decisions).items()})
        state.add_counts(counts)
        self._write_metrics(state, plan)
        if summary.command == "release":
            log.info("release: released=%d%s seconds=%.2f", summary.released,
                     f" moved={summary.moved}" if summary.moved else "", summary.seconds)
        else:
            log.info("%s: listed=%d sent=%d held=%d released=%d errors=%d seconds=%.2f", summary.command,
                     summary.listed, summary.sent, summary.held, summary.released, summary.errors,
                     summary.seconds)

    def _write_metrics(self, state: State, plan: Plan) -> None:
        """The metrics file (``metrics_file``), from what this command saw; a write that fails is said, not fatal."""
        if not self.config.metrics_file:
            return
        messages = self._messages
        waiting = [m for m in messages if m.state == QueueState.WAITING]
        snapshot = metrics.Snapshot(
            queue=len(messages), listed=plan.listed, waiting=len(waiting),
            oldest_waiting=min((m.arrival for m in waiting), default=None),
            decisions=metrics.decisions_of(plan), holds=list(state.holds().values()), gated=self._gate.gated,
            totals=state.totals(), last_runs=state.last_runs())
        try:
            metrics.write(self.config.metrics_file, snapshot)
        except OSError as exc:
            log.error("%s: cannot write the metrics file (%s); check metrics_file", self.config.metrics_file,
                      exc.strerror or exc)

    # -- warnings ------------------------------------------------------------

    @staticmethod
    def _warn_left_alone(plan: Plan) -> None:
        for step in plan.left_alone:
            log.warning("%s: %s", step.queue_id, step.reason)

    def _warn_gate(self) -> None:
        """Said on every run, dry run and plan, under ``-q`` too: ungated mail leaves without the policy."""
        gate = self._gate = self.backend.gate(self.senders)
        if gate.gated is False:
            log.warning("%s", gate.why, extra=NOT_QUIETED)

    def _past_lifetime(self, arrivals: Sequence[MessageKey]) -> List[MessageKey]:
        """Holds so old that releasing them means a bounce on the MTA's first attempt."""
        limit = self.backend.queue_lifetime()
        now = time.time()
        return [key for key in arrivals if limit and now - key.arrival > limit]

    def _warn_old_holds(self, held: Sequence[Message]) -> None:
        """Nothing should sit on hold unnoticed until releasing it means a bounce."""
        now = time.time()
        for key in sorted(self._past_lifetime([MessageKey.of(m) for m in held])):
            log.warning("%s: held by qrunner for longer than the MTA's queue lifetime (%d days since arrival): "
                        "it will bounce on its first delivery attempt after release", key.queue_id,
                        (now - key.arrival) // 86400)

    # -- release and status -----------------------------------------------------

    def release(self, only_ids: Optional[Sequence[str]], to_default_queue: bool = False,
                choice: Optional[Choice] = None, dry_run: bool = False) -> RunResult:
        """Release qrunner's holds (all, or the named ones) without scheduling them.

        ``to_default_queue`` hands them back to the MTA's own scheduling too
        (Exim's default queue); with ``only_ids`` None (``--all``) every
        message still in qrunner's queue goes there, held or not: the way
        out leaves no mail behind. ``choice`` (selectors, a limit) narrows
        the holds released, and then only those move. A dry run plans and
        changes nothing.
        """
        self.backend.check((), acting=not dry_run)  # the way out needs no sender's route
        summary = self._summary("release")
        if choice is not None and choice.narrowed:
            self._choice = choice
        if dry_run:
            state = State(self.config.state_dir, self.backend.instance, readonly=True)
            try:
                plan = self._release_plan(state, only_ids, to_default_queue, write=False)
            finally:
                state.close()
            return RunResult(plan, summary)
        with RunLock(self.config.state_dir):
            state = State(self.config.state_dir, self.backend.instance)
            try:
                plan = self._release_plan(state, only_ids, to_default_queue, write=True)
                run_id = state.start_run(summary)
                executor = Executor(self.backend, state, summary, self.progress, self.rate)
                try:
                    executor.execute(plan, run_id)
                    if to_default_queue and not plan.named:
                        self._check_emptied(summary)
                except BaseException as exc:
                    self._finish(state, run_id, plan, summary, executor, exc)
                    raise
                self._finish(state, run_id, plan, summary, executor)
                state.prune(self.config.history_days)
                return RunResult(plan, summary)
            finally:
                state.close()

    def _release_plan(self, state: State, only_ids: Optional[Sequence[str]], to_default_queue: bool,
                      write: bool) -> Plan:
        messages = self._messages = self.backend.list()
        records = self._reconcile(state, messages, write)
        listed = self._listed(messages, records)
        if self._choice is not None:
            pool = [(item.message, records.holds.get(MessageKey.of(item.message))) for item in listed if item.ours]
            only_ids = self._choice.pick(pool, time.time(), "qrunner holds")
        plan = release_plan(listed, only_ids, to_default_queue)
        self._warn_left_alone(plan)
        return plan

    def release_for_removal(self, gate_removed: bool = False) -> RunSummary:
        """The one rule before qrunner is removed (``make uninstall``, a package's prerm): nothing left behind.

        Refused (78) while the MTA is still gated for qrunner: with nobody
        left to send it, released mail would wait behind the gate, and new
        mail pile up there, for good. When qrunner cannot tell, it refuses
        too, unless the admin checked and says the gate is gone
        (``gate_removed``). Then every qrunner hold is released and, where
        the MTA has a named queue (Exim), every message in it goes to the
        default queue, as ``release --all --to-default-queue`` does.
        """
        gate = self.backend.gate()
        hint = self.backend.ungate_hint
        if gate.gated or gate.leftover:
            raise ConfigError(f"the MTA is still gated for qrunner ({gate.leftover or gate.why}): {hint}, then run "
                              "this again; nothing was released.")
        if gate.gated is None and not gate_removed:
            raise ConfigError(f"qrunner cannot tell whether the MTA is still gated for it ({gate.why}): make sure "
                              f"the gate is gone ({hint}), then run this again with --gate-removed; nothing was "
                              "released.")
        return self.release(None, to_default_queue=self.backend.has_named_queue).summary

    def _check_emptied(self, summary: RunSummary) -> None:
        """The way out must leave nothing in qrunner's queue: say what is still there."""
        left = [m.queue_id for m in self.backend.list()]
        if left:
            summary.failed += len(left)
            log.error("%d messages are still in qrunner's queue (being delivered?): %s; run the release again",
                      len(left), " ".join(left[:20]))

    def status(self, selector: Optional[Selector] = None) -> Status:
        """qrunner's holds (flagging those past the MTA's queue lifetime), the senders, the last run and the gate.

        With selectors, only the holds they match (no match: NothingSelected);
        the queue is listed then, for each held message's recipients.
        """
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        try:
            holds = list(state.holds().values())
            last = state.last_run()
        finally:
            state.close()
        if selector is not None and not selector.empty:
            holds = self._selected_holds(holds, selector)
        return Status(self.backend.instance, holds, self._past_lifetime([h.key for h in holds]), self.routes(), last,
                      self.backend.gate(self.senders))

    def _selected_holds(self, holds: Sequence[Hold], selector: Selector) -> List[Hold]:
        """The holds the selector matches, judged by the message as the MTA lists it (recipients included)."""
        listed = {MessageKey.of(m): m for m in self.backend.list()}
        pool = [(listed.get(h.key) or Message(h.queue_id, h.arrival, 0, h.envelope_sender or "", ()), h)
                for h in holds]
        chosen = set(Choice(selector=selector).pick(pool, time.time(), "qrunner holds"))
        return [h for h in holds if h.queue_id in chosen]

    def history(self, limit: int) -> List[RunSummary]:
        """The last commands that changed the queue, newest first, with who ran them."""
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        try:
            return state.history(limit)
        finally:
            state.close()

    def check_health(self, max_age: float) -> Health:
        """``status --check``: one line and a code for monitoring."""
        return health(self.status(), self.backend.queue_lifetime(), max_age, time.time())

    def routes(self) -> Dict[Sender, str]:
        """Each sender, in the order they run, with how its mail leaves this MTA."""
        return {s: self.backend.describe_route(s) for s in self.senders}
