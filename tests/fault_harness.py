"""What the fault-injection cases share: a qrunner with faults, the scenarios, and the one check after a fault.

A fault is injected into the real ``qrunner`` subprocess by tests/faults/sitecustomize.py (nothing in qrunner's
own code): killed by SIGKILL before or after one call, or that call failing as the disk or SQLite would.
Afterwards the next normal runs must leave every message as the policy says: delivered once by the route its
sender has, or still in the queue (on hold with qrunner's record and reason, or waiting): none lost, none on
hold without a record, none delivered that the policy skips, none delivered twice. That is judged from the
memory MTA's own files (``queue.json``, the message files, its ``delivered`` list), the real MTAs' own tools and
the sink, and ``qrunner status`` as the admin reads it: never from qrunner's database.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from qrunner_e2e import Qrunner, Result

FAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")

# The policy of every scenario, by subject: "hold" always waits; "night" goes by the second sender's route;
# "later" and "retry" wait in the first run (SETUP) and are allowed from then on; "pNN" is the priority.
POLICY = """
function CheckFile(f, a, size, created, from, rcpts, headers)
  local subject = headers.subject or ""
  if subject:find("hold") then a.SkipSend = 1; a.Reason = "subject says hold"; return a end
  if subject:find("night") and sendername ~= "night" then a.SkipSend = 1; a.Reason = "for the night relay"; return a end
  if SETUP and (subject:find("later") or subject:find("retry")) then a.SkipSend = 1; a.Reason = "not yet"; return a end
  a.Priority = tonumber(subject:match("p(%d+)")) or 50
  return a
end
"""
SETUP_POLICY = "SETUP = true\n" + POLICY

TWO_SENDERS = ('[[sender]]\nid = 0\nname = "main"\ndefault = true\n'
               '[[sender]]\nid = 1\nname = "night"\n')


class FaultyQrunner(Qrunner):
    """The qrunner command, with ``faults`` (see tests/faults/sitecustomize.py) injected into one invocation."""

    faults: Sequence[dict] = ()

    def _env(self) -> dict:
        env = super()._env()
        if self.faults:
            env["PYTHONPATH"] = FAULTS_DIR + os.pathsep + env["PYTHONPATH"]
            env["QRUNNER_FAULTS"] = json.dumps(list(self.faults))
        return env

    def faulted(self, faults: Sequence[dict], *args: str, timeout: float = 120) -> Result:
        self.faults = list(faults)
        try:
            return self(*(args or ("run",)), timeout=timeout)
        finally:
            self.faults = ()

    def looks(self, queue_id: str, every: bool = True) -> Dict[str, Result]:
        """status, plan, explain and run --dry-run, started together (they take no lock and change nothing).

        ``every`` False leaves out ``plan``, which reads the state and plans exactly as ``run --dry-run`` does
        (the suite's short form; QRUNNER_LONG=1 runs all four).
        """
        commands = {"status": ("status",), "plan": ("plan",), "explain": ("explain", queue_id),
                    "dry run": ("run", "--dry-run")}
        if not every:
            del commands["plan"]
        started = {name: self.start(*args) for name, args in commands.items()}
        results = {}
        for name, proc in started.items():
            out, err = proc.communicate(timeout=120)
            results[name] = Result(proc.returncode, out, err)
        return results


def assert_looks_work(qr: FaultyQrunner, queue_id: str, after: str) -> None:
    """Right after a fault, the admin can look: each command answers (0, or 1 for what it reports), no traceback."""
    for name, result in qr.looks(queue_id).items():
        assert result.code in (0, 1) and "Traceback" not in result.stderr, (
            f"{name} after {after}: exit {result.code}\n{result.stdout}\n{result.stderr}")


# -- what a message must end as -------------------------------------------------------------------------------

SENT, NIGHT, HELD, WAITS, RETURNED = "sent", "sent by night", "held", "waits", "returned to its sender"
# What an admin's ``release`` leaves: released (waiting again, in qrunner's queue), moved to the MTA's default queue.
RELEASED, MOVED = "released by the admin", "moved to the default queue by the admin"


@dataclass
class Scenario:
    """A queue and a state a fault is injected into: what each message (by subject) must end as."""

    qr: FaultyQrunner
    mta: object
    fates: Dict[str, str]
    ids: Dict[str, str] = field(default_factory=dict)  # subject -> queue id as submitted
    command: Sequence[str] = ("run",)  # the command the fault goes into
    # subject -> its state in the queue before the command: messages the command must not touch (an admin's release
    # or flush of other messages), judged right after the faulted command, before any recovery
    untouched: Dict[str, str] = field(default_factory=dict)

    @property
    def some_id(self) -> str:
        return next(iter(self.ids.values()))


def memory_files(directory: str) -> dict:
    """The memory MTA's queue, read from its own files (``queue.json`` and the log of operations since: its own
    truth, as postqueue -j is Postfix's)."""
    from qrunner.mta.memory import MemoryQueue
    return MemoryQueue(directory).read()


def subject_of(directory: str, queue_id: str) -> str:
    with open(os.path.join(directory, "messages", queue_id), "rb") as f:
        for line in f.read().split(b"\n\n", 1)[0].split(b"\n"):
            if line.lower().startswith(b"subject:"):
                return line.split(b":", 1)[1].strip().decode()
    return ""


def text_of(directory: str, queue_id: str) -> str:
    with open(os.path.join(directory, "messages", queue_id), "rb") as f:
        return f.read().decode("utf-8", "replace")


@dataclass
class Verdict:
    lost: List[str]
    duplicates: List[str]
    wrong: List[str]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.wrong)


