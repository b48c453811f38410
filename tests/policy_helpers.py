"""Shared helpers for the policy, plan, check and configuration tests.

Everything here drives qrunner through its public surface: the engine API
(``PolicyEngine(PolicySettings(...)).decide(messages, senders)``), the
command line in-process (``qrunner.cli.main([...])``) and, where a real
process boundary matters, ``python -m qrunner``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import safe_tmp

from qrunner.cli import main as cli_main
from qrunner.config import Sender
from qrunner.message import HeaderSource, InlineHeaders, Message
from qrunner.policy import PolicyEngine, PolicySettings

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SCRIPTS_DIR = Path(safe_tmp.shipped("tests/scripts"))  # handed to qrunner: a copy strict modes accept (safe_tmp)
LUA_VERSIONS = ("5.1", "5.2", "5.3", "5.4", "5.5", "luajit")

# A fixed, recent arrival time; messages in a test arrive a minute apart.
BASE_ARRIVAL = 1_764_050_000

DEFAULT = (Sender(0, "default"),)


def message(queue_id: str, arrival: float = BASE_ARRIVAL, size: int = 1000, sender: str = "alice@example.org",
            recipients: Sequence[str] = ("bob@example.net",), headers: Optional[Iterable] = None,
            filename: str = "", queue_name: str = "deferred") -> Message:
    """A Message; ``headers`` may be a HeaderSource or raw fields (str or bytes)."""
    if headers is None:
        source = InlineHeaders([])
    elif isinstance(headers, HeaderSource):
        source = headers
    else:
        source = InlineHeaders(h.encode() if isinstance(h, str) else h for h in headers)
    return Message(queue_id=queue_id, arrival=arrival, size=size, sender=sender,
                   recipients=tuple(recipients), queue_name=queue_name, filename=filename, headers=source)


def write_script(directory: Path, text: str, name: str = "relayout.lua") -> Path:
    path = Path(directory) / name
    path.write_text(text)
    return path


def settings(script: Path, **overrides) -> PolicySettings:
    """Policy settings with a short time limit so that runaway tests stay fast."""
    values = {"timeout": 0.5}
    values.update(overrides)
    return PolicySettings(script=str(script), **values)


def decide(directory: Path, script_text: str, messages: Sequence[Message],
           senders: Sequence[Sender] = DEFAULT, **overrides):
    """Write ``script_text`` and run the engine over ``messages``; decisions in arrival order."""
    script = write_script(directory, script_text)
    with PolicyEngine(settings(script, **overrides)) as engine:
        return engine.decide(messages, senders)


def by_id(decisions) -> Dict[str, object]:
    return {d.queue_id: d for d in decisions}


class PolicyLog(logging.Handler):
    """Collects what the engine logs (the lines an admin would read on stderr)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# -- header sources that record when they are read ---------------------------


class RecordingHeaders(HeaderSource):
    """Inline header fields that append a line to ``log_path`` each time they are read.

    qrunner's policy parent reads it when the worker asks (the worker runs
    as script_user and reads no header source itself); the test then sees
    from the file whether, and how often, the headers were read.
    """

    def __init__(self, log_path: str, queue_id: str, lines: Sequence[str]):
        self.log_path = str(log_path)
        self.queue_id = queue_id
        self.lines = [line.encode() for line in lines]

    def read(self) -> List[bytes]:
        with open(self.log_path, "a") as handle:
            handle.write(self.queue_id + "\n")
        return list(self.lines)


def reads(log_path: Path) -> List[str]:
    """The queue ids whose headers were read, in order."""
    try:
        return Path(log_path).read_text().split()
    except FileNotFoundError:
        return []


# -- snapshots and the command line -----------------------------------------


def record(queue_id: str, arrival: float = BASE_ARRIVAL, size: int = 1000, sender: str = "alice@example.org",
           recipients: Sequence[str] = ("bob@example.net",), headers: Optional[Sequence[str]] = None,
           filename: Optional[str] = None, queue_name: str = "deferred") -> dict:
    """One snapshot line, exactly as ``postqueue -j`` prints it (plus optional headers/filename)."""
    line = {
        "queue_name": queue_name, "queue_id": queue_id, "arrival_time": arrival, "message_size": size,
        "forced_expire": False, "sender": sender,
        "recipients": [{"address": r, "delay_reason": "delivery temporarily suspended: deferred transport"}
                       for r in recipients],
    }
    if headers is not None:
        line["headers"] = list(headers)
    if filename is not None:
        line["filename"] = filename
    return line


def write_snapshot(directory: Path, records: Iterable, name: str = "queue.jsonl") -> Path:
    path = Path(directory) / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_config(directory: Path, text: str, name: str = "qrunner.toml") -> Path:
    path = Path(directory) / name
    path.write_text(text)
    return path


def run_cli(capsys, args: Sequence[str]):
    """``qrunner ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, args: Sequence[str]):
    """``qrunner ... plan --format json``: (exit code, decisions list, stderr)."""
    code, out, err = run_cli(capsys, list(args) + ["--format", "json"])
    assert out.count("\n") == 1, out
    return code, json.loads(out)["decisions"], err


def run_qrunner(args: Sequence[str], input: Optional[bytes] = None, env: Optional[Dict[str, str]] = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m qrunner ARGS`` in a real process (bytes stdout/stderr), configured by defaults unless ``env`` says."""
    full_env = dict(os.environ)
    # An empty configuration (defaults), whatever is installed under /etc/qrunner.
    full_env["QRUNNER_CONFIG"] = os.devnull
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(TESTS_DIR)) if p)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "qrunner"] + [str(a) for a in args], input=input,
                          capture_output=True, env=full_env, timeout=timeout, cwd=str(REPO_ROOT))


def local_epoch(text: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS`` in the current local time zone as epoch seconds."""
    return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


# -- fixtures (import them into a test module by name) ------------------------

import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def no_default_config(monkeypatch, tmp_path):
    """No QRUNNER_CONFIG and no file at the default path: the defaults apply."""
    import qrunner.config

    monkeypatch.delenv("QRUNNER_CONFIG", raising=False)
    monkeypatch.setattr(qrunner.config, "DEFAULT_CONFIG", str(tmp_path / "absent" / "qrunner.toml"))


@pytest.fixture
def policy_log():
    """What the policy engine logs, collected."""
    handler = PolicyLog()
    logger = logging.getLogger("qrunner.policy")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def set_tz(monkeypatch):
    """set_tz("Zone/Name"): the local time zone for this process and the workers it starts."""

    def apply(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    yield apply
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def worker_imports_tests(monkeypatch):
    """Let the policy worker process unpickle header sources defined in this module."""
    existing = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS_DIR), existing) if p))
