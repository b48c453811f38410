"""Policy tests for admins: ``qrunner check --cases FILE``.

A cases file (TOML, or JSON with the same shape) lists messages, each with
what the policy must do with it; ``check --cases`` runs the script over them
and says, case by case, where its behaviour changed. So an admin who edits
``relayout.lua`` keeps a regression suite beside it::

    now = "2026-11-25T10:00:00"          # the clock the script sees (local time)

    [[case]]
    name = "big mail waits during the day"
    size = 12500000
    expect = { action = "hold", reason = "over 10 MB: waits until 19:00" }

A case's message: ``size`` (bytes, default 1000), ``sender`` (the envelope
sender, "" for a bounce), ``recipients`` (a list), ``headers`` (a list of
``"Name: value"`` fields), ``arrival`` (local time, default a minute before
``now``), ``filename``; its ``now`` overrides the file's. ``expect`` holds
``action`` ("send" or "hold"; "skip" is accepted for hold) and, where the
case cares, ``priority``, ``sender`` (the name of the sender that sends it)
and ``reason`` (the exact reason of a hold). Cases that share a clock run
in one pass, in file order, as the queue's oldest-first order: scripts that
count across calls see them so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Sequence, Tuple

from qrunner.config import Sender, tomllib
from qrunner.decision import Decision
from qrunner.exceptions import DataError, NoInputError
from qrunner.message import InlineHeaders, Message
from qrunner.policy import PolicyEngine, PolicySettings

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
MESSAGE_KEYS = {"size", "sender", "recipients", "headers", "arrival", "filename"}
CASE_KEYS = MESSAGE_KEYS | {"name", "now", "expect"}
EXPECT_KEYS = {"action", "priority", "sender", "reason"}
ACTIONS = {"send": True, "hold": False, "skip": False}


@dataclass(frozen=True)
class Case:
    """One message and what the policy must do with it."""

    number: int
    name: str
    now: int
    message: Message
    expect: Dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"case {self.number} ({self.name})" if self.name else f"case {self.number}"


@dataclass(frozen=True)
class Outcome:
    """A case and what the script did with it; ``changes`` is empty when it did what the case expects."""

    case: Case
    decision: Decision
    changes: Tuple[str, ...]


def load_cases(path: str) -> List[Case]:
    """The cases of a file; a malformed one is an error (65) naming the case and the key."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise NoInputError(f"{path}: cases file not found; check the --cases path.")
    except OSError as exc:
        raise NoInputError(f"{path}: cannot read the cases file ({exc.strerror}).")
    data = _decode(path, raw)
    default_now = _time(path, "now", data.get("now"), int(time.time()))
    cases = data.get("case")
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) for c in cases):
        raise DataError(f"{path}: no cases: write each as a [[case]] table (JSON: a \"case\" list of objects).")
    unknown = set(data) - {"now", "case"}
    if unknown:
        raise DataError(f"{path}: unknown key '{sorted(unknown)[0]}' at the top; only now and [[case]] tables go there.")
    return [_case(path, number, raw_case, default_now) for number, raw_case in enumerate(cases, 1)]


def _decode(path: str, raw: bytes) -> Dict[str, Any]:
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'} ({exc}); fix the file.")
    if not isinstance(data, dict):
        raise DataError(f"{path}: the cases file must be a table (JSON: an object) with [[case]] entries.")
    return data


