"""Benchmark: live ``qrunner plan`` over a real Postfix queue, as ratios to ``postqueue -j``.

    .venv/bin/python bench/plan_live_postfix.py [--messages 10000] [--repeat 3]

Run as root (it builds a private Postfix instance with tests/postfix_instance.py,
gated, fills its deferred queue over one SMTP session, and removes it at the
end). Prints the median of ``postqueue -j`` and of ``qrunner plan`` with a
script that reads no header and with one that reads a header of every
message, and their ratios (DESIGN.md's budget: at most 2.5x and 3.5x).
The machines here are noisy: compare the ratios, not the seconds. Nothing
here is a test; no result fails a build, but a command that fails stops the
benchmark (exit status 1, naming the command).
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from postfix_instance import free_loopback_port, make_instance  # noqa: E402
from smtp_sink import wait_for_greeting  # noqa: E402
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)
from timing import timed_run  # noqa: E402

NO_HEADER = "function CheckFile(f, a, size) if size > 900000 then a.SkipSend = 1 end a.Priority = size % 100 + 1 return a end\n"
ONE_HEADER = "function CheckFile(f, a, s, c, rp, r, h) if (h.subject or ''):find('7$') then a.SkipSend = 1 end return a end\n"


def fill(instance, count: int) -> None:
    """``count`` messages of mixed sizes into the gated deferred queue, over one SMTP session."""
    port = free_loopback_port()
    instance.add_smtpd_listener(port)
    wait_for_greeting(port)
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(count):
            body = "x" * (200 + (i * 7919) % 20000)
            client.sendmail("bench@qrunner-test.localdomain", [f"r{i}@example.net"],
                            f"Subject: bench message {i}\r\nFrom: bench@qrunner-test.localdomain\r\n\r\n{body}\r\n")
    deadline = time.monotonic() + 600
    while sum(1 for m in instance.queue() if m["queue_name"] == "deferred") < count:
        if time.monotonic() > deadline:
            raise SystemExit("the queue did not fill within 10 minutes")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    instance = make_instance(free_loopback_port())
    instance.start()
    try:
        fill(instance, args.messages)
        with tempfile.TemporaryDirectory(dir=safe_tmp.root()) as tmp:  # not /tmp: strict modes
            config = os.path.join(tmp, "qrunner.toml")
            with open(config, "w") as f:
                f.write(f'mta = "postfix"\nstate_dir = "{tmp}/state"\n[postfix]\n'
                        f'config_directory = "{instance.config_directory}"\n')
            env = dict(os.environ, QRUNNER_CONFIG=config, PYTHONPATH=os.path.join(HERE, ".."))
            runs = {"postqueue -j": ["postqueue", "-c", instance.config_directory, "-j"]}
            for name, text in (("plan, no header", NO_HEADER), ("plan, one header", ONE_HEADER)):
                script = os.path.join(tmp, name.replace(" ", "_").replace(",", "") + ".lua")
                with open(script, "w") as f:
                    f.write(text)
                runs[name] = [sys.executable, "-m", "qrunner", "-q", "plan", "--script", script, "--format", "json"]
            medians = {name: statistics.median(timed_run(argv, env) for _ in range(args.repeat))
                       for name, argv in runs.items()}
        base = medians["postqueue -j"]
        for name, value in medians.items():
            print(f"{name:<18} {value:6.2f} s  {value / base:5.2f}x postqueue -j  ({args.messages} messages)")
    finally:
        instance.cleanup()


if __name__ == "__main__":
    main()
