"""``make bench``: real queues in the real MTAs of the test setup, measured; BENCHMARKS.md written from the results.

    .venv/bin/python bench/run.py [--sizes 1000,10000,100000] [--repeat 3] [--dispatch 1000]
                                  [--output BENCHMARKS.md] [--readme README.md] [--json FILE]
    .venv/bin/python bench/run.py --from-json bench/out/results.json   # the report again, nothing measured

Run as root after ``make install-test-deps`` (``make bench`` does both, and
puts pymailq and py-spy into the bench-only venv ``.bench-venv``). For each
size it builds a private Postfix instance's queue and measures planning,
hold and release, today's tools and flush dispatch, removes it, then does
the same with the private Exim; then re-injection and Exim's ``-Mc``
dispatch over fresh queues of ``--dispatch`` messages. Each figure is a
median of ``--repeat`` interleaved rounds; each comparison a ratio taken in
the same rounds. Any timed command that fails, or does not do its job,
stops the bench with exit status 1 naming it; nothing it measured is then
written. Nothing here is a test: no figure fails anything.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import corpus  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
from exim_bench import EximBench, EximDispatchBench  # noqa: E402
from postfix_bench import PostfixBench, ReinjectBench  # noqa: E402
from results import Results  # noqa: E402


def log(text: str) -> None:
    print(text, flush=True)


def _out(argv) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def machine(args) -> dict:
    from exim_instance import BINARY
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) / 1024 / 1024
    try:
        from importlib.metadata import version
        lupa = version("lupa")
    except Exception:  # noqa: BLE001 - shown as unknown
        lupa = "?"
    pymailq = _out([os.path.join(args.bench_venv, "bin", "python"), "-c", "import pymailq; print(pymailq.VERSION)"])
    spy = _out([os.path.join(args.bench_venv, "bin", "py-spy"), "--version"])
    commit = _out(["git", "-C", harness.ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _out(["git", "-C", harness.ROOT, "status", "--porcelain", "--", "qrunner"])
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "memory": f"{memory:.1f} GiB",
        "cpu": cpu,
        "Debian": open("/etc/debian_version").read().strip(),
        "kernel": platform.release(),
        "Postfix": _out(["postconf", "-h", "mail_version"]),
        "Exim": _out([BINARY, "-C", "/dev/null", "-bV"]).splitlines()[0] if os.path.exists(BINARY) else "?",
        "Python": platform.python_version(),
        "lupa": lupa,
        "jq": _out(["jq", "--version"]),
        "pymailq": pymailq or "?",
        "py-spy": spy or "?",
        "qrunner commit": commit + (" (qrunner/ changed since)" if dirty else ""),
    }


def enough_disk(size: int, where: str = "/tmp") -> None:
    """The bench builds one MTA's queue at a time under /tmp: stop before a build that would fill the disk."""
    need = corpus.expected_bytes(size) * 1.3 + 500e6  # a Postfix queue of 10,000 took 471 MB for 386 MB of mail
    free = shutil.disk_usage(where).free
    if free < need:
        raise SystemExit(f"make bench: {size:,} messages need about {need / 1e9:.1f} GB free under {where} "
                         f"(one MTA's queue at a time) and there are {free / 1e9:.1f} GB; free some space or "
                         f"leave this size out of SIZES")


