"""Prometheus metrics for node_exporter's textfile collector (setting ``metrics_file``).

Written after every run, ``flush`` and ``release`` that acts (never after a
dry run), atomically and mode 0644 (qrunner/atomic.py: a fresh file
beside it, synced, renamed over it), so node_exporter, as its own user,
always reads a whole file.

Gauges describe the queue as the last command saw it; counters are
cumulative, kept in the state database so they survive between runs (a
textfile has no memory); the ``qrunner_last_run_*`` gauges are per command,
from the state's run history, so one command's file still tells about the
others. A run is *successful* when it completed its plan: exit 0, or exit 1
for policy errors only. So a policy error does not fire a "no successful
run" alert; ``qrunner_last_run_policy_errors`` counts them apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from qrunner.atomic import replace_file
from qrunner.decision import Decision
from qrunner.plan import Plan, Wait
from qrunner.state import Hold, LastRun

BANDS = ((1, 25), (26, 50), (51, 75), (76, 100))
REASON_CLASSES = ("policy_skip", "policy_error", "hand_over_failure", "admin_command")
COUNTERS = {
    "sent": "Messages qrunner asked the MTA to deliver (each by its sender's route or the MTA's own).",
    "held": "Holds qrunner made (new ones; a hold that stays is not counted again).",
    "released": "Holds qrunner released (by the policy, a flush or the release command).",
    "routed": "Messages handed to a sender's route as a copy (Postfix re-injection).",
    "policy_errors": "Policy errors (a runtime error, a timeout or a bad value in CheckFile), per sender.",
    "expired": "Messages past max_hold_age that qrunner sent by the MTA's own routing or returned to their sender "
               "without asking the policy (a message sent again after the relay deferred it counts again).",
    "paced": "Allowed messages a pacing limit left for the next run (max_per_run, max_active, max_run_seconds, "
             "strict_priority), counted each run they wait.",
}


def band(priority: int) -> str:
    """The priority band a priority falls in: "1-25", "26-50", "51-75" or "76-100"."""
    for low, high in BANDS:
        if priority <= high:
            return f"{low}-{high}"
    return "76-100"


def reason_class(hold: Hold) -> str:
    """Why a hold is there, in four words a dashboard can group by."""
    if hold.reason.startswith("policy error") or ": policy error" in hold.reason:
        return "policy_error"
    if "hand-over to sender" in hold.reason or hold.reason.startswith("being handed to sender"):
        return "hand_over_failure"
    if hold.reason == "held by the admin":
        return "admin_command"
    return "policy_skip"


@dataclass
class Snapshot:
    """What the metrics file says, gathered by the runner after a command."""

    queue: int = 0                       # every message the MTA showed
    listed: int = 0                      # the ones the policy was asked about
    waiting: int = 0                     # waiting for delivery, not held
    oldest_waiting: Optional[float] = None  # arrival of the oldest of those
    decisions: List[Tuple[str, str, int]] = field(default_factory=list)  # (action, sender, priority) per message
    holds: List[Hold] = field(default_factory=list)
    gated: Optional[bool] = None
    totals: Dict[Tuple[str, str], int] = field(default_factory=dict)     # (counter, sender) -> value
    last_runs: List[LastRun] = field(default_factory=list)
    # After a flush or release: the last run's plan, carried over from the file (see last_run_plan)
    carried: Optional[Tuple[float, Dict[Tuple[str, str, str], float]]] = None


def last_run_plan(path: str) -> Tuple[float, Dict[Tuple[str, str, str], float]]:
    """``qrunner_listed_messages`` and ``qrunner_decisions`` as the file has them: the last ``run``'s plan.

    A flush or a release decides for a few messages at most (or for none), so
    the gauges of the run's plan stay what the last run saw; a file that is
    missing or unreadable carries nothing over.
    """
    from prometheus_client.parser import text_string_to_metric_families

    listed, counts = 0.0, {}
    try:
        with open(path, encoding="utf-8") as handle:
            families = list(text_string_to_metric_families(handle.read()))
    except (OSError, ValueError):
        return listed, counts
    for family in families:
        for sample in family.samples:
            if sample.name == "qrunner_listed_messages":
                listed = sample.value
            elif sample.name == "qrunner_decisions":
                labels = sample.labels
                counts[(labels.get("action", ""), labels.get("sender", ""), labels.get("priority_band", ""))] = \
                    sample.value
    return listed, counts


def decisions_of(plan: Plan, paced: Iterable[Wait] = ()) -> List[Tuple[str, str, int]]:
    """The last run's plan as (action, sender, priority): send, hold (new or kept) and wait.

    ``paced``: what a pacing limit stopped while the run handed over; it waited, it was not sent.
    """
    waiting = {w.queue_id for w in plan.wait} | {w.queue_id for w in paced}
    return [("wait" if d.queue_id in waiting else "send" if d.send else "hold", d.senders, d.priority)
            for d in plan.decisions]


def policy_errors(decisions: Iterable[Decision]) -> Dict[str, int]:
    """Per sender: how many of its calls failed."""
    counts: Dict[str, int] = {}
    for decision in decisions:
        for verdict in decision.verdicts:
            if verdict.error:
                counts[verdict.sender.name] = counts.get(verdict.sender.name, 0) + 1
    return counts


class _Collector:
    """The families of one snapshot (prometheus_client's custom-collector protocol)."""

    def __init__(self, snapshot: Snapshot, now: float):
        self.snapshot = snapshot
        self.now = now

    def collect(self):
        s = self.snapshot
        yield _gauge("qrunner_queue_messages", "Messages the MTA showed qrunner's last command.", s.queue)
        yield _gauge("qrunner_listed_messages", "Messages the policy was asked about by the last run.",
                     s.carried[0] if s.carried else s.listed)
        yield _gauge("qrunner_waiting_messages", "Messages waiting for delivery (not held), as last listed.",
                     s.waiting)
        yield self._decisions()
        yield self._holds()
        oldest_hold = min((h.arrival for h in s.holds), default=None)
        yield _gauge("qrunner_oldest_hold_age_seconds", "Age (since arrival) of the oldest of qrunner's holds; "
                     "0 when there is none.", self.now - oldest_hold if oldest_hold else 0)
        yield _gauge("qrunner_oldest_waiting_age_seconds", "Age (since arrival) of the oldest waiting message; "
                     "0 when there is none.", self.now - s.oldest_waiting if s.oldest_waiting else 0)
        yield _gauge("qrunner_gated", "1: the MTA waits for qrunner (gate mode); 0: it is not gated; -1: qrunner "
                     "cannot tell.", {True: 1, False: 0, None: -1}[s.gated])
        yield from self._counters()
        yield from self._last_runs()

    def _decisions(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("qrunner_decisions", "The last run's plan per action (send, hold, wait), "
                                   "sender and priority band.", labels=["action", "sender", "priority_band"])
        counts: Dict[Tuple[str, str, str], float] = {}
        if self.snapshot.carried is not None:
            counts = dict(self.snapshot.carried[1])
        for action, sender, priority in ([] if self.snapshot.carried is not None else self.snapshot.decisions):
            key = (action, sender, band(priority))
            counts[key] = counts.get(key, 0) + 1
        for key in sorted(counts):
            family.add_metric(list(key), counts[key])
        return family

    def _holds(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("qrunner_held_messages", "qrunner's holds by why they are held.",
                                   labels=["reason_class"])
        for name in REASON_CLASSES:
            family.add_metric([name], sum(1 for h in self.snapshot.holds if reason_class(h) == name))
        return family

    def _counters(self):
        from prometheus_client.core import CounterMetricFamily

        for name, text in COUNTERS.items():
            family = CounterMetricFamily(f"qrunner_{name}", text, labels=["sender"])
            for (counter, sender), value in sorted(self.snapshot.totals.items()):
                if counter == name:
                    family.add_metric([sender], value)
            yield family

    def _last_runs(self):
        from prometheus_client.core import GaugeMetricFamily

        families = {
            "duration": GaugeMetricFamily("qrunner_last_run_duration_seconds", "How long the command's last run "
                                          "took.", labels=["command"]),
            "exit": GaugeMetricFamily("qrunner_last_run_exit_code", "The exit code of the command's last run.",
                                      labels=["command"]),
            "finished": GaugeMetricFamily("qrunner_last_run_timestamp_seconds", "When the command's last run "
                                          "completed (Unix time).", labels=["command"]),
            "success": GaugeMetricFamily("qrunner_last_success_timestamp_seconds", "When the command last completed "
                                         "its plan (exit 0, or 1 for policy errors only).", labels=["command"]),
            "errors": GaugeMetricFamily("qrunner_last_run_policy_errors", "Messages with a policy error in the "
                                        "command's last run.", labels=["command"]),
        }
        for run in self.snapshot.last_runs:
            families["duration"].add_metric([run.command], run.seconds)
            families["exit"].add_metric([run.command], run.exit_code)
            families["finished"].add_metric([run.command], run.finished)
            if run.last_success is not None:
                families["success"].add_metric([run.command], run.last_success)
            families["errors"].add_metric([run.command], run.errors)
        yield from families.values()


def _gauge(name: str, text: str, value: float):
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, text, value=value)


def write(path: str, snapshot: Snapshot) -> None:
    """The metrics file, replaced atomically, mode 0644 whatever the umask (node_exporter reads it as its own user).

    Not prometheus_client's ``write_to_textfile``: it writes a temporary
    file of a predictable name (following a symlink planted there) without
    syncing it, and creates it under the process umask.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot, time.time()))
    replace_file(path, generate_latest(registry), 0o644)
