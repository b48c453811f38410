"""Crash safety shown by fault injection (issue 14, point 1), over the memory back end.

Each case injects one fault into a real ``qrunner run`` (tests/faults/sitecustomize.py: a SIGKILL before or after
one call, or that call failing as a full or read-only disk makes it fail), looks at the queue as an admin would
right after it (``status``, ``plan``, ``explain``, ``run --dry-run`` must answer), then lets the next normal run
go and judges every message from the memory MTA's own files (tests/fault_harness.py): delivered once by the
route its sender has, or in the queue with qrunner's record; none lost, none on hold without a record, none
delivered that the policy skips, none delivered twice.

The kills go at every step of a run: every call the executor makes to the state database or the back end
(found in qrunner/executor.py's source, so that a step added later without a case here fails
:func:`test_every_step_of_a_run_has_a_fault_case`), the hand-over's steps in qrunner/mta/base.py, and the
runner's own writes around them (reconcile, the run's record, the counters, the metrics file). Two queues
reach them all: ``daily`` (holds kept, released, sent from hold, new holds, a batch of sends at several
priorities under strict_priority, a sender's route, a recovery removal left by an earlier kill, expiry back to
the sender, a hand-back to the MTA's own queue) and ``paced`` (max_active stopping the run, a route refusing
the copy).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from fault_harness import (HELD, MOVED, NIGHT, POLICY, RELEASED, RETURNED, SENT, SETUP_POLICY, TWO_SENDERS, WAITS,
                           FaultyQrunner, Scenario, assert_looks_work, finish_slow_deliveries, judge_memory, killed,
                           memory_files, recover, touched)
from memory_harness import MemoryHarness
from qrunner.mta.memory import MemoryQueue

pytestmark = [pytest.mark.reliability]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = os.environ.get("QRUNNER_LONG") == "1"
DAY = 86400

STATE = "qrunner.state:State"
BACKEND = "qrunner.mta.memory:MemoryBackend"
EXECUTOR = "qrunner.executor:Executor"  # the hand-over journal (holding, held, copied, sent) is the executor

# Every step of a run: (the function that takes it, the object it asks, the method) -> the queue that reaches it.
# Objects: "state" (the database), "backend" (the MTA), "journal" (the hand-over's records), "metrics".
STEPS = {
    # qrunner/executor.py
    ("remove", "backend", "remove"): "daily",
    ("remove", "state", "forget"): "daily",
    ("remove", "state", "forget_copies"): "daily",
    ("release_copies", "backend", "release_copies"): "daily",
    ("release_copies", "state", "mark_copies_released"): "daily",
    ("_hold", "state", "record_holding"): "daily",
    ("_hold", "backend", "hold"): "daily",
    ("_hold", "state", "mark_held"): "daily",
    ("keep", "state", "update_reason"): "daily",
    ("_release", "state", "mark_releasing"): "daily",
    ("_release", "backend", "release"): "daily",
    ("_release", "state", "forget"): "daily",
    ("_hand_back", "backend", "hand_back"): "daily",
    ("return_to_sender", "state", "mark_releasing"): "daily",
    ("return_to_sender", "backend", "give_up"): "daily",
    ("return_to_sender", "state", "forget"): "daily",
    ("_send_step", "backend", "send"): "daily",
    ("_wait_for_level", "backend", "still_delivering"): "daily",
    ("_limit_reached", "backend", "delivering"): "paced",
    ("holding", "state", "record_holding"): "daily",
    ("held", "state", "mark_held"): "daily",
    ("copied", "state", "record_copy"): "daily",
    ("copy_released", "state", "mark_copies_released"): "daily",
    ("_report", "state", "forget"): "daily",
    ("_report", "state", "update_reason"): "paced",
    ("send", "state", "record_dispatches"): "daily",
    ("send", "state", "note_attempts"): "daily",
    ("wait", "state", "record_dispatches"): "paced",
    ("wait", "state", "update_reason"): "paced",
    ("_write_history", "state", "record_history"): "daily",
    # qrunner/mta/base.py: the hand-over of a copying back end
    ("send_copying_routes", "journal", "holding"): "daily",
    ("send_copying_routes", "backend", "hold"): "daily",
    ("send_copying_routes", "journal", "held"): "daily",
    ("send_copying_routes", "journal", "sent"): "daily",
    ("removed_now", "backend", "remove"): "daily",
    ("finish_hand_over", "journal", "copied"): "daily",
    ("finish_hand_over", "journal", "copy_released"): "daily",
    ("released_now", "backend", "release_copies"): "daily",
    # qrunner/runner.py: the run's own writes around the executor
    ("_list_and_plan", "backend", "list"): "daily",
    ("_reconcile", "state", "load"): "daily",
    ("_reconcile", "state", "apply"): "daily",
    ("_execute", "state", "start_run"): "daily",
    ("_execute", "state", "prune"): "daily",
    ("_finish", "state", "finish_run"): "daily",
    ("_finish", "state", "add_counts"): "daily",
    ("_write_metrics", "metrics", "write"): "daily",
    # the memory back end's own steps of a send: the default route's scheduling, a sender's copy
    ("send_copying_routes", "backend", "_deliver"): "daily",
    ("send_copying_routes", "backend", "_hand_over"): "daily",
}
RUNNER_STEPS = ("_execute", "_finish", "_reconcile", "_write_metrics")
# The State methods that write the database.
STATE_WRITES = ("record_holding", "mark_held", "update_reason", "mark_releasing", "forget", "apply", "record_copy",
                "forget_copies", "mark_copies_released",
                "note_attempts", "start_run", "finish_run", "record_dispatches", "prune", "record_history",
                "add_counts")
TARGETS = {"state": STATE, "backend": BACKEND, "journal": EXECUTOR, "metrics": "qrunner.metrics:"}


def call_sites(path, objects, functions=None):
    """(function, object, method) for each ``self.OBJECT.method(...)`` or ``OBJECT.method(...)`` call in ``path``."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    found = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef) or (functions and function.name not in functions):
            continue
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self":
                owner_name = owner.attr
            elif isinstance(owner, ast.Name):
                owner_name = owner.id
            else:
                continue
            if owner_name in objects:
                found.add((function.name, owner_name, node.func.attr))
    return found


