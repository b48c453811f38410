"""One run: lock, list, reconcile, decide, plan, execute, record.

Follow a message from here: the back end lists it; the records are settled
against the listing (:func:`qrunner.state.settle`); the back end answers a
few facts about it and :func:`qrunner.plan.triage` sorts it (recovery, the
policy's share, left alone); the policy decides; :func:`qrunner.plan.make_plan`
turns the decisions into a :class:`~qrunner.plan.Plan`; the executor
carries the plan out (``qrunner/executor.py``); the run's summary is
recorded. ``plan`` and ``run --dry-run`` stop after the plan: they take no
lock, write no record and act on nothing; so do ``explain`` (the same plan,
reported for one message, with its history) and ``snapshot`` (the messages
the policy would be asked about).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pwd
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from qrunner.config import NO_PACING, Config, Pacing, Sender, fallback_sender
from qrunner.decision import Decision, MessageKey
from qrunner.exceptions import ConfigError
from qrunner.log import NOT_QUIETED
from qrunner.message import Message, QueueState, arrival_order
from qrunner.mta.base import Backend, Due, Gate
from qrunner.plan import (OVERRIDDEN, HeldCopy, HoldAge, Listed, Plan, Planned, Triage, Wait, explain_unplanned,
                          make_plan, release_plan, steps_for, triage)
from qrunner.policy import PolicyEngine, PolicySettings
from qrunner.progress import NONE as NO_PROGRESS, Progress
from qrunner.selection import Choice, Selector
from qrunner.state import Copy, HistoryEntry, Hold, Records, RunLock, RunSummary, State, settle, settled

if TYPE_CHECKING:  # the executor is imported where a command acts: a plan never does
    from qrunner.executor import Executor

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
    if summary.unfinished:
        found.append(f"{summary.unfinished} handed over but not finished (the next run finishes them)")
    if plan.left_alone:
        found.append(f"{len(plan.left_alone)} named but left alone")
    return found


@dataclass
class Status:
    """What ``qrunner status`` shows; ``notes``: per hold, the limits it is near or past (:class:`HoldLimits`)."""

    instance: str
    holds: List[Hold]
    past_lifetime: List[MessageKey]
    routes: Dict[Sender, str]
    last_run: Optional[RunSummary]
    gate: Gate = Gate(None, "not asked")
    notes: Dict[MessageKey, List[str]] = field(default_factory=dict)


@dataclass
class Explanation:
    """What ``qrunner explain`` reports about one message.

    ``message`` is None when the id is not in the queue (then only the
    ``history`` of every message that had the id is known). ``decision``
    is the policy's, None when the policy was not asked about it (a copy,
    a message being delivered, someone else's hold: ``steps`` say why).
    ``steps`` come from the very plan a dry run builds. ``hold`` is
    qrunner's record of its hold, if any. ``header_lines`` are what the
    script gets as ``HeaderLines`` when it touches the headers (read
    again for the report), ``header_problem`` why they could not be read.
    """

    queue_id: str
    message: Optional[Message]
    senders: Sequence[Sender] = ()
    decision: Optional[Decision] = None
    steps: List[Planned] = field(default_factory=list)
    hold: Optional[Hold] = None
    history: List[HistoryEntry] = field(default_factory=list)
    header_lines: List[bytes] = field(default_factory=list)
    header_problem: Optional[str] = None


def history_of(entries: Sequence[HistoryEntry], message: Optional[Message]) -> List[HistoryEntry]:
    """The entries that concern this message, not an earlier one that had its id (Postfix reuses short ids).

    Its own actions match its key; a route that made it (this message
    being the copy) is one recorded since it arrived. Without a live
    message every entry is shown, each with its arrival.
    """
    if message is None:
        return list(entries)
    key = MessageKey.of(message)
    return [e for e in entries if e.event.key == key or (e.event.new_queue_id == message.queue_id
                                                          and e.at >= key.arrival)]


@dataclass
class Health:
    """``status --check``: a Nagios-style code (0 ok, 1 warning, 2 critical) and one line saying why."""

    code: int
    text: str


NEAR_LIFETIME = 0.8  # a hold this far into the MTA's queue lifetime (or max_hold_age) is "near its limit"


@dataclass(frozen=True)
class HoldLimits:
    """The two ages a hold runs into: ``max_hold_age`` (qrunner's; 0: off) and the MTA's queue lifetime.

    Past the first, the next run sends the message (or returns it to its
    sender) without asking the policy; past the second, a released message
    bounces at the MTA's first attempt. A hold is *near* a limit from
    :data:`NEAR_LIFETIME` of it on, so ``status`` and ``status --check``
    say so while there is time to act.
    """

    max_hold_age: float = 0.0
    queue_lifetime: Optional[float] = None
    bounce: bool = False

    def near_hold_age(self, arrival: float, now: float) -> bool:
        return bool(self.max_hold_age) and now - arrival > NEAR_LIFETIME * self.max_hold_age

    def near_lifetime(self, arrival: float, now: float) -> bool:
        return bool(self.queue_lifetime) and now - arrival > NEAR_LIFETIME * self.queue_lifetime

    def notes(self, hold: Hold, now: float) -> List[str]:
        """What ``status`` marks a hold with, in words."""
        notes = []
        age = now - hold.arrival
        if self.max_hold_age and age > self.max_hold_age:
            returned = self.bounce and hold.envelope_sender != ""
            notes.append("past max_hold_age: the next run " + ("returns it to its sender" if returned else
                                                               "sends it by the MTA's own routing"))
        elif self.near_hold_age(hold.arrival, now):
            notes.append(f"near max_hold_age: the policy is no longer asked from "
                         f"{_clock(hold.arrival + self.max_hold_age)}")
        if self.queue_lifetime and age > self.queue_lifetime:
            notes.append("older than the MTA's queue lifetime: bounces when released")
        elif self.near_lifetime(hold.arrival, now):
            notes.append(f"near the MTA's queue lifetime: bounces if released after "
                         f"{_clock(hold.arrival + self.queue_lifetime)}")
        return notes


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def health(status: Status, queue_lifetime: Optional[float], max_age: float, now: float,
           max_hold_age: float = 0.0) -> Health:
    """Is qrunner doing its job? Critical: no run completed within ``max_age`` seconds, or the last one failed;
    warning: the MTA not gated (or qrunner cannot tell), holds near the queue lifetime or max_hold_age,
    policy errors."""
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
    limits = HoldLimits(max_hold_age, queue_lifetime)
    near = [h for h in status.holds if limits.near_lifetime(h.arrival, now)]
    if near:
        warnings.append(f"{len(near)} holds near the MTA's queue lifetime")
    expiring = [h for h in status.holds if limits.near_hold_age(h.arrival, now)]
    if expiring:
        warnings.append(f"{len(expiring)} holds near max_hold_age")
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


@contextlib.contextmanager
def _planning_memory():
    """Plan without Python's cycle collector, then keep what the plan holds out of its later rounds.

    A plan builds several objects per listed message (the message, its
    facts, its decision, its step), all kept until the command ends and
    none in a reference cycle: the collector's rounds over them found
    nothing to free and cost a tenth of a 10,000-message plan (measured). So it is
    off while the plan is built; then everything alive is moved to the
    permanent generation (``gc.freeze``: still freed as usual when no longer
    referenced; a cycle made meanwhile stays until the command ends), so
    the rounds while the plan is printed or carried out
    walk only what those make.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


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
        self._listing: List[Listed] = []  # the last listing with the facts the plan had: kept for explain only
        self._keep_listing = False  # (a run's plan lets them go: about 100 bytes a message while it decides)
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
        messages, among those a run decides, to the ones it selects. Pacing
        (qrunner(8), PACING) governs ``run`` (and ``plan``, its preview) only: a
        ``flush`` is the admin asking for the named mail now (``--rate``).
        """
        started = time.monotonic()
        self.backend.check(self.senders, acting=not dry_run)
        self._check_hold_expiry()
        self._warn_gate()
        summary = self._summary(command)
        if choice is not None and not choice.narrowed:
            only_ids, choice = choice.ids, None
        self._choice = choice
        pacing = self.config.pacing if command in ("run", "plan") else NO_PACING
        if dry_run:
            state = State(self.config.state_dir, self.backend.instance, readonly=True)
            try:
                plan = self._plan(state, only_ids, ignore_policy, write=False, pacing=pacing)
            finally:
                state.close()
            self._warn_left_alone(plan)
            return RunResult(plan, summary, self.routes())
        with RunLock(self.config.state_dir):
            state = State(self.config.state_dir, self.backend.instance)
            try:
                plan = self._plan(state, only_ids, ignore_policy, write=True, pacing=pacing)
                self._warn_left_alone(plan)
                self._execute(state, plan, summary, pacing, started)
            finally:
                state.close()
        return RunResult(plan, summary, self.routes())

    def _plan(self, state: State, only_ids: Optional[Sequence[str]], ignore_policy: bool, write: bool,
              pacing: Pacing = NO_PACING) -> Plan:
        """List, reconcile, decide, plan: everything up to the first action (see :func:`_planning_memory`)."""
        with _planning_memory():
            return self._list_and_plan(state, only_ids, ignore_policy, write, pacing)

    def _list_and_plan(self, state: State, only_ids: Optional[Sequence[str]], ignore_policy: bool, write: bool,
                       pacing: Pacing) -> Plan:
        if ignore_policy:
            messages = self._messages = self.backend.list()
            records = self._reconcile(state, messages, write)
            only_ids = self._chosen(messages, records, only_ids)
            sorted_out = self._triage(messages, records, only_ids)
            decisions = self._overridden(sorted_out.candidates)
            return make_plan(decisions, sorted_out, {}, overridden=True, from_hold=self._from_hold(decisions))
        with PolicyEngine(self.policy, self.progress) as engine:
            if self.senders:
                engine.prepare(self.senders[0])  # Lua starts while the MTA lists its queue
            messages = self._messages = self.backend.list()
            records = self._reconcile(state, messages, write)
            only_ids = self._chosen(messages, records, only_ids)
            sorted_out = self._triage(messages, records, only_ids, self._hold_age())
            attempts = records.attempts
            del records  # every hold's record is in the listing's facts now: not kept while Lua decides
            decisions = engine.decide(sorted_out.candidates, self.senders)
        sending = [d.message for d in decisions if d.send] + [e.message for e in sorted_out.expire if not e.bounce]
        return make_plan(decisions, sorted_out, self._due(sending, attempts), from_hold=self._from_hold(decisions),
                         pacing=pacing)

    def _triage(self, messages: Sequence[Message], records: Records, only_ids: Optional[Sequence[str]],
                hold_age: Optional[HoldAge] = None) -> Triage:
        """The listing with the facts the plan needs, sorted out; the facts are kept for ``explain`` only."""
        listing = self._listed(messages, records)
        self._listing = listing if self._keep_listing else []
        return triage(listing, only_ids, hold_age)

    def _due(self, messages: Sequence[Message], attempts: Dict[MessageKey, Tuple[int, float]]
             ) -> Dict[MessageKey, Due]:
        """Of the messages to be sent, those whose retry time has not come, with when; those due now have no entry."""
        due_at = self.backend.due
        waits = {}
        for message in messages:
            key = MessageKey.of(message)
            wait = due_at(message, attempts.get(key) if attempts else None)
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

    def _hold_age(self) -> Optional[HoldAge]:
        """``max_hold_age`` for triage, by the real clock; None when it is off (0)."""
        if not self.config.max_hold_age:
            return None
        return HoldAge(self.config.max_hold_age, time.time(), bounce=self.config.on_hold_expiry == "bounce")

    def _check_hold_expiry(self) -> None:
        """``on_hold_expiry = "bounce"`` needs an MTA that can return mail to its sender: else 78, before anything."""
        if self.config.on_hold_expiry == "bounce" and self.backend.cannot_return:
            raise ConfigError(f"{self.config.path or 'the configuration'}: on_hold_expiry = \"bounce\" returns mail "
                              f"past max_hold_age to its sender, but {self.backend.cannot_return}; set "
                              "on_hold_expiry = \"send\" (or remove the line) to send such mail by the MTA's own "
                              "routing.")

    def _from_hold(self, decisions: Sequence[Decision]) -> set:
        """Allowed holds the back end sends by their route as they are held, never released in between."""
        return {d.key for d in decisions if d.send and d.message.held
                and self.backend.sends_from_hold(None if d.sender is None or d.sender.default else d.sender)}

    def _reconcile(self, state: State, messages: Sequence[Message], write: bool) -> Records:
        """The records settled against the queue; written (and each change logged) unless only looking."""
        records = state.load()
        # Without a record there is nothing to settle: no table of the whole queue for it (100,000 keys).
        queue = {MessageKey.of(m): m.state for m in messages} if (records.holds or records.copies or
                                                                  records.attempts) else {}
        settlement = settle(records, queue)
        del queue
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
        queued: Dict[str, List[Message]] = {}
        if routed:  # only a held copy's original is looked up by id (_held_copy)
            for message in messages:
                queued.setdefault(message.queue_id, []).append(message)
        holds = records.holds
        unfit_of, expired_of = self.backend.unfit, self.backend.expired
        listed = []
        append = listed.append
        for message in messages:
            held = message.held
            key = MessageKey(message.queue_id, int(message.arrival)) if held or handed else None
            ours = held and key in holds
            hand_over = handed.get(key) if handed else None
            record = copies.get(message.queue_id) if copies else None
            unfit = unfit_of(message, ours)
            held_copy = None
            if held and not ours and routed:
                held_copy, unnamed = self._held_copy(message, record, routed, queued, records, handed)
                unfit = unnamed or unfit
            # _copy_of: without a routed sender or a record, no message is a copy (the common case, asked of
            # every message: skipped here)
            copy = self._copy_of(message, record, names, routed) if routed or record is not None else None
            append(Listed(message, ours, unfit, expired_of(message), copy,
                          (hand_over.queue_id, hand_over.sender) if hand_over else None, held_copy))
        self._warn_old_holds([item.message for item in listed if item.ours])
        return listed

    def _held_copy(self, message: Message, record, routed: Sequence[Sender], queued: Dict[str, List[Message]],
                   records: Records, handed: Dict[MessageKey, Copy]):
        """(HeldCopy, None) for a copy on its listener's hold that qrunner has not released; (None, why) for one
        that names no original; (None, None) for any other held message.

        The record (written after the listener's 250) names the original
        exactly; without one, the copy's queue file does (the original's id
        that XFORWARD IDENT left in it), and a message of that id that
        arrived no later than the copy is its original (Postfix gives an id
        again only to a message that arrives after the first is gone). A
        recorded copy's original that this run removes (it is qrunner's
        hold, handed to this very copy) counts as gone. A copy qrunner
        released and someone held again is theirs.
        """
        if record is not None and (record.released or record.original == MessageKey.of(message)):
            return None, None
        if record is not None:
            original = record.original
            copy = handed.get(original)
            removing = original in records.holds and copy is not None and copy.queue_id == message.queue_id
            present = any(MessageKey.of(m) == original for m in queued.get(original.queue_id, ()))
            return HeldCopy(record.sender, original.queue_id, removing or not present), None
        found = self.backend.held_copy(message, routed)
        if found is None:
            return None, None
        sender, original_id = found
        if not original_id:
            why = (f"a copy for sender {sender.name} on its listener's hold that names no original (the listener "
                   "takes no XFORWARD); left alone: delete it (postsuper -d) if its original is still queued, "
                   "else release it (postsuper -H)")
            log.warning("%s: %s", message.queue_id, why)
            return None, why
        present = any(m.arrival <= message.arrival for m in queued.get(original_id, ()))
        return HeldCopy(sender.name, original_id, not present), None

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

    def _execute(self, state: State, plan: Plan, summary: RunSummary, pacing: Pacing, started: float) -> None:
        from qrunner.executor import Executor

        summary.listed = plan.listed
        run_id = state.start_run(summary)
        executor = Executor(self.backend, state, summary, pacing, started, progress=self.progress, rate=self.rate)
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
            summary.succeeded = not (summary.failed or summary.unfinished or plan.left_alone)  # policy errors alone: the plan completed
        from qrunner import metrics  # only run, flush and release get here: a plan or a status never imports it

        state.finish_run(run_id, summary)
        counts = dict(executor.tally)
        counts.update({("policy_errors", sender): n for sender, n in metrics.policy_errors(plan.decisions).items()})
        state.add_counts(counts)
        self._write_metrics(state, plan, executor.paced, carry=summary.command != "run")
        if summary.command == "release":
            log.info("release: released=%d%s seconds=%.2f", summary.released,
                     f" moved={summary.moved}" if summary.moved else "", summary.seconds)
        else:
            log.info("%s: listed=%d sent=%d held=%d released=%d errors=%d%s seconds=%.2f", summary.command,
                     summary.listed, summary.sent, summary.held, summary.released, summary.errors,
                     f" expired={summary.expired}" if summary.expired else "", summary.seconds)

    def _write_metrics(self, state: State, plan: Plan, paced: Sequence[Wait] = (), carry: bool = False) -> None:
        """The metrics file (``metrics_file``), from what this command saw; a write that fails is said, not fatal.

        ``carry`` (a flush, a release): the run's plan gauges stay as the last run left them in the file.
        """
        if not self.config.metrics_file:
            return
        from qrunner import metrics

        messages = self._messages
        waiting = [m for m in messages if m.state == QueueState.WAITING]
        snapshot = metrics.Snapshot(
            queue=len(messages), listed=plan.listed, waiting=len(waiting),
            oldest_waiting=min((m.arrival for m in waiting), default=None),
            decisions=metrics.decisions_of(plan, paced), holds=list(state.holds().values()), gated=self._gate.gated,
            totals=state.totals(), last_runs=state.last_runs(),
            carried=metrics.last_run_plan(self.config.metrics_file) if carry else None)
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

    # -- looks at the queue: explain, snapshot -------------------------------------

    def explain(self, queue_id: str) -> Explanation:
        """One message: what the policy got and said, what a run would do with it and why, what qrunner did.

        The whole queue is decided, as a dry run does, since a script's
        globals carry over from call to call within a pass: this message's
        verdicts are the ones a run would get. Nothing changes; the state
        database is opened read-only.
        """
        self.backend.check(self.senders, acting=False)
        self._warn_gate()
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        self._keep_listing = True
        try:
            plan = self._plan(state, None, False, write=False, pacing=self.config.pacing)
            item = next((i for i in self._listing if i.message.queue_id == queue_id), None)
            if item is None:
                return Explanation(queue_id, None, self.senders, history=state.history(queue_id))
            key = MessageKey.of(item.message)
            hold = state.hold(key)
            history = history_of(state.history(queue_id), item.message)
        finally:
            state.close()
        decision = next((d for d in plan.decisions if d.key == key), None)
        steps = steps_for(plan, key) or explain_unplanned(item)
        source = item.message.header_source()
        lines = source.read()
        return Explanation(queue_id, item.message, self.senders, decision, steps, hold, history, lines, source.problem)

    def candidates(self) -> List[Message]:
        """The messages a run would ask the policy about now, oldest first (``snapshot``); nothing changes.

        Listed and settled against the records as a dry run does: the
        deferred mail and qrunner's own holds, not copies on a sender's
        route, mail being delivered, someone else's holds, nor what recovery
        deletes or hands back.
        """
        self.backend.check(self.senders, acting=False)
        self._warn_gate()
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        try:
            messages = self.backend.list()
            records = self._reconcile(state, messages, write=False)
            return arrival_order(triage(self._listed(messages, records)).candidates)
        finally:
            state.close()

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
        self._gate = self.backend.gate(self.senders)  # for the metrics' qrunner_gated
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
                from qrunner.executor import Executor

                run_id = state.start_run(summary)
                executor = Executor(self.backend, state, summary, progress=self.progress, rate=self.rate)
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
        del records  # every hold's record, no longer needed: let it go before the plan is made
        plan = release_plan(listed, only_ids, to_default_queue)
        del listed
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

    def status(self, selector: Optional[Selector] = None, last_of: Optional[str] = None) -> Status:
        """qrunner's holds (flagging those past the MTA's queue lifetime), the senders, the last run and the gate.

        With selectors, only the holds they match (no match: NothingSelected);
        the queue is listed then, for each held message's recipients.
        ``last_of``: the last run of that command only (``run``), else of any.
        """
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        try:
            holds = list(state.holds().values())
            last = state.last_run(last_of)
        finally:
            state.close()
        if selector is not None and not selector.empty:
            holds = self._selected_holds(holds, selector)
        now = time.time()
        limits = HoldLimits(self.config.max_hold_age, self.backend.queue_lifetime(),
                            bounce=self.config.on_hold_expiry == "bounce")
        return Status(self.backend.instance, holds, self._past_lifetime([h.key for h in holds]), self.routes(), last,
                      self.backend.gate(self.senders), {h.key: limits.notes(h, now) for h in holds})

    def _selected_holds(self, holds: Sequence[Hold], selector: Selector) -> List[Hold]:
        """The holds the selector matches, judged by the message as the MTA lists it (recipients included)."""
        listed = {MessageKey.of(m): m for m in self.backend.list()}
        pool = [(listed.get(h.key) or Message(h.queue_id, h.arrival, 0, h.envelope_sender or "", ()), h)
                for h in holds]
        chosen = set(Choice(selector=selector).pick(pool, time.time(), "qrunner holds"))
        return [h for h in holds if h.queue_id in chosen]

    def recent_runs(self, limit: int) -> List[RunSummary]:
        """The last commands that changed the queue, newest first, with who ran them."""
        state = State(self.config.state_dir, self.backend.instance, readonly=True)
        try:
            return state.recent_runs(limit)
        finally:
            state.close()

    def check_health(self, max_age: float) -> Health:
        """``status --check``: one line and a code for monitoring, judged by the last ``run`` (the timer's job).

        An admin's ``release`` or ``flush`` in between must not hide a
        failed or stopped timer, nor warn about itself until the next run.
        """
        return health(self.status(last_of="run"), self.backend.queue_lifetime(), max_age, time.time(),
                      self.config.max_hold_age)

    def routes(self) -> Dict[Sender, str]:
        """Each sender, in the order they run, with how its mail leaves this MTA."""
        return {s: self.backend.describe_route(s) for s in self.senders}