def _time(path: str, where: str, value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        return int(time.mktime(time.strptime(value, TIME_FORMAT)))
    except (TypeError, ValueError):
        raise DataError(f"{path}: {where} {value!r} is not a local time like 2026-11-25T09:00:00.")


def _case(path: str, number: int, raw: Dict[str, Any], default_now: int) -> Case:
    where = f"case {number}"
    unknown = set(raw) - CASE_KEYS
    if unknown:
        raise DataError(f"{path}: {where}: unknown key '{sorted(unknown)[0]}' (a case has "
                        f"{', '.join(sorted(CASE_KEYS))}).")
    now = _time(path, f"{where}: now", raw.get("now"), default_now)
    arrival = _time(path, f"{where}: arrival", raw.get("arrival"), now - 60)
    checks = (("size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number of bytes"),
              ("sender", lambda v: isinstance(v, str), "a string"),
              ("recipients", lambda v: isinstance(v, list) and all(isinstance(r, str) for r in v), "a list of strings"),
              ("headers", lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v), "a list of strings"),
              ("filename", lambda v: isinstance(v, str), "a string"),
              ("name", lambda v: isinstance(v, str), "a string"))
    for key, ok, what in checks:
        if key in raw and not ok(raw[key]):
            raise DataError(f"{path}: {where}: {key} must be {what}.")
    message = Message(
        queue_id=f"case{number}", arrival=arrival + number / 1e6, size=raw.get("size", 1000),
        sender=raw.get("sender", "sender@example.org"), recipients=tuple(raw.get("recipients", ["rcpt@example.net"])),
        filename=raw.get("filename", ""),
        headers=InlineHeaders(h.encode("utf-8", "surrogateescape") for h in raw.get("headers", [])))
    return Case(number, raw.get("name", ""), now, message, _expect(path, where, raw.get("expect")))


def _expect(path: str, where: str, expect: Any) -> Dict[str, Any]:
    if not isinstance(expect, dict) or "action" not in expect:
        raise DataError(f"{path}: {where}: expect must be a table with at least action = \"send\" or \"hold\".")
    unknown = set(expect) - EXPECT_KEYS
    if unknown:
        raise DataError(f"{path}: {where}: expect has an unknown key '{sorted(unknown)[0]}' (it may have "
                        f"{', '.join(sorted(EXPECT_KEYS))}).")
    if expect["action"] not in ACTIONS:
        raise DataError(f"{path}: {where}: expect.action must be \"send\" or \"hold\", not {expect['action']!r}.")
    priority = expect.get("priority")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 1 <= priority <= 100):
        raise DataError(f"{path}: {where}: expect.priority must be a whole number from 1 to 100.")
    return dict(expect)


def run_cases(settings: PolicySettings, senders: Sequence[Sender], cases: Sequence[Case]) -> List[Outcome]:
    """Each case's decision, one pass per clock, and how it differs from the case's expectation."""
    outcomes: Dict[int, Outcome] = {}
    for now in sorted({c.now for c in cases}):
        group = [c for c in cases if c.now == now]
        with PolicyEngine(_at(settings, now)) as engine:
            decisions = {d.queue_id: d for d in engine.decide([c.message for c in group], senders)}
        for case in group:
            decision = decisions[case.message.queue_id]
            outcomes[case.number] = Outcome(case, decision, tuple(_changes(case.expect, decision)))
    return [outcomes[c.number] for c in cases]


def _at(settings: PolicySettings, now: int) -> PolicySettings:
    return replace(settings, now=now)


def _changes(expect: Dict[str, Any], decision: Decision) -> List[str]:
    """What differs, in words: 'expected hold, got send'."""
    got_action = "send" if decision.send else "hold"
    want_action = "send" if ACTIONS[expect["action"]] else "hold"
    changes = []
    if want_action != got_action:
        changes.append(f"expected {want_action}, got {got_action}")
    if "priority" in expect and decision.send and expect["priority"] != decision.priority:
        changes.append(f"expected priority {expect['priority']}, got {decision.priority}")
    if "sender" in expect and decision.send and expect["sender"] != decision.senders:
        changes.append(f"expected sender {expect['sender']}, got {decision.senders}")
    if "reason" in expect and not decision.send and expect["reason"] != decision.reason:
        changes.append(f"expected reason {expect['reason']!r}, got {decision.reason!r}")
    changes.extend(f"policy error: {error}" for error in decision.errors)
    return changes


def describe(decision: Decision) -> str:
    """A decision in one phrase, for the report: 'send, priority 50, by default' or 'hold: why'."""
    if decision.send:
        return f"send, priority {decision.priority}, by {decision.senders}"
    return f"hold: {decision.reason}"


def summary(script: str, outcomes: Sequence[Outcome]) -> str:
    """The last line of the report."""
    changed = sum(1 for o in outcomes if o.changes)
    if changed:
        return f"{script}: {len(outcomes)} cases, {changed} changed behaviour"
    return f"{script}: {len(outcomes)} cases, all as expected"