def test_every_step_of_a_run_has_a_fault_case():
    """A step added to the executor, the hand-over or the run's records without a kill case here fails."""
    from qrunner.executor import STAGES, Executor
    sites = (call_sites("qrunner/executor.py", {"state", "backend"})
             | call_sites("qrunner/mta/base.py", {"backend", "journal"}, {"send_copying_routes", "finish_hand_over", "released_now", "removed_now"})
             | {s for s in call_sites("qrunner/runner.py", {"state", "metrics"}, RUNNER_STEPS)
                if s[1] == "state" or s[2] == "write"})
    reads = {("_write_metrics", "state", name) for name in ("holds", "totals", "last_runs")}
    missing = sorted(sites - reads - set(STEPS))
    assert not missing, f"steps of a run without a fault case in tests/test_faults.py STEPS: {missing}"
    # and every stage the executor runs is reached by one of the cases (each stage is a method it calls)
    reached = {function for function, _, _ in STEPS}
    for stage in STAGES:
        inner = {stage.name, "_" + stage.name} | ({"_send_step", "send_copying_routes"} if stage.name == "send" else set())
        assert inner & reached, f"the executor's stage {stage.name} has no fault case"
        assert callable(getattr(Executor, stage.name))


# The MTA's own changes: a kill just after one (the MTA did it, qrunner has not heard) is a case of its own, and so
# is one just after the listing; just after any other step is just before the next, so those run under
# QRUNNER_LONG=1 only.
MTA_CHANGES = {"remove", "hold", "release", "hand_back", "give_up", "send", "_deliver", "_hand_over", "list"}


def kill_cases():
    cases = []
    for (function, owner, method), scenario in STEPS.items():
        whens = ["before", "after"] if LONG or (owner == "backend" and method in MTA_CHANGES) else ["before"]
        for when in whens:
            cases.append(pytest.param(scenario, function, owner, method, when,
                                      id=f"{scenario}-{when}-{function}-{owner}.{method}"))
    return cases


# -- the two queues -------------------------------------------------------------------------------------------


def _submit(mta, subject, arrival=None):
    from qrunner_e2e import make_message
    queue_id = mta.queue.submit("alice@qrunner-test.localdomain", ["bob@example.net"],
                                make_message(subject), arrival=arrival)
    time.sleep(0.002)  # arrival order is by time, as in a real queue
    return queue_id


def build_daily(path):
    """Holds from an earlier run (one kept, one sent now, one released to wait for its retry time, one an admin
    deleted since), a copy whose original an earlier killed run left behind, then new mail: a batch at two priorities, one for the night
    relay, a new hold, one past max_hold_age (returned to its sender), one past max_queue_time (handed back)."""
    mta = MemoryHarness(str(path / "queue"))
    mta.set(named_queue=True, max_queue_time=3 * DAY)
    qr = FaultyQrunner(path, mta, SETUP_POLICY, extra_config=(
        f'max_hold_age = {DAY}\non_hold_expiry = "bounce"\nstrict_priority = true\n'
        f'metrics_file = "{path}/metrics.prom"\n'))
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {s: _submit(mta, s) for s in ("hold keep", "later p70", "retry p60", "night zero", "hold gone")}
    setup = qr.faulted([{"target": f"{BACKEND}.remove", "caller": "removed_now"}])
    assert killed(setup), setup.stderr  # the copy of "night zero" recorded, its original not yet removed
    gone = ids.pop("hold gone")
    with MemoryQueue(mta.directory).change() as queue:
        next(m for m in queue["messages"] if m["id"] == ids["retry p60"])["retry_at"] = time.time() + 3600
        # an admin deleted one of qrunner's holds (postsuper -d): the next run's reconcile forgets its record
        queue["messages"] = [m for m in queue["messages"] if m["id"] != gone]
    now = time.time()
    for subject in ("send p90", "send p90 too", "send p40", "night one", "hold new"):
        ids[subject] = _submit(mta, subject)
    ids["expired p50"] = _submit(mta, "expired p50", arrival=now - 2 * DAY)
    ids["old p50"] = _submit(mta, "old p50", arrival=now - 4 * DAY)
    qr.set_script(POLICY)
    fates = {"hold keep": HELD, "later p70": SENT, "retry p60": WAITS, "night zero": NIGHT, "send p90": SENT,
             "send p90 too": SENT, "send p40": SENT, "night one": NIGHT, "hold new": HELD,
             "expired p50": RETURNED, "old p50": SENT}
    return Scenario(qr, mta, fates, ids)


