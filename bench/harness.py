"""What every benchmark group shares: interleaved rounds, qrunner's command line, the policy scripts,
the 451 relay, and the profile of a command that misses its target."""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from results import Figure, Profile, Results
from timing import BenchFailure, Measured, shown

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from smtp_sink import SmtpSink  # noqa: E402  (tests/, on sys.path just above)
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)

# The policies. Each names what it selects so that the figures can be checked against what the queue holds.
SCRIPTS = {
    # reads no header: the 1 MB messages wait, the rest go at a priority from their size
    "no_header": "function CheckFile(f, a, size) if size > 900000 then a.SkipSend = 1 a.Reason = 'big' end "
                 "a.Priority = size % 100 + 1 return a end\n",
    # reads one header of every message: a subject whose number ends in 7 waits
    "one_header": "function CheckFile(f, a, s, c, rp, r, h) if (h.subject or ''):find('7$') then a.SkipSend = 1 "
                  "a.Reason = 'seven' end return a end\n",
    # holds every message, with a reason read from a header
    "hold_all": "function CheckFile(f, a, s, c, rp, r, h) a.SkipSend = 1 a.Reason = 'bench: ' .. (h.subject or '') "
                "return a end\n",
    # sends every message
    "send_all": "function CheckFile(f, a) return a end\n",
}
BIG_LIMIT = 900000  # the no-header script's (and the jq pipeline's) size limit

# The top of every qrunner.toml the bench writes. script_timeout is raised from its default of 2 s, as it was when
# trivial calls seemed to stall on a busy machine (the watchdog misreading a half-written progress block, fixed on
# 2026-12-01). The limit costs the same per call whatever its value, so the timings do not change; a worker that
# hangs for good still stops the bench, after 120 s.
CONFIG_TOP = "script_timeout = 120\n"

Step = Tuple[str, Callable[[], Measured], Optional[Callable[[Measured], None]]]


def write_scripts(directory: str) -> Dict[str, str]:
    paths = {}
    for name, text in SCRIPTS.items():
        paths[name] = os.path.join(directory, name + ".lua")
        with open(paths[name], "w") as f:
            f.write(text)
    return paths


def qrunner_env(config: str) -> Dict[str, str]:
    """qrunner as the suite runs it: this checkout, its config, and no system log (see BENCHMARKS.md)."""
    return dict(os.environ, QRUNNER_CONFIG=config, PYTHONPATH=ROOT, QRUNNER_TEST_NO_SYSTEM_LOG="1")


def qrunner(*args: str) -> List[str]:
    return [sys.executable, "-m", "qrunner", "-q", *args]


def long_rounds(args, size: int) -> Tuple[int, bool]:
    """(rounds, warm-up) of a group whose every command acts on the whole queue (hold and release): above the
    target size one round without a warm-up, as BENCHMARKS.md says (at 100,000 an Exim round takes ten minutes)."""
    if size > args.target_size:
        return 1, False
    return args.repeat, True


def rounds(results: Results, mta: str, size: int, steps: Sequence[Step], repeat: int, warmup: bool = True,
           between: Optional[Callable[[str], None]] = None, log: Callable[[str], None] = print) -> Dict[str, List[Measured]]:
    """``repeat`` rounds of every step in turn (after one warm-up round); each step checks what it did.

    ``between(name)`` runs untimed after each step (settle the queue, undo
    what the step did). The figures go into ``results`` under
    ``mta|size|name``.
    """
    done: Dict[str, List[Measured]] = collections.defaultdict(list)
    for number in range(-1 if warmup else 0, repeat):
        for name, run, check in steps:
            result = run()
            if check is not None:
                check(result)
            if between is not None:
                between(name)
            if number >= 0:
                done[name].append(result)
        if number >= 0:
            log(f"  {mta} {size}: round {number + 1}/{repeat}: " +
                ", ".join(f"{name} {done[name][-1].seconds:.2f} s" for name, _, _ in steps))
    for name, runs in done.items():
        results.add(mta, size, name, Figure(runs=[r.seconds for r in runs], count=size,
                                            max_rss_kb=[r.max_rss_kb for r in runs],
                                            tree_rss_kb=[r.tree_rss_kb for r in runs],
                                            qrunner_rss_kb=[r.qrunner_rss_kb for r in runs],
                                            command=shown(runs[0].argv)))
    return done


def expect(what: str, got, want) -> None:
    """A timed command did not do its job: its time would be a false result."""
    if got != want:
        raise BenchFailure(f"{what}: got {got}, expected {want}")


def decisions_check(total: int, skipped: int) -> Callable[[Measured], None]:
    """A ``plan --format json`` must list every message and skip exactly what the script selects."""
    import json

    def check(result: Measured) -> None:
        decisions = json.loads(result.stdout)["decisions"]
        expect(f"{shown(result.argv)}: decisions", len(decisions), total)
        expect(f"{shown(result.argv)}: skipped", sum(1 for d in decisions if d["action"] == "skip"), skipped)
        errors = sum(1 for d in decisions if d["errors"])
        expect(f"{shown(result.argv)}: policy errors", errors, 0)
    return check


_LAST_RUN = re.compile(r"^last run: .*\((\w+), ([^)]*)\): listed=(\d+) sent=(\d+) held=(\d+) released=(\d+)", re.M)


