"""Running the real ``qrunner`` command against a private Postfix, as an admin would.

Each test gets its own state directory and configuration file pointing at the
private instance (``[postfix] config_directory``), and runs ``python -m
qrunner`` as a separate process: exit codes, stdout, stderr and the lock are
then exactly what an admin sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from email.message import EmailMessage
from typing import List, Sequence

ALLOW_ALL = "function CheckFile(f, a) return a end\n"
SKIP_ALL = 'function CheckFile(f, a) a.SkipSend = true; a.Reason = "not now" return a end\n'

# ``python KILLED_RUN module:Class.method ARGS...``: the qrunner command with that method replaced
# by a SIGKILL of its own process.
KILLED_RUN = """
import importlib, os, signal, sys
module, _, attribute = sys.argv[1].rpartition(":")
owner, _, method = attribute.partition(".")
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # stopped dead at this step, as a crash or kill -9 would
setattr(getattr(importlib.import_module(module), owner), method, die)
from qrunner.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Holds by day (07:00-19:00 on the script's clock), sends at night: the clock tests move with --now.
NIGHT_ONLY = """
function CheckFile(f, a)
  local hour = os.date("*t").hour
  if hour >= 7 and hour < 19 then a.SkipSend = true; a.Reason = "daytime: waits for the night" end
  return a
end
"""


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Qrunner:
    """The qrunner command, configured for one private Postfix instance."""

    def __init__(self, tmp_path, mta, script: str = ALLOW_ALL, extra_config: str = ""):
        """``mta``: a harness (tests/mta_harness.py) or a PostfixInstance."""
        self.tmp_path = tmp_path
        self.state_dir = str(tmp_path / "state")
        self.script_path = tmp_path / "relayout.lua"
        self.config_path = tmp_path / "qrunner.toml"
        self.set_script(script)
        if hasattr(mta, "config"):
            mta_config = mta.config()
        else:
            mta_config = f'mta = "postfix"\n[postfix]\nconfig_directory = "{mta.config_directory}"\n'
        self.config_path.write_text(textwrap.dedent(f"""\
            script = "{self.script_path}"
            state_dir = "{self.state_dir}"
            script_timeout = 2
            {extra_config}
            """) + mta_config)

    def set_script(self, text: str) -> None:
        self.script_path.write_text(text)

    # A command the qrunner process is started under (e.g. setpriv with the unit's restrictions); [] for none.
    wrapper: Sequence[str] = ()

    def start_command(self) -> List[str]:
        """The argv that starts qrunner, before its own arguments."""
        return list(self.wrapper) + [sys.executable, "-m", "qrunner"]

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.start_command() + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self._env())

    def __call__(self, *args: str, timeout: float = 120) -> Result:
        proc = self.start(*args)
        out, err = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, err)

    def run_killed_at(self, step: str, *args: str, timeout: float = 120) -> Result:
        """The qrunner command (``run`` unless ``args`` say otherwise), SIGKILLed when it reaches ``step``.

        ``step`` is ``"module:Class.method"``, e.g.
        ``"qrunner.mta.postfix:PostfixBackend.hold"``: the process dies the
        moment it calls that method, before the method does anything. A kill,
        not an exception: no ``finally`` block, no lock release, no
        clean-up runs, so the next run finds the queue and the state exactly
        as a crash or ``kill -9`` would leave them.
        """
        wrapper = self.tmp_path / "killed_run.py"
        wrapper.write_text(KILLED_RUN)
        proc = subprocess.run([sys.executable, str(wrapper), step] + list(args or ("run",)), env=self._env(),
                              capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def _env(self) -> dict:
        return dict(os.environ, QRUNNER_CONFIG=str(self.config_path), PYTHONPATH=_project_root())


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_message(subject: str, size: int = 0, headers: Sequence[tuple] = (), sender: str = "alice@qrunner-test.localdomain",
                 to: str = "bob@example.net") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in headers:
        msg[name] = value
    msg.set_content("hello\n" + ("x" * 76 + "\n") * (size // 77))
    return msg.as_bytes()


def queue_message(postfix, subject: str, size: int = 0, to: Sequence[str] = ("bob@example.net",),
                  sender: str = "alice@qrunner-test.localdomain", wait: bool = True) -> str:
    """Submit a message and wait until the gate has put it in the deferred queue."""
    queue_id = postfix.submit(sender, list(to), make_message(subject, size, sender=sender, to=", ".join(to)))
    if wait:
        postfix.wait_deferred([queue_id])
    return queue_id


def queue_state(postfix) -> dict:
    """queue id -> (queue name, recipients) as postqueue -j shows it: for 'nothing changed' checks."""
    return {m["queue_id"]: (m["queue_name"], tuple(r["address"] for r in m["recipients"]))
            for m in postfix.queue()}