def build_paced(path):
    """max_active = 1 with one slow delivery: the run stops handing over, one of qrunner's holds among what
    waits; first in line a message for the night relay, whose listener refuses the copy."""
    mta = MemoryHarness(str(path / "queue"))
    qr = FaultyQrunner(path, mta, SETUP_POLICY, extra_config="max_active = 1\n")
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {"later p50": _submit(mta, "later p50")}
    assert qr("run").code == 0
    for subject in ("night p90", "slow p80", "waits p30"):
        ids[subject] = _submit(mta, subject)
    mta.set(slow={ids["slow p80"]: 600}, fail={"copy": "the night listener refused it"})
    qr.set_script(POLICY)
    return Scenario(qr, mta, {"night p90": NIGHT, "slow p80": SENT, "later p50": SENT, "waits p30": SENT}, ids)


def build_holds(path, how):
    """qrunner's holds (two the policy keeps, one it no longer does), a copy for the night relay whose original a
    killed run left (the release's recovery removes it and releases the copy) and mail that arrived since, for an
    admin's ``release`` of two holds by id (``how`` "ids"), ``--all``, or ``--for-removal`` with the gate out."""
    mta = MemoryHarness(str(path / "queue"))
    mta.set(named_queue=True)
    qr = FaultyQrunner(path, mta, SETUP_POLICY, extra_config=f'metrics_file = "{path}/metrics.prom"\n')
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {s: _submit(mta, s) for s in ("hold a", "later p50", "hold b", "night zero")}
    setup = qr.faulted([{"target": f"{BACKEND}.remove", "caller": "removed_now"}])
    assert killed(setup), setup.stderr
    ids["new p40"] = _submit(mta, "new p40")
    qr.set_script(POLICY)
    fates = {"hold a": RELEASED, "later p50": RELEASED, "hold b": RELEASED, "night zero": NIGHT, "new p40": WAITS}
    if how == "ids":
        fates["hold b"] = HELD
        return Scenario(qr, mta, fates, ids, ("release", ids["hold a"], ids["later p50"]),
                        {"hold b": "held", "new p40": "waiting"})
    if how == "all":
        return Scenario(qr, mta, fates, ids, ("release", "--all"), {"new p40": "waiting"})
    mta.set(gated=False)
    fates.update({s: MOVED for s in ("hold a", "later p50", "hold b", "new p40")})
    return Scenario(qr, mta, fates, ids, ("release", "--for-removal"))


def build_flush(path, ignore_policy):
    """qrunner's holds and waiting mail; the admin flushes two holds (one the policy keeps, one it allows now) and
    two waiting messages (one for the night relay), with the policy or ``--ignore-policy``; one hold and one waiting
    message are not named."""
    mta = MemoryHarness(str(path / "queue"))
    qr = FaultyQrunner(path, mta, SETUP_POLICY, extra_config=f'metrics_file = "{path}/metrics.prom"\n')
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {s: _submit(mta, s) for s in ("hold a", "later p60", "hold b")}
    assert qr("run").code == 0
    for subject in ("send p50", "night p70", "send p30"):
        ids[subject] = _submit(mta, subject)
    qr.set_script(POLICY)
    named = [ids[s] for s in ("hold a", "later p60", "send p50", "night p70")]
    fates = {"hold a": HELD, "later p60": SENT, "hold b": HELD, "send p50": SENT, "night p70": NIGHT,
             "send p30": WAITS}
    if ignore_policy:
        fates.update({"hold a": SENT, "night p70": SENT})  # the admin's override: by the default sender
    return Scenario(qr, mta, fates, ids, ("flush", *named) + (("--ignore-policy",) if ignore_policy else ()),
                    {"hold b": "held", "send p30": "waiting"})


BUILDERS = {"daily": build_daily, "paced": build_paced,
            "release": lambda path: build_holds(path, "ids"), "release-all": lambda path: build_holds(path, "all"),
            "removal": lambda path: build_holds(path, "removal"),
            "flush": lambda path: build_flush(path, False), "flush-ignore": lambda path: build_flush(path, True)}


class Templates(dict):
    """Each queue built once, when a case first asks for it, at the path every case then runs in (qrunner's
    records name the queue's path): a run of a few cases builds only the queues they need."""

    def __init__(self, work):
        super().__init__()
        self.work = work

    def __missing__(self, name):
        place = self.work / name
        place.mkdir()
        scenario = BUILDERS[name](place)
        saved = self.work / f"{name}.template"
        shutil.copytree(place, saved, symlinks=True)
        self[name] = (scenario, place, saved)
        return self[name]


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return Templates(tmp_path_factory.mktemp("faults"))


def fresh(templates, name) -> Scenario:
    scenario, place, saved = templates[name]
    shutil.rmtree(place)
    shutil.copytree(saved, place, symlinks=True)
    scenario.mta.reopen()
    return scenario


def heal(scenario: Scenario) -> None:
    """What an admin or the MTA puts right after the fault: the refusing listener back, the slow delivery done."""
    scenario.mta.set(fail={}, stop_at={})
    finish_slow_deliveries(scenario.mta.directory)