def judge_memory(scenario: Scenario) -> Verdict:
    """Each message's end, from the memory MTA's files and ``qrunner status``, against its fate."""
    directory = scenario.mta.directory
    scenario.mta.sink.finish()
    queue = memory_files(directory)
    delivered: Dict[str, List[str]] = {}
    for entry in queue["delivered"]:
        delivered.setdefault(subject_of(directory, entry["id"]), []).append(entry["route"] or "default")
    queued: Dict[str, List[dict]] = {}
    for entry in queue["messages"]:
        queued.setdefault(subject_of(directory, entry["id"]), []).append(entry)
    status = scenario.qr("status")
    assert status.code == 0, status.stderr
    recorded = {line.split()[0] for line in status.stdout.splitlines() if line.strip()}
    lost, duplicates, wrong = [], [], []
    for subject, fate in scenario.fates.items():
        routes, entries = delivered.get(subject, []), queued.get(subject, [])
        if len(routes) > 1 or (routes and entries) or len(entries) > 1:
            duplicates.append(f"{subject!r}: delivered {routes}, still queued {[e['state'] for e in entries]}")
        elif fate in (SENT, NIGHT):
            want = "night" if fate == NIGHT else "default"
            if not routes and not entries:
                lost.append(f"{subject!r}: neither delivered nor queued")
            elif routes != [want]:
                wrong.append(f"{subject!r}: {fate}, but delivered {routes} / queued {[e['state'] for e in entries]}")
        elif fate == HELD:
            if routes:
                wrong.append(f"{subject!r}: the policy holds it, but it was delivered by {routes}")
            elif not entries:
                lost.append(f"{subject!r}: held by the policy, but gone")
            elif entries[0]["state"] != "held" or entries[0]["id"] not in recorded:
                wrong.append(f"{subject!r}: {entries[0]['state']}, on qrunner's record: "
                             f"{entries[0]['id'] in recorded}")
        elif fate == WAITS:
            if routes:
                wrong.append(f"{subject!r}: waits for its retry time, but was delivered by {routes}")
            elif not entries:
                lost.append(f"{subject!r}: gone")
            elif entries[0]["state"] == "held" and entries[0]["id"] not in recorded:
                wrong.append(f"{subject!r}: on hold without qrunner's record")
        elif fate in (RELEASED, MOVED):
            moved = [e for e in entries if e["id"] in queue["default_queue"]]
            if not routes and not entries:
                lost.append(f"{subject!r}: gone")
            elif routes and routes != ["default"]:
                wrong.append(f"{subject!r}: {fate}, but delivered {routes}")
            elif entries and entries[0]["state"] == "held":
                wrong.append(f"{subject!r}: {fate}, but still on hold")
            elif entries and fate == MOVED and not moved:
                wrong.append(f"{subject!r}: {fate}, but still in qrunner's queue")
            elif entries and fate == RELEASED and (moved or entries[0]["id"] in recorded):
                wrong.append(f"{subject!r}: {fate}, but moved to the default queue or still on qrunner's record")
        elif fate == RETURNED:
            original = scenario.ids[subject]
            bounced = [m["id"] for m in queue["messages"]] + [d["id"] for d in queue["delivered"]]
            if routes or entries:
                wrong.append(f"{subject!r}: to be returned to its sender, but delivered {routes} / queued")
            elif not any(f"Your message {original} was returned" in text_of(directory, b) for b in bounced):
                lost.append(f"{subject!r}: gone without a bounce to its sender")
    for entry in queue["messages"]:  # no hold without a record, whatever the message
        if entry["state"] == "held" and entry["id"] not in recorded:
            wrong.append(f"{entry['id']} ({subject_of(directory, entry['id'])!r}) is on hold without qrunner's record")
    if "settled by the next run" in status.stdout:
        wrong.append("status still shows records of interrupted steps after the recovery runs:\n" + status.stdout)
    return Verdict(lost, duplicates, wrong)


def touched(scenario: Scenario) -> List[str]:
    """The messages the command was not asked about that it changed (released, moved, delivered, gone), from the
    memory MTA's files: a kill at any step must never make a release or a flush act on more than the admin named."""
    directory = scenario.mta.directory
    queue = memory_files(directory)
    now = {subject_of(directory, m["id"]): ("moved" if m["id"] in queue["default_queue"] else m["state"])
           for m in queue["messages"]}
    return [f"{subject!r}: {before} before the command, {now.get(subject, 'gone')} after it"
            for subject, before in scenario.untouched.items() if now.get(subject) != before]


def finish_slow_deliveries(directory: str) -> None:
    """The relay finished what it was still taking (a slow delivery of the scenario), as it would by now."""
    from qrunner.mta.memory import MemoryQueue
    with MemoryQueue(directory).change() as queue:
        for entry in queue["messages"]:
            if entry["state"] == "active":
                entry["active_until"] = 0
        queue["slow"] = {}


def recover(scenario: Scenario, runs: int = 2) -> List[Result]:
    """The next normal runs, after the fault is gone: each must end 0 (or 1 naming what it could not do)."""
    results = []
    for _ in range(runs):
        result = scenario.qr("run")
        assert result.code in (0, 1) and "Traceback" not in result.stderr, result.stderr
        results.append(result)
        time.sleep(0.01)
    return results


def killed(result: Result) -> bool:
    return result.code == -9


def run_quietly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)
