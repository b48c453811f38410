"""Benchmark: what keeping Exim's priority levels apart costs, as a ratio of messages per second.

    .venv/bin/python bench/exim_priority_levels.py [--levels 5] [--per-level 40] [--repeat 3]
                                                   [--relay-delay 0.0] [--concurrency 2]

Run as root (it builds a private Exim with tests/exim_instance.py, gated,
relaying to an SMTP sink of tests/smtp_sink.py on 127.0.0.1, and removes it
at the end). Each round queues LEVELS x PER_LEVEL messages (priorities 100,
80, ... from the subject) in one ``exim -odq -bS``, then times one ``qrunner
run``, which returns when every Exim process it started has ended, and
checks that the sink received them all and the queue is empty. Rounds
alternate ``overlap_priorities`` off (the default: a level's batches start
when the level above has ended) and on, and the medians are compared. The
machines here are noisy: compare the ratio, not the rates. Nothing here is
a test; a command that fails stops the benchmark (exit status 1, naming it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from exim_instance import exim_missing_reason, make_instance  # noqa: E402
from smtp_sink import SmtpSink  # noqa: E402
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)
from timing import timed_run  # noqa: E402

POLICY = 'function CheckFile(f, a, s, c, rp, r, h) a.Priority = tonumber(h.subject:match("^p(%d+)")) return a end\n'


def fill(instance, levels: int, per_level: int) -> int:
    """LEVELS x PER_LEVEL messages into the gated named queue, the levels mixed, over one batch-SMTP process."""
    lines = []
    count = 0
    for n in range(per_level):
        for level in range(levels):
            priority = 100 - level * (100 // levels)
            lines += ["MAIL FROM:<bench@qrunner-test.localdomain>", f"RCPT TO:<r{count}@example.net>", "DATA",
                      f"Subject: p{priority} #{n}", "From: bench@qrunner-test.localdomain", ""]
            lines += ["x" * 76] * 26 + ["."]  # 2 KB in lines SMTP allows
            count += 1
    instance.run(["-odq", "-bS"], input=("\r\n".join(lines + ["QUIT"]) + "\r\n").encode(), timeout=600)
    queued = instance.bp_count()
    if queued != count:
        raise SystemExit(f"benchmark stopped: {queued} of {count} messages reached the named queue")
    return count


def one_round(instance, sink, env, overlap: bool, args) -> float:
    """Messages per second of one qrunner run over a freshly filled queue."""
    config = env["QRUNNER_CONFIG"]
    with open(config) as f:
        text = f.read().replace("overlap_priorities = true\n", "").replace("overlap_priorities = false\n", "")
    with open(config, "w") as f:
        f.write(text + f"overlap_priorities = {'true' if overlap else 'false'}\n")
    sink.clear()
    sink.data_delay = args.relay_delay
    count = fill(instance, args.levels, args.per_level)
    seconds = timed_run([sys.executable, "-m", "qrunner", "-q", "run"], env)
    sink.wait_for(count, timeout=60)
    if instance.bp_count() != 0:
        raise SystemExit("benchmark stopped: mail left in the named queue after the run")
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--per-level", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--relay-delay", type=float, default=0.0, help="seconds the sink waits before its reply "
                                                                        "to DATA (a slower relay)")
    parser.add_argument("--concurrency", type=int, default=2, help="[exim] dispatch_concurrency")
    args = parser.parse_args()
    missing = exim_missing_reason()
    if missing:
        raise SystemExit(f"benchmark stopped: {missing}")
    sink = SmtpSink().start()
    instance = make_instance(sink.port)
    instance.start()
    try:
        with tempfile.TemporaryDirectory(dir=safe_tmp.root()) as tmp:  # not /tmp: strict modes
            config = os.path.join(tmp, "qrunner.toml")
            script = os.path.join(tmp, "relayout.lua")
            with open(script, "w") as f:
                f.write(POLICY)
            with open(config, "w") as f:
                f.write(f'mta = "exim"\nscript = "{script}"\nstate_dir = "{tmp}/state"\n[exim]\n'
                        f'binary = "{instance.binary}"\nconfig = "{instance.config_path}"\n'
                        f'spool_directory = "{instance.spool_directory}"\nqueue = "{instance.queue_name}"\n'
                        f'dispatch_concurrency = {args.concurrency}\n')
            env = dict(os.environ, QRUNNER_CONFIG=config, PYTHONPATH=os.path.join(HERE, ".."))
            rates = {False: [], True: []}
            for _ in range(args.repeat):
                for overlap in (False, True):  # interleaved, so that drift in the machine's load hits both
                    rates[overlap].append(one_round(instance, sink, env, overlap, args))
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        shape = (f"{args.levels * args.per_level} messages in {args.levels} levels of {args.per_level}, "
                 f"dispatch_concurrency {args.concurrency}, relay delay {args.relay_delay:g} s, "
                 f"median of {args.repeat}")
        print(shape)
        print(f"overlap_priorities = false  {off:7.1f} messages/s")
        print(f"overlap_priorities = true   {on:7.1f} messages/s")
        print(f"levels kept apart: {off / on:.2f}x the throughput of overlapping levels")
    finally:
        instance.cleanup()
        sink.stop()


if __name__ == "__main__":
    main()