# No duplicate is allowed anywhere: a sender's listener holds each copy until its original is gone, and a held copy
# names its original, so a run stopped between the listener's 250 and the record loses and doubles nothing
# (tests/test_handover.py has that hand-over step by step). A listener without the HOLD is the one documented
# at-least-once case, and none of these scenarios uses one.
DUPLICATE_WINDOW: dict = {}


def judged(scenario, figures, name, after, window=None):
    heal(scenario)
    recover(scenario, runs=2 if LONG else 1)
    verdict = judge_memory(scenario)
    figures.record("faults", name, tried=1, survived=int(verdict.ok or _in_window(verdict, window)),
                   lost=len(verdict.lost), duplicates=len(verdict.duplicates))
    assert verdict.ok or _in_window(verdict, window), f"after {after}: {verdict}"


def _in_window(verdict, window) -> bool:
    return bool(window) and not (verdict.lost or verdict.wrong) and all(d.startswith(window) for d in
                                                                           verdict.duplicates)


# -- the kills ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario_name, function, owner, method, when", kill_cases())
def test_a_run_killed_at_each_step_loses_nothing(templates, figures, scenario_name, function, owner, method, when):
    scenario = fresh(templates, scenario_name)
    target = f"{TARGETS[owner]}.{method}" if owner != "metrics" else f"{TARGETS[owner]}{method}"
    fault = {"target": target, "caller": function, "when": when}
    if method == "_deliver":
        fault["call"] = 2  # in the middle of a batch of sends: the first scheduled, the second not (yet)
    result = scenario.qr.faulted([fault])

    assert killed(result), f"the run never reached {fault} (exit {result.code}):\n{result.stderr}"
    assert_looks_work(scenario.qr, scenario.some_id, f"a kill {when} {function}: {owner}.{method}")
    judged(scenario, figures, "memory: SIGKILL at each step of a run", f"a kill {when} {function}: {owner}.{method}",
           DUPLICATE_WINDOW.get((scenario_name, function, method) if when == "before" else None))


# -- the admin's commands: release (by id, --all, --for-removal) and flush (with and without --ignore-policy) -------

# Every step each of the admin's commands takes, as in STEPS: (function, object, method). A release or a flush runs
# the same executor and the same hand-over as a run, over its own share of the queue (the release plan; only the
# named messages) and with its own code in runner.py around them, so each has its own kill cases.
RELEASE_STEPS = {
    ("_release_plan", "backend", "list"), ("_reconcile", "state", "load"), ("_reconcile", "state", "apply"),
    ("release", "state", "start_run"),
    ("remove", "backend", "remove"), ("remove", "state", "forget"), ("remove", "state", "forget_copies"),
    ("release_copies", "backend", "release_copies"), ("release_copies", "state", "mark_copies_released"),
    ("keep", "state", "update_reason"),  # nothing kept: an empty write all the same
    ("_release", "state", "mark_releasing"), ("_release", "backend", "release"), ("_release", "state", "forget"),
    ("_write_history", "state", "record_history"),
    ("_finish", "state", "finish_run"), ("_finish", "state", "add_counts"), ("_write_metrics", "metrics", "write"),
    ("release", "state", "prune"),
}
FLUSH_STEPS = {
    ("_list_and_plan", "backend", "list"), ("_reconcile", "state", "load"), ("_reconcile", "state", "apply"),
    ("_execute", "state", "start_run"), ("keep", "state", "update_reason"),
    ("_release", "state", "mark_releasing"), ("_release", "backend", "release"), ("_release", "state", "forget"),
    ("_send_step", "backend", "send"), ("send_copying_routes", "backend", "_deliver"),
    ("send_copying_routes", "journal", "sent"), ("send", "state", "record_dispatches"),
    ("send", "state", "note_attempts"), ("_write_history", "state", "record_history"),
    ("_finish", "state", "finish_run"), ("_finish", "state", "add_counts"), ("_write_metrics", "metrics", "write"),
    ("_execute", "state", "prune"),
}
# the policy's flush: a named hold the policy keeps, and a named message for the night relay (a sender's route)
FLUSH_BY_POLICY = FLUSH_STEPS | {
    ("holding", "state", "record_holding"), ("held", "state", "mark_held"), ("copied", "state", "record_copy"),
    ("copy_released", "state", "mark_copies_released"),
    ("send_copying_routes", "journal", "holding"), ("send_copying_routes", "backend", "hold"),
    ("send_copying_routes", "journal", "held"), ("send_copying_routes", "backend", "_hand_over"),
    ("finish_hand_over", "journal", "copied"), ("removed_now", "backend", "remove"),
    ("finish_hand_over", "journal", "copy_released"), ("released_now", "backend", "release_copies"),
    ("_report", "state", "forget"),
}
ADMIN_STEPS = {
    "release": RELEASE_STEPS,
    "release-all": RELEASE_STEPS,
    "removal": RELEASE_STEPS | {("_hand_back", "backend", "hand_back"), ("_check_emptied", "backend", "list")},
    "flush": FLUSH_BY_POLICY,
    "flush-ignore": FLUSH_STEPS,
}
# The commands' own code in runner.py, from where each starts: every step in it must have a case in one of them.
ADMIN_ENTRIES = {"release": ("release", "release-all", "removal"), "release_for_removal": ("removal",),
                 "run": ("flush", "flush-ignore")}