def last_run(env: Dict[str, str]) -> Dict[str, int]:
    """What ``qrunner status`` says the last run did: listed, sent, held, released (and its outcome)."""
    out = subprocess.run(qrunner("status"), env=env, capture_output=True, text=True)
    match = _LAST_RUN.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise BenchFailure(f"qrunner status did not say what the last run did: {out.stdout[-300:]}{out.stderr[-300:]}")
    return {"command": match.group(1), "outcome": match.group(2), "listed": int(match.group(3)),
            "sent": int(match.group(4)), "held": int(match.group(5)), "released": int(match.group(6))}


class SinkBench:
    """What the dispatch benchmarks share: N messages (``--dispatch``), a sink they reach, a scratch directory
    with the bench's scripts, and the MTA instance ``run`` makes; ``cleanup`` takes all of it away."""

    scratch_prefix = "qr-bench-"

    def __init__(self, args, results: Results, log: Callable[[str], None] = print):
        self.n = args.dispatch
        self.args = args
        self.results = results
        self.log = log
        self.sink = SmtpSink().start()
        self.tmp = safe_tmp.mkdtemp(self.scratch_prefix)  # qrunner as root refuses a script under /tmp
        self.scripts = write_scripts(self.tmp)
        self.instance = None

    def cleanup(self) -> None:
        if self.instance is not None:
            self.instance.cleanup()
        self.sink.stop()
        subprocess.run(["rm", "-rf", self.tmp])

class RefusingRelay:
    """A relay on 127.0.0.1 that greets every client with 451 and hangs up: dispatched mail comes back deferred.

    So that dispatch benchmarks can be repeated over the same queue without
    sending anything anywhere (and without the load of a whole SMTP
    conversation per message).
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            try:
                client.sendall(b"451 4.3.0 bench relay: try again later\r\n")
            except OSError:
                pass
            client.close()

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# -- profiles ----------------------------------------------------------------------


def profile(results: Results, title: str, argv: Sequence[str], env: Dict[str, str], log: Callable[[str], None] = print,
            spy: Optional[str] = None) -> None:
    """Run ``argv`` once under py-spy (every process, idle time included) and keep a summary of where time went."""
    spy = spy or os.environ.get("BENCH_PY_SPY") or os.path.join(ROOT, ".bench-venv", "bin", "py-spy")
    if not os.access(spy, os.X_OK):
        raise BenchFailure(f"no py-spy at {spy} to profile a missed target with (make bench installs it)")
    out = os.path.join(os.environ.get("BENCH_OUT", "/tmp"), re.sub(r"\W+", "_", title).strip("_") + ".pyspy.txt")
    log(f"  profiling: {title}")
    result = subprocess.run([spy, "record", "--format", "raw", "--idle", "--subprocesses", "--rate", "250",
                             "-o", out, "--", *argv], env=env, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.exists(out):
        raise BenchFailure(f"py-spy record of {shown(argv)} failed: {result.stderr.strip()[-300:]}")
    with open(out, encoding="utf-8", errors="replace") as f:
        text = summarise(f.read())
    results.profiles.append(Profile(title, shown(argv), text))


_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def summarise(raw: str, top: int = 12) -> str:
    """A py-spy raw (collapsed) profile as three small tables: per process, by own time, by qrunner function."""
    per_process: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        process = ("the command's own process" if len(processes) <= 1
                   else _process_name(processes[-1]) or "a child process")
        per_process[process] += samples
        if frames:
            own[_short(frames[-1])] += samples
        for name in {_short(f) for f in frames if "qrunner/" in f}:
            inclusive[name] += samples
    if not total:
        return "(no samples)"
    lines = [f"{total} samples at 250 Hz (idle time included, so waiting on a pipe or a child counts).", "",
             "| process | share |", "| --- | --- |"]
    lines += [f"| `{name}` | {n / total:.0%} |" for name, n in per_process.most_common(6)]
    lines += ["", "| own time (the frame on top) | share |", "| --- | --- |"]
    lines += [f"| `{name}` | {n / total:.1%} |" for name, n in own.most_common(top)]
    lines += ["", "| qrunner function, time inside it (callees included) | share |", "| --- | --- |"]
    lines += [f"| `{name}` | {n / total:.1%} |" for name, n in inclusive.most_common(top + 6)]
    return "\n".join(lines)


def _process_name(frame: str) -> str:
    command = frame.split(":", 1)[1].strip('"') if ":" in frame else frame
    if "qrunner.policy_worker" in command:
        return "Lua worker (qrunner.policy_worker)"
    if "-m qrunner" in command:
        return "qrunner " + (command.split("-m qrunner", 1)[1].split()[1:2] or ["?"])[0]
    return os.path.basename(command.split()[0]) if command.split() else command


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()[:80]
    path = match.group("file")
    if "qrunner/" in path:
        path = "qrunner/" + path.rsplit("qrunner/", 1)[1]
    elif "site-packages/" in path:
        path = path.rsplit("site-packages/", 1)[1]
    else:
        path = os.path.basename(path)
    return f"{match.group('func')} ({path})"


def wait_until(what: str, condition: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchFailure(f"{what} within {timeout:.0f} s")
        time.sleep(every)
