"""Time one command for the benchmarks; a command that fails ends the benchmark.

A failing command can be faster than a working one (``qrunner plan`` that
stops at a configuration error takes milliseconds), so its time would be a
false result: the benchmark stops with a non-zero exit and says which
command failed and why. :func:`measured` also keeps what the command
printed, so that the caller can check it did its job (a plan that lists
every message), and its peak memory.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


class BenchFailure(SystemExit):
    """A timed command failed or did not do its job: the benchmark stops (exit status 1) naming it."""

    def __init__(self, message: str):
        super().__init__("benchmark stopped: " + message)


def timed_run(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> float:
    """Seconds ``argv`` took; SystemExit naming the command when it exits non-zero."""
    return measured(argv, env).seconds


@dataclass
class Measured:
    """One finished command: wall seconds, what it printed, and its memory."""

    argv: Sequence[str]
    seconds: float
    stdout: bytes
    stderr: bytes
    max_rss_kb: int  # the largest single process of the command's tree (see measured())
    tree_rss_kb: int  # the largest sum over the process and its descendants, sampled every 20 ms (0: not sampled)
    qrunner_rss_kb: int = 0  # qrunner's own processes (the command and its Lua worker): their peaks (VmHWM), summed

    def lines(self) -> list:
        return self.stdout.decode("utf-8", "replace").splitlines()


def measured(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, input: Optional[bytes] = None,
             sample_memory: bool = False) -> Measured:
    """Run ``argv`` once and time it; BenchFailure naming the command when it exits non-zero.

    Output goes to temporary files, not pipes, so that reading it costs the
    timed command nothing. The exit status and the peak RSS come from
    ``wait4``, the kernel's own accounting of the finished process.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=stdin, stdout=out, stderr=err, env=dict(env) if env else None)
        sampler = _TreeSampler(proc.pid) if sample_memory else None
        if input is not None:
            try:
                proc.stdin.write(input)
            except BrokenPipeError:
                pass
            proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        tree, own, largest = sampler.stop() if sampler else (0, 0, 0)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        why = stderr.decode("utf-8", "replace").strip().splitlines()
        raise BenchFailure("%s exited with %d%s" % (shown(argv), proc.returncode, (": " + why[-1]) if why else ""))
    # wait4's ru_maxrss is no use for the largest process: on Linux a forked child starts from its parent's peak
    # and keeps it across exec, so every command would show at least this bench's own RSS (600 MB with a corpus
    # of 100,000 in memory). Where the tree was sampled, the largest VmHWM any of its processes reached is shown.
    return Measured(argv, seconds, stdout, stderr, largest if sampler else usage.ru_maxrss, tree, own)


def shown(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) < 300 else text[:300] + "..."


class _TreeSampler:
    """Memory of a process and its descendants, read from /proc every 20 ms.

    Two figures: the peak of the summed RSS of the whole tree, and qrunner's
    own memory: the high-water mark (VmHWM, kept by the kernel, so a peak
    between two samples is not missed) of each process whose command line is
    qrunner's (the command itself and its Lua worker), summed. The kernel's
    ``wait4`` figure alone would not do for the latter: it is the largest
    process of the tree, which may be an MTA tool that qrunner ran.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self.hwm: dict = {}  # pid -> the last VmHWM read, for qrunner's own processes
        self.largest = 0  # the largest VmHWM of any process of the tree
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(0.02):
            total = 0
            for pid in _tree(self.pid):
                status = _status_kb(pid)
                total += status.get("VmRSS", 0)
                self.largest = max(self.largest, status.get("VmHWM", 0))
                if "VmHWM" in status and (pid == self.pid or pid in self.hwm or _is_qrunner(pid)):
                    self.hwm[pid] = max(self.hwm.get(pid, 0), status["VmHWM"])
            self.peak = max(self.peak, total)

    def stop(self) -> tuple:
        self._done.set()
        self._thread.join()
        return self.peak, sum(self.hwm.values()), self.largest


def _tree(pid: int) -> list:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return pids


def _status_kb(pid: int) -> dict:
    """VmRSS and VmHWM of ``pid`` in KB (empty once it has gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return found


def _is_qrunner(pid: int, python: str = os.path.realpath(sys.executable)) -> bool:
    """qrunner's Lua worker (``python -m qrunner.policy_worker``): not an MTA tool qrunner started.

    Matched on the worker's own command line: a child that qrunner forked
    to run an MTA tool has qrunner's command line and memory for the instant
    before it execs, and must not be counted as a second qrunner.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.realpath(f"/proc/{pid}/exe") == python and b"qrunner.policy_worker" in f.read()
    except OSError:
        return False