# What the enumeration passes over: the state's reads, and the back end's facts (asked, never changing the queue).
STATE_READS = {"close", "holds", "totals", "last_runs", "last_run", "recent_runs", "runs", "history", "hold"}
BACKEND_FACTS = {"is_message_id", "check", "gate", "unfit", "copy_of", "held_copy", "sends_from_hold", "due",
                 "expired", "queue_lifetime", "version", "describe_route", "close"}
JOURNAL = ("holding", "held", "copied", "copy_released", "sent")


def _methods(cls) -> set:
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


def traced_faults(trace: str) -> list:
    """Faults that only write down every step the command takes: each call to the state (its reads passed over),
    the back end (its facts passed over), the hand-over's journal and the metrics file."""
    from qrunner.mta.base import Backend
    from qrunner.state import State
    backend = (_methods(Backend) - BACKEND_FACTS) | {"_deliver", "_hand_over"}
    targets = ([(f"{STATE}.{m}", "state") for m in sorted(_methods(State) - STATE_READS)]
               + [(f"{BACKEND}.{m}", "backend") for m in sorted(backend)]
               + [(f"{EXECUTOR}.{m}", "journal") for m in JOURNAL] + [("qrunner.metrics:write", "metrics")])
    return [{"target": target, "do": "trace", "file": trace, "as": owner} for target, owner in targets]


def runner_steps(entry: str) -> set:
    """The steps in runner.py's own code from ``entry`` on (each Runner method it calls, in turn): its state writes,
    its back end's actions and the metrics file, as :func:`call_sites` finds them."""
    with open(os.path.join(ROOT, "qrunner/runner.py")) as f:
        tree = ast.parse(f.read())
    runner = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner")
    methods = {n.name: n for n in runner.body if isinstance(n, ast.FunctionDef)}
    reached, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in ast.walk(methods[name]):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
                    and node.func.attr in methods):
                todo.append(node.func.attr)
    from qrunner.mta.base import Backend
    actions = _methods(Backend) - BACKEND_FACTS
    return {(function, owner, method) for function, owner, method in
            call_sites("qrunner/runner.py", {"state", "backend", "metrics"}, reached)
            if (owner == "state" and method not in STATE_READS) or (owner == "backend" and method in actions)
            or (owner, method) == ("metrics", "write")}


def test_every_step_of_the_admins_release_and_flush_has_a_fault_case(templates, tmp_path):
    """Each command run once with every step written down: a step it takes that has no kill case in ADMIN_STEPS
    fails, and so does one in its code in runner.py (a branch its queue does not reach) that no command's has."""
    for name in ADMIN_STEPS:
        scenario = fresh(templates, name)
        trace = tmp_path / f"{name}.steps"
        result = scenario.qr.faulted(traced_faults(str(trace)), *scenario.command)
        assert result.code == 0 and "Traceback" not in result.stderr, f"{name}: exit {result.code}\n{result.stderr}"
        taken = {tuple(line.split()) for line in trace.read_text().splitlines()}
        missing = sorted(taken - ADMIN_STEPS[name])
        assert not missing, f"steps of {' '.join(scenario.command[:2])} ({name}) without a fault case: {missing}"
        unreached = sorted(ADMIN_STEPS[name] - taken)
        assert not unreached, f"{name}: cases for steps its queue never reaches: {unreached}"
    for entry, names in ADMIN_ENTRIES.items():
        cased = set().union(*(ADMIN_STEPS[n] for n in names))
        missing = sorted(runner_steps(entry) - cased - (set(STEPS) if entry == "run" else set()))
        assert not missing, f"steps of Runner.{entry} in qrunner/runner.py without a fault case: {missing}"


# The change each command is for: its kills before and after it run in the suite whatever ran before.
PURPOSE = {"release": {("_release", "backend", "release")}, "release-all": {("_release", "backend", "release")},
           "removal": {("_hand_back", "backend", "hand_back")},
           "flush": {("_send_step", "backend", "send"), ("send_copying_routes", "backend", "_hand_over")},
           "flush-ignore": {("_send_step", "backend", "send")}}


def admin_kill_cases():
    """SIGKILL before each step of each command, and just after each MTA change: every one under QRUNNER_LONG=1
    (about 130). The suite (its time is counted) keeps the kills no earlier case takes at the same call (a run's
    first: the same code killed at the same call leaves the same kind of records) and, for each command, the kills
    around the change it is for (the release, the move, the sends)."""
    done = {(function, owner, method, when) for (function, owner, method), _ in STEPS.items()
            for when in ("before", "after")}
    cases = []
    for name, steps in ADMIN_STEPS.items():
        for function, owner, method in sorted(steps):
            for when in ("before", "after") if owner == "backend" and method in MTA_CHANGES else ("before",):
                step = (function, owner, method, when)
                if LONG or step not in done or (function, owner, method) in PURPOSE[name]:
                    cases.append(pytest.param(name, function, owner, method, when,
                                              id=f"{name}-{when}-{function}-{owner}.{method}"))
                done.add(step)
    return cases


