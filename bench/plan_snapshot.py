"""Benchmark: ``qrunner plan --queue-file`` over big snapshots, as ratios measured in one run.

    .venv/bin/python bench/plan_snapshot.py [--sizes 10000,100000] [--repeat 3]

Prints, per queue size, the median wall time of a plan with a script that
reads no header and with one that reads a header of every message, the
time per message, and the ratio of the largest size's time per message to
the smallest's (DESIGN.md's budget: 100,000 messages at no more than 1.3x
the time per message of 10,000). Machines here are noisy: compare the
ratios, not the seconds. Nothing here is a test; no result fails a build, but a
plan that fails stops the benchmark (exit status 1, naming the command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from timing import timed_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)

NO_HEADER = "function CheckFile(f, a, size) if size > 900000 then a.SkipSend = 1 end a.Priority = size % 100 + 1 return a end\n"
ONE_HEADER = "function CheckFile(f, a, s, c, rp, r, h) if (h.subject or ''):find('7$') then a.SkipSend = 1 end return a end\n"


def write_snapshot(path: str, count: int) -> None:
    with open(path, "w") as out:
        for i in range(count):
            out.write(json.dumps({
                "queue_name": "deferred", "queue_id": "%011X" % (0x10000000 + i), "arrival_time": 1764050000 + i,
                "message_size": 1000 + (i * 7919) % 1000000, "forced_expire": False, "sender": f"user{i % 97}@example.org",
                "recipients": [{"address": f"rcpt{i}@example.net", "delay_reason": "deferred transport"}],
                "headers": [f"Subject: message {i}", "From: someone@example.org", "To: rcpt@example.net"],
            }) + "\n")


def plan_seconds(snapshot: str, script: str) -> float:
    return timed_run([sys.executable, "-m", "qrunner", "--config", os.devnull, "-q", "plan", "--queue-file", snapshot,
                      "--script", script, "--format", "json"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=safe_tmp.root()) as tmp:  # not /tmp: strict modes
        scripts = {}
        for name, text in (("no header", NO_HEADER), ("one header", ONE_HEADER)):
            scripts[name] = os.path.join(tmp, name.replace(" ", "_") + ".lua")
            with open(scripts[name], "w") as f:
                f.write(text)
        per_message = {}
        for size in sizes:
            snapshot = os.path.join(tmp, f"q{size}.jsonl")
            write_snapshot(snapshot, size)
            for name, script in scripts.items():
                median = statistics.median(plan_seconds(snapshot, script) for _ in range(args.repeat))
                per_message[(size, name)] = median / size
                print(f"{size:>7} messages, {name:<10}: {median:6.2f} s  {median / size * 1e6:6.1f} us/message")
        for name in scripts:
            ratio = per_message[(sizes[-1], name)] / per_message[(sizes[0], name)]
            print(f"{name}: time per message at {sizes[-1]} / at {sizes[0]} = {ratio:.2f}")


if __name__ == "__main__":
    main()
