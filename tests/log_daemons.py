"""Real system loggers for the log tests, each in a private mount and pid namespace.

:class:`LogNamespace` starts ``tests/setup/log-namespace.sh`` under
``unshare --mount --pid --fork --kill-child``: an ``rsyslogd -n`` of
Debian's (unpacked by tests/setup/install-log-daemons.sh) listening on the
namespace's own ``/dev/log``, a ``systemd-journald`` with a private ``/run``
and volatile storage, or both, journald forwarding to rsyslog as on a Debian
12 host with rsyslog installed. qrunner is then run inside that namespace
with ``nsenter``, so that it finds the logger at the paths it always uses
(``/run/systemd/journal/socket``, ``/dev/log``); the host's own log is never
touched. What the tests expect comes from the daemons' own output: rsyslog's
files and ``journalctl``.

A logger that is not installed skips the test (or fails it under
``QRUNNER_REQUIRE_MTA=1``, tests/mta_available.py); one that is installed but
does not start fails it, with the daemon's own words.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from qrunner_e2e import Qrunner

from qrunner.log import TEST_NO_SYSTEM_LOG

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup", "log-namespace.sh")
RSYSLOG_PREFIX = os.environ.get("QRUNNER_TEST_RSYSLOG_PREFIX", "/opt/qrunner-test-rsyslog")
RSYSLOGD = os.path.join(RSYSLOG_PREFIX, "usr", "sbin", "rsyslogd")
JOURNALD = "/lib/systemd/systemd-journald"
KINDS = ("none", "rsyslog", "journald", "journald+rsyslog")


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    pid: int


def log_daemon_missing_reason(kind: str) -> Optional[str]:
    """Why the loggers of ``kind`` cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "the log daemon tests must run as root (a private mount and pid namespace needs it)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if "rsyslog" in kind and not os.access(RSYSLOGD, os.X_OK):
        return f"the private rsyslog is not installed (no {RSYSLOGD}); run tests/setup/install-log-daemons.sh as root"
    if "journald" in kind and not (os.access(JOURNALD, os.X_OK) and shutil.which("journalctl")):
        return (f"systemd-journald or journalctl is not installed (no {JOURNALD}); "
                "run tests/setup/install-log-daemons.sh as root")
    return None


class LogNamespace:
    """A private mount and pid namespace with a real system logger of ``kind`` in it (see KINDS)."""

    def __init__(self, kind: str, directory: str):
        self.kind = kind
        self.directory = directory
        self.proc: Optional[subprocess.Popen] = None
        self.init_pid = 0

    def start(self) -> None:
        """Start the namespace and its logger; raise RuntimeError with the reason if the logger does not listen."""
        os.makedirs(self.directory, exist_ok=True)
        # journald reads /proc/PID of each client for its metadata: it needs the namespace's own /proc.
        mount_proc = ["--mount-proc"] if "journald" in self.kind else []
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", *mount_proc,
                                      "bash", SCRIPT, self.kind, self.directory],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.stop()
            err = self.proc.stderr.read().decode("utf-8", "replace").strip()
            raise RuntimeError(f"the {self.kind} namespace did not start: {err or 'no ready within 30 s'}")
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            self.init_pid = int(f.read().split()[0])  # the script, pid 1 inside: nsenter's target

    def stop(self) -> None:
        """End the namespace: unshare's --kill-child ends its pid 1, and the kernel every daemon in it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def enter(self, pid_namespace: bool) -> List[str]:
        """The nsenter prefix for a command run inside: always the mount namespace, the pid one if asked.

        A real MTA's daemons run outside: ``postfix status`` must see the
        master's pid, so qrunner over Postfix or Exim joins the mount
        namespace only.
        """
        return ["nsenter", "--target", str(self.init_pid), "--mount"] + (["--pid"] if pid_namespace else [])

    def run(self, args: Sequence[str], pid_namespace: bool = True, env: Optional[Dict[str, str]] = None,
            stderr=subprocess.PIPE) -> Ran:
        """``args`` inside the namespace. Without ``pid_namespace`` nsenter execs them: ``pid`` is theirs."""
        proc = subprocess.Popen(self.enter(pid_namespace) + ["--"] + list(args), stdout=subprocess.PIPE,
                                stderr=stderr, text=True, env=env)
        out, err = proc.communicate(timeout=120)
        return Ran(proc.returncode, out, err or "", proc.pid)

    def qrunner(self, qr: Qrunner, *args: str, pid_namespace: bool = True) -> Ran:
        """``qrunner ARGS`` inside the namespace, as cron runs it: stdout and stderr pipes, no terminal."""
        return self.run([sys.executable, "-m", "qrunner", *args], pid_namespace, env=system_log_env(qr))

    # -- what the loggers wrote ---------------------------------------------

    def file(self, name: str) -> str:
        """One of rsyslog's files in the test's directory (mail.log, all.log); "" before its first line."""
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def journal(self, *args: str) -> List[dict]:
        """``journalctl -o json ARGS`` inside the namespace: the private journal's entries, as journald stored them."""
        result = self.run(["journalctl", "--no-pager", "-o", "json", *args])
        if result.code not in (0, 1):  # 1: --grep found nothing
            raise RuntimeError(f"journalctl {' '.join(args)} failed: {result.stderr.strip()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def wait_until(self, done: Callable[[], object], what: str) -> None:
        """Wait for the logger to have written ``what`` (loggers write asynchronously)."""
        wait_until(done, f"the {self.kind} namespace's logger showing {what}")


def wait_until(done: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


def system_log_env(qr: Qrunner) -> Dict[str, str]:
    """The test run's environment for qrunner, with the system log on (tests/conftest.py turns it off)."""
    env = qr._env()
    env.pop(TEST_NO_SYSTEM_LOG, None)
    return env