@pytest.mark.parametrize("scenario_name, function, owner, method, when", admin_kill_cases())
def test_the_admins_release_or_flush_killed_at_each_step_loses_nothing(templates, figures, scenario_name, function,
                                                                       owner, method, when):
    """Killed at a step, the command has acted on nothing the admin did not name; the admin runs it again (as after
    any failed command) and every message ends as the command and the policy say: none lost, none on hold
    without a record, none released or sent that the admin did not name, none delivered twice."""
    scenario = fresh(templates, scenario_name)
    target = f"{TARGETS[owner]}.{method}" if owner != "metrics" else f"{TARGETS[owner]}{method}"
    result = scenario.qr.faulted([{"target": target, "caller": function, "when": when}], *scenario.command)
    after = f"a kill {when} {function}: {owner}.{method} of {' '.join(scenario.command[:2])}"

    assert killed(result), f"the command never reached {function}: {owner}.{method} (exit {result.code}):\n" \
                           f"{result.stderr}"
    assert not touched(scenario), f"after {after}: {touched(scenario)}"
    assert_looks_work(scenario.qr, scenario.some_id, after)
    heal(scenario)
    again = scenario.qr(*scenario.command)
    assert again.code in (0, 1) and "Traceback" not in again.stderr, f"exit {again.code}:\n{again.stderr}"
    verdict = judge_memory(scenario)
    figures.record("faults", "memory: SIGKILL at each step of an admin's release or flush", tried=1,
                   survived=int(verdict.ok), lost=len(verdict.lost), duplicates=len(verdict.duplicates))
    assert verdict.ok, f"after {after} and the command again: {verdict}"


# -- the state database: the disk full or read-only at each write ------------------------------------------------



def state_write_cases():
    """Each write of the state database, full and read-only (each call site under QRUNNER_LONG=1, else each
    method at its first call site)."""
    cases, seen = [], set()
    for (function, owner, method), scenario in STEPS.items():
        if owner != "state" or method not in STATE_WRITES or (method in seen and not LONG):
            continue
        seen.add(method)
        errors = ["sqlite-full", "sqlite-readonly"]
        for error in errors:
            cases.append(pytest.param(scenario, function, method, error, id=f"{scenario}-{error}-{function}-{method}"))
    return cases


@pytest.mark.parametrize("scenario_name, function, method, error", state_write_cases())
def test_the_state_database_failing_at_each_write_loses_nothing(templates, figures, scenario_name, function, method,
                                                                error):
    """SQLite's "database or disk is full" / "attempt to write a readonly database" at one write: one sentence,
    exit 74, the run stops before its next change; the next run settles what it left."""
    scenario = fresh(templates, scenario_name)
    result = scenario.qr.faulted([{"target": f"{STATE}.{method}", "caller": function, "do": "raise", "error": error}])

    assert result.code == 74, f"exit {result.code}:\n{result.stderr}"
    assert "cannot write the state database" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert_looks_work(scenario.qr, scenario.some_id, f"{error} at {function}: {method}")
    judged(scenario, figures, "memory: the state database full or read-only at each write", f"{error} at {method}",
           DUPLICATE_WINDOW.get((scenario_name, function, method)))


# -- the MTA failing at each command -------------------------------------------------------------------------------

MTA_FAILURES = [("daily", {"fail": {"hold": "postsuper: fatal: the MTA stopped"}}),  # half-applied hold batch
                ("daily", {"fail": {"release": "the MTA stopped"}}),
                ("daily", {"fail": {"remove": "the MTA stopped"}}),
                ("daily", {"fail": {"hand_back": "the MTA stopped"}}),
                ("daily", {"fail": {"give_up": "the MTA stopped"}}),
                ("daily", {"fail": {"send": "the flush service refused it"}}),
                ("daily", {"fail": {"copy": "the listener refused it"}}),
                ("daily", "stop at the second send")]


@pytest.mark.parametrize("scenario_name, failure", MTA_FAILURES, ids=lambda f: f if isinstance(f, str) else
                         "-".join(f"{k}={next(iter(v))}" for k, v in f.items()) if isinstance(f, dict) else str(f))
def test_the_mta_failing_at_each_command_loses_nothing(templates, figures, scenario_name, failure):
    """Each command of the memory MTA failing in turn (after the first message of its batch: half-applied), or the
    MTA stopping in the middle of the sends: one sentence, no traceback; the next run settles the rest."""
    scenario = fresh(templates, scenario_name)
    if failure == "stop at the second send":
        scenario.mta.set(stop_at={scenario.ids["send p90 too"]: "the MTA was stopped"})
    else:
        scenario.mta.set(**failure)

    result = scenario.qr("run")

    assert result.code in (1, 69) and "Traceback" not in result.stderr, f"exit {result.code}:\n{result.stderr}"
    assert_looks_work(scenario.qr, scenario.some_id, f"the MTA failing: {failure}")
    judged(scenario, figures, "memory: each MTA command failing (half-applied batch, MTA stopped)", str(failure))


# -- the metrics file: the disk full or read-only -------------------------------------------------------------------