class LoadWatch:
    """The 1-minute load average before the bench and the highest it reached: was the machine shared?"""

    def __init__(self):
        self.before = self.highest = os.getloadavg()[0]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(10):
            self.highest = max(self.highest, os.getloadavg()[0])

    def stop(self) -> None:
        self._done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="queue sizes, separated by commas or spaces")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per group (the median of these is shown)")
    parser.add_argument("--dispatch-repeat", type=int,
                        help="rounds of the flush dispatch group (default: 5, or --repeat when larger): its loop waits "
                             "on Postfix's flush service, whose answers vary with the deliveries each round sets off "
                             "(0.23 to 0.57 s for the same 1,000 requests), so its median needs more rounds")
    parser.add_argument("--tool-repeat", type=int, help="rounds of the slow tools (jq pipeline, pymailq); "
                                                         "default: --repeat")
    parser.add_argument("--dispatch", type=int, default=1000, help="messages per dispatch benchmark")
    parser.add_argument("--pymailq-size", type=int, default=10000, help="the queue size pymailq runs at")
    parser.add_argument("--target-size", type=int, default=10000, help="the size the targets are read at")
    parser.add_argument("--bench-venv", default=os.path.join(harness.ROOT, ".bench-venv"))
    parser.add_argument("--output", default=os.path.join(harness.ROOT, "BENCHMARKS.md"))
    parser.add_argument("--readme", default=os.path.join(harness.ROOT, "README.md"),
                        help="the README whose headline block is rewritten ('' for none)")
    parser.add_argument("--json", help="also keep the raw results here")
    parser.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""),
                        help="a sentence for BENCHMARKS.md about this run (BENCH_NOTE)")
    parser.add_argument("--out-dir", default=os.path.join(harness.ROOT, "bench", "out"),
                        help="where the raw py-spy profiles go")
    parser.add_argument("--from-json", help="measure nothing: write BENCHMARKS.md and the headline again from the "
                                            "results a run kept with --json (after a change to the report only)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            results = Results.from_json(f.read())
        if args.note:
            results.notes.append(args.note)
        write_report(args, results)
        return
    try:
        args.sizes_list = [int(s) for s in re.split(r"[,\s]+", args.sizes) if s]
    except ValueError:
        raise SystemExit(f"make bench: SIZES={args.sizes!r} is not a list of message counts; "
                         f"give numbers separated by commas or spaces, e.g. SIZES=\"1000 10000\"")
    if not args.sizes_list or min(args.sizes_list) < 1:
        raise SystemExit(f"make bench: SIZES={args.sizes!r} names no queue size; e.g. SIZES=\"1000 10000\"")
    args.tool_repeat = args.tool_repeat or args.repeat
    args.dispatch_repeat = args.dispatch_repeat or max(5, args.repeat)
    # A stopped bench must still stop its MTA instances and remove its queues (the groups' finally clauses).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benchmark stopped: terminated"))
    if os.geteuid() != 0:
        raise SystemExit("make bench runs as root: it starts a private Postfix and a private Exim")
    os.makedirs(args.out_dir, exist_ok=True)
    compile_qrunner()
    os.environ["BENCH_OUT"] = args.out_dir
    os.environ["BENCH_PY_SPY"] = os.path.join(args.bench_venv, "bin", "py-spy")
    results = Results(machine=machine(args), sizes=args.sizes_list, repeat=args.repeat,
                      dispatch_messages=args.dispatch, pymailq_size=args.pymailq_size, target_size=args.target_size,
                      tool_repeat=args.tool_repeat, dispatch_repeat=args.dispatch_repeat)
    started = time.time()
    load = LoadWatch()
    try:
        measure(args, results)
    except BaseException:
        if args.json:  # what was measured before the stop, for a look (no report is written from it)
            with open(args.json + ".partial", "w") as f:
                f.write(results.to_json())
        raise
    results.notes.append(f"The whole run took {(time.time() - started) / 60:.0f} min.")
    load.stop()
    results.machine["load average before the bench"] = f"{load.before:.2f}"
    results.machine["load average, highest during it"] = f"{load.highest:.2f}"
    if args.note:
        results.notes.append(args.note)
    if load.before >= 0.5 or load.highest > (os.cpu_count() or 1):
        results.notes.append(
            f"The machine was loaded while this ran: the 1-minute load average was {load.before:.2f} before the "
            f"bench started (other work) and reached {load.highest:.2f} during it, on {os.cpu_count()} cores. "
            f"Single figures are noisy; the ratios, each taken within the same rounds, less so.")
    if args.json:
        with open(args.json, "w") as f:
            f.write(results.to_json())
    write_report(args, results)


def compile_qrunner() -> None:
    """Byte-compile qrunner as an installed copy is (pip and dh-virtualenv do it), so that no timed command pays
    for compiling its modules from source: with PYTHONDONTWRITEBYTECODE set, as on some machines, every start would
    compile them again (about 40 ms of CPU per process, the Lua worker's included)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(harness.ROOT, "qrunner")], check=True)


def measure(args, results: Results) -> None:
    """Every group at every size, then the dispatch groups; each group stops its MTA and removes its queue."""
    for size in args.sizes_list:
        begun = time.time()
        log(f"{size:,} messages: about {corpus.expected_bytes(size) / 1e9:.2f} GB per MTA")
        enough_disk(size)
        bench = PostfixBench(size, args, results, log)
        try:
            bench.build()
            bench.planning()
            bench.hold_release()
            if size == args.pymailq_size:
                bench.pymailq()
            if size <= args.target_size:  # see BENCHMARKS.md: at 100,000 one round takes most of an hour
                bench.todays_tools()
            bench.dispatch()
        finally:
            bench.cleanup()
        bench = EximBench(size, args, results, log)
        try:
            bench.build()
            bench.planning()
            bench.hold_release()
        finally:
            bench.cleanup()
        results.seconds_per_size[str(size)] = time.time() - begun
        log(f"{size:,} messages: {time.time() - begun:.0f} s")
    for group in (ReinjectBench, EximDispatchBench):
        bench = group(args, results, log)
        try:
            bench.run()
        finally:
            bench.cleanup()


def write_report(args, results: Results) -> None:
    with open(args.output, "w") as f:
        f.write(report.benchmarks_md(results))
    if args.readme:
        report.update_readme(args.readme, results)
    log(f"wrote {args.output}" + (f" and the headline in {args.readme}" if args.readme else ""))
    for target in report.targets(results):
        log(f"  {target.what}: {target.shown} ({target.wanted}): {target.verdict.replace('**', '')}")


if __name__ == "__main__":
    main()