@pytest.mark.parametrize("command, error", [(("run",), "ENOSPC"), (("run",), "EROFS"),
                                            (("release", "--all"), "ENOSPC"), (("flush", "--all"), "EROFS")],
                         ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_the_metrics_file_failing_to_write_is_said_and_the_run_goes_on(templates, figures, command, error):
    """As documented (qrunner.toml(5), metrics_file): an error in the log naming the file, not the command's."""
    scenario = fresh(templates, "daily")
    result = scenario.qr.faulted([{"target": "os:open", "arg": "*metrics.prom*", "do": "raise",
                                   "error": error}], *command)

    assert result.code == 0, result.stderr
    assert f"{scenario.qr.tmp_path}/metrics.prom: cannot write the metrics file ({os.strerror(getattr(errno, error))})" \
        in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert f"{command[0]}: listed=" in result.stderr or "release: released=" in result.stderr, result.stderr
    judged(scenario, figures, "memory: the metrics file on a full or read-only disk", f"{' '.join(command)}: {error}")


# -- the clock stepping back between runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["the faulted run", "the run after"])
def test_the_clock_stepping_back_between_runs_loses_nothing(templates, figures, which):
    """Six hours back (an NTP step, a wrong hardware clock): records dated in the future change no decision."""
    scenario = fresh(templates, "daily")
    back = [{"clock": -6 * 3600}]
    first = scenario.qr.faulted(back if which == "the faulted run" else [])
    assert first.code == 0 and "Traceback" not in first.stderr, first.stderr
    second = scenario.qr.faulted(back if which == "the run after" else [])
    assert second.code == 0 and "Traceback" not in second.stderr, second.stderr
    assert_looks_work(scenario.qr, scenario.some_id, "the clock stepping back")
    judged(scenario, figures, "memory: the clock stepping back between runs", which)


# -- the Lua worker killed as the OOM killer would ---------------------------------------------------------------------


@pytest.mark.parametrize("call", [1, 2, 3])
def test_the_lua_worker_killed_by_sigkill_loses_nothing(templates, figures, tmp_path, call):
    """The kernel's OOM killer takes the worker (SIGKILL) as it decides: the run goes on, fail closed."""
    scenario = fresh(templates, "daily")
    # The worker runs as script_user (_qrunner) as root: its "struck once" mark goes where that user may write.
    marks = tempfile.mkdtemp(prefix="qrunner-worker-mark-")
    os.chmod(marks, 0o777)
    mark = os.path.join(marks, "worker-killed")
    try:
        result = scenario.qr.faulted([{"target": "qrunner.wire:Connection.send", "call": call,
                                       "caller_file": "*/qrunner/policy_worker.py", "once": mark}])
        struck = os.path.exists(mark)
    finally:
        shutil.rmtree(marks)

    assert struck, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if call == 1:  # its answer to the load: the script cannot be run, so the run stops before any change (78)
        assert result.code == 78 and "the Lua worker died while loading the script; nothing was decided" in \
            result.stderr, result.stderr
    else:  # as it sends its verdicts: the pass goes on in a fresh worker, fail closed for the message it was on
        assert result.code in (0, 1), f"exit {result.code}:\n{result.stderr}"
    assert_looks_work(scenario.qr, scenario.some_id, "the Lua worker killed")
    # The message the worker was deciding gets a policy error in that sender's pass: held there (fail closed),
    # and a later sender's pass may still take it (the contract), so its route may be the later sender's.
    struck = {subject for subject, queue_id in scenario.ids.items()
              if any(queue_id in line and "the Lua worker died" in line for line in result.stderr.splitlines())}
    heal(scenario)
    recover(scenario, runs=2 if LONG else 1)
    verdict = judge_memory(scenario)
    wrong = [w for w in verdict.wrong if not any(w.startswith(f"{s!r}: ") and "delivered ['night']" in w
                                                 for s in struck)]
    ok = not (verdict.lost or verdict.duplicates or wrong)
    figures.record("faults", "memory: the Lua worker killed (SIGKILL, as the OOM killer)", tried=1,
                   survived=int(ok), lost=len(verdict.lost), duplicates=len(verdict.duplicates))
    assert ok, f"after call {call}: {verdict} (struck: {sorted(struck)})\n{result.stderr}"


# -- a state directory that a killed first run left half-made ------------------------------------------------------

FIRST_RUN_KILLS = {
    "after the database file was created": {"target": "sqlite3:connect", "caller": "__init__", "when": "after"},
    "early in the schema's first transaction": {"target": "qrunner.state:migrate", "do": "kill-in-sqlite",
                                                "steps": 20},
    "in the middle of the schema migrations": {"target": "qrunner.state:migrate", "do": "kill-in-sqlite",
                                               "steps": 1200},
    "late in the schema migrations": {"target": "qrunner.state:migrate", "do": "kill-in-sqlite", "steps": 2400},
    "after the schema, before the first record": {"target": "qrunner.state:migrate", "when": "after"},
    "in the first hold's commit": {"target": f"{STATE}.record_holding", "do": "kill-in-sqlite", "steps": 30},
}


@pytest.mark.parametrize("where", list(FIRST_RUN_KILLS))
def test_a_first_run_killed_while_making_its_state_leaves_looks_and_the_next_run_working(tmp_path, figures, where):
    """The very first run killed while it creates the database (an empty file, a hot journal of a half-written
    schema): status, plan, explain and run --dry-run answer at once, and the next run does the whole job."""
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = FaultyQrunner(tmp_path, mta, POLICY)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {s: _submit(mta, s) for s in ("send p50", "hold this", "night p60")}

    result = qr.faulted([FIRST_RUN_KILLS[where]])

    assert killed(result), f"the first run was not killed {where} (exit {result.code}):\n{result.stderr}"
    assert_looks_work(qr, ids["send p50"], f"a first run killed {where}")
    judged(Scenario(qr, mta, {"send p50": SENT, "hold this": HELD, "night p60": NIGHT}, ids), figures,
           "memory: the first run killed while making its state directory", where)


# -- the database locked by an admin's sqlite3 session ----------------------------------------------------------------


def test_the_database_locked_by_an_admins_session_makes_the_run_wait_not_fail(templates, figures):
    """An admin's ``sqlite3 state.sqlite`` holding ``BEGIN EXCLUSIVE``: the run and the looks wait for it, then do
    their work; none fails, nothing is done twice."""
    import sqlite3
    scenario = fresh(templates, "daily")
    admin = sqlite3.connect(os.path.join(scenario.qr.state_dir, "qrunner.sqlite"), isolation_level=None)
    admin.execute("BEGIN EXCLUSIVE")
    run, status = scenario.qr.start("run"), scenario.qr.start("status")
    time.sleep(1.5)
    assert run.poll() is None and status.poll() is None  # both wait for the admin's session
    admin.execute("ROLLBACK")
    admin.close()
    _, run_err = run.communicate(timeout=120)
    status_out, status_err = status.communicate(timeout=120)

    assert run.returncode == 0, run_err
    assert status.returncode == 0 and "Traceback" not in status_err, status_err
    judged(scenario, figures, "memory: the state database locked by an admin's sqlite3 session", "released")


def _locked_past_the_busy_timeout(templates, figures):
    """Only under QRUNNER_LONG=1 (make reliability): it waits out SQLite's 30 s busy timeout. Defined, not
    skipped, so that the suite (where a skip as root fails the run) does not list it."""
    import sqlite3
    scenario = fresh(templates, "daily")
    before = json.dumps(memory_files(scenario.mta.directory)["messages"], sort_keys=True)
    admin = sqlite3.connect(os.path.join(scenario.qr.state_dir, "qrunner.sqlite"), isolation_level=None)
    admin.execute("BEGIN EXCLUSIVE")
    try:
        result = scenario.qr("run")
    finally:
        admin.execute("ROLLBACK")
        admin.close()

    assert result.code == 75 and "locked by another program" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert json.dumps(memory_files(scenario.mta.directory)["messages"], sort_keys=True) == before
    judged(scenario, figures, "memory: the state database locked by an admin's sqlite3 session", "past the timeout")


# -- kills at random times ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("round_number", range(30 if LONG else 3))
def test_a_run_killed_at_a_random_moment_loses_nothing(templates, figures, round_number):
    """kill -9 from outside, at a moment drawn at random (seeded by the round) over a whole run's length."""
    import random
    scenario = fresh(templates, "daily")
    delay = random.Random(round_number).uniform(0.05, 1.2)
    proc = scenario.qr.start("run")
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=120)
    struck = proc.returncode == -signal.SIGKILL  # a kill after the run's end injected nothing: not counted as one
    assert_looks_work(scenario.qr, scenario.some_id, f"a kill after {delay:.3f} s")
    judged(scenario, figures, "memory: SIGKILL at a random moment of a run" if struck else
           "memory: a run the random kill came too late for (judged the same)", f"a kill after {delay:.3f} s")


# -- a real disk: the state directory on a small tmpfs, filled or made read-only at a step ----------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs at ``tmp_path/state`` (qrunner's state_dir in these cases); root only (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    place = tmp_path / "state"
    place.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(place)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"as root, a tmpfs must mount here: {mounted.stderr}"
    yield place
    subprocess.run(["umount", "-l", str(place)], capture_output=True)


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_the_state_directory_filling_up_or_going_read_only_mid_run_loses_nothing(tmp_path, small_disk, figures, disk):
    """The kernel's own ENOSPC under SQLite at the first hold's record (exit 74), or EROFS from the start (78, at
    the lock): one sentence, and the next run on a healed disk settles everything."""
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = FaultyQrunner(tmp_path, mta, SETUP_POLICY)
    qr.config_path.write_text(qr.config_path.read_text() + TWO_SENDERS)
    ids = {s: _submit(mta, s) for s in ("later p50", "hold this")}
    assert qr("run").code == 0
    qr.set_script(POLICY)
    for subject in ("send p60", "hold new", "night p70"):
        ids[subject] = _submit(mta, subject)
    if disk == "full":  # filled just before the first hold's record
        fault = [{"target": f"{STATE}.record_holding", "caller": "_hold", "do": "exec",
                  "command": ["sh", "-c", f"cat /dev/zero > {small_disk}/filler 2>/dev/null; true"]}]
    else:  # read-only before the run (a file system remounts read-only after an error; no remount while written)
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        fault = []

    result = qr.faulted(fault)

    if disk == "full":
        assert result.code == 74 and "cannot write the state database" in result.stderr, result.stderr
    else:  # refused at the lock, before anything was listed or changed
        assert result.code == 78 and "cannot open the lock file (Read-only file system)" in result.stderr, \
            result.stderr
    assert "Traceback" not in result.stderr
    assert_looks_work(qr, ids["hold this"], f"the state directory {disk}")
    if disk == "full":
        os.remove(small_disk / "filler")
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    judged(Scenario(qr, mta, {"later p50": SENT, "hold this": HELD, "send p60": SENT, "hold new": HELD,
                              "night p70": NIGHT}, ids), figures,
           "memory: the state directory on a real disk gone full or read-only", disk)


if LONG:
    test_the_database_locked_past_the_busy_timeout_stops_the_run_before_any_change = _locked_past_the_busy_timeout
