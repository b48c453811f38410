"""The Exim half of ``make bench``: the private Exim's named queue, planned, held and released; -Mc dispatch.

The instance is tests/exim_instance.py's (its own configuration, spool and
log under /tmp, run from /opt/qrunner-test-exim, no daemon), gated: every
message of the benchmark lands in the named queue ``qrunner``, which no
Exim queue runner touches. The queue is built with ``exim -odq -bS``, a
thousand messages per process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional

import corpus
from harness import (BIG_LIMIT, CONFIG_TOP, HERE, SinkBench, decisions_check, expect, last_run, long_rounds, profile,
                     qrunner, qrunner_env, rounds, write_scripts)
from report import FLOOR_ONE_HEADER
from results import Figure, Results
from timing import BenchFailure, Measured, measured

from exim_instance import EXIPICK, exim_missing_reason, make_instance  # noqa: E402
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)
from batches import in_batches  # noqa: E402

PER_PROCESS = 1000  # messages per exim -bS
_BPR_ENTRY = re.compile(rb"^\s*\d+[mhd]\s+\S+\s+[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4} ", re.M)


def batch_smtp(messages) -> bytes:
    parts = []
    for m in messages:
        parts.append(f"MAIL FROM:<{corpus.SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in m.recipients)
                     + "DATA\r\n" + m.text() + ".\r\n")
    return ("".join(parts) + "QUIT\r\n").encode()


def inject(instance, messages, processes: int = 2) -> float:
    """``messages`` into the gated named queue: one ``exim -odq -bS`` per PER_PROCESS, ``processes`` at a time."""

    def process(batch) -> Optional[str]:
        result = instance.run(["-odq", "-bS"], input=batch_smtp(batch), check=False, timeout=3600)
        return result.stderr.decode(errors="replace")[-300:] if result.returncode != 0 else None

    started = time.perf_counter()
    errors = in_batches(messages, PER_PROCESS, processes, process)
    if errors:
        raise BenchFailure("exim -bS failed while building the queue: " + errors[0])
    return time.perf_counter() - started


def write_config(path: str, tmp: str, instance, concurrency: int = 2, script: Optional[str] = None) -> None:
    with open(path, "w") as f:
        f.write(CONFIG_TOP + f'mta = "exim"\nstate_dir = "{tmp}/state"\n' + (f'script = "{script}"\n' if script else "") +
                f'[exim]\nbinary = "{instance.binary}"\nconfig = "{instance.config_path}"\n'
                f'spool_directory = "{instance.spool_directory}"\nqueue = "{instance.queue_name}"\n'
                f'dispatch_concurrency = {concurrency}\n')


class EximBench:
    def __init__(self, size: int, args, results: Results, log: Callable[[str], None] = print):
        missing = exim_missing_reason()
        if missing:
            raise BenchFailure(missing)
        self.size = size
        self.args = args
        self.results = results
        self.log = log
        self.repeat = args.repeat
        self.tmp = safe_tmp.mkdtemp("qr-bench-ex-")  # qrunner as root refuses a script under /tmp
        self.scripts = write_scripts(self.tmp)
        self.messages = list(corpus.messages(size))
        self.big = sum(1 for m in self.messages if m.size > BIG_LIMIT)
        self.sevens = sum(1 for m in self.messages if corpus.selected_by_header(m.number))
        self.instance = None

    def build(self) -> None:
        self.instance = make_instance(9)  # the relay port: nothing in this queue is ever delivered
        self.instance.start()
        self.config = os.path.join(self.tmp, "qrunner.toml")
        write_config(self.config, self.tmp, self.instance)
        self.env = qrunner_env(self.config)
        self.log(f"  exim {self.size}: building the queue ({corpus.expected_bytes(self.size) / 1e6:.0f} MB)")
        started = time.perf_counter()
        inject(self.instance, self.messages)
        self.results.build_seconds[f"exim|{self.size}"] = time.perf_counter() - started
        expect("messages in Exim's named queue", self.instance.bp_count(), self.size)
        self.ids = sorted(self.instance.queue_ids())
        expect("messages exim -bp lists", len(self.ids), self.size)

    def cleanup(self) -> None:
        if self.instance is not None:
            self.instance.cleanup()
        subprocess.run(["rm", "-rf", self.tmp])

    def cmd(self, argv: List[str], sample: bool = False):
        return lambda: measured(argv, self.env, sample_memory=sample)

    def plan(self, script: str) -> List[str]:
        return qrunner("plan", "--script", self.scripts[script], "--format", "json")

    def planning(self) -> None:
        """qrunner plan against exim -bpr of the named queue, reading every -H file once, and exipick on a header."""
        size, spool = self.size, self.instance.spool_directory

        def listed(result: Measured) -> None:
            expect("messages exim -bpr listed", len(_BPR_ENTRY.findall(result.stdout)), size)

        def read(result: Measured) -> None:
            expect("-H files read", int(result.stdout.split()[0]), size)

        def picked(result: Measured) -> None:
            expect("messages exipick selected", len(result.stdout.split()), self.sevens)

        steps = [
            ("exim -bpr", self.cmd(self.instance.argv + ["-qG" + self.instance.queue_name, "-bpr"]), listed),
            ("read every -H file", self.cmd([sys.executable, os.path.join(HERE, "read_queue.py"), "exim",
                                             os.path.join(spool, self.instance.queue_name, "input")]), read),
            ("exipick -i, header criterion", self.cmd([EXIPICK, "--spool", spool, "--queue", self.instance.queue_name,
                                                       "-i", "$h_subject =~ /7$/"]), picked),
            ("plan, no header", self.cmd(self.plan("no_header"), sample=True), decisions_check(size, self.big)),
            ("plan, one header", self.cmd(self.plan("one_header"), sample=True), decisions_check(size, self.sevens)),
            (FLOOR_ONE_HEADER, self.cmd([sys.executable, os.path.join(HERE, "floor_plan.py"), "exim",
                                         os.path.join(spool, self.instance.queue_name, "input"),
                                         self.scripts["one_header"]]), decisions_check(size, self.sevens)),
        ]
        rounds(self.results, "exim", size, steps, self.repeat, log=self.log)
        if size == self.args.target_size:
            bpr = self.results.ratio("exim", size, "plan, one header", "exim -bpr")
            pick = self.results.ratio("exim", size, "plan, one header", "exipick -i, header criterion")
            if (bpr is not None and bpr > 2.5) or (pick is not None and pick > 0.5):
                profile(self.results, f"Exim plan, one header, {size} messages", self.plan("one_header"), self.env,
                        self.log)

    def hold_release(self) -> None:
        """qrunner run freezing every message, then qrunner release --all (thaw), against exim -Mf / -Mt of the ids."""
        size = self.size
        queue_arg = "-qG" + self.instance.queue_name

        def run_done(what: str, key: str) -> Callable[[Measured], None]:
            def check(_result: Measured) -> None:
                expect(f"{what}: {key}", last_run(self.env)[key], size)
                frozen = sum(1 for m in self.instance.queue() if m["frozen"])  # what exim -bp says
                expect(f"{what}: messages exim -bp shows frozen", frozen, size if key == "held" else 0)
            return check

        ids = "".join(i + "\n" for i in self.ids).encode()

        def exim_all(flag: str, said: str) -> Callable[[], Measured]:
            # xargs: as many ids per exim as the kernel takes (100,000 ids are more than one command line holds)
            def run() -> Measured:
                result = measured(["xargs", "-r"] + self.instance.argv + [queue_arg, flag], self.env, input=ids)
                expect(f"exim {flag}: '{said}' lines", result.stdout.decode(errors="replace").count(said), size)
                return result
            return run

        steps = [
            ("qrunner run, hold all", self.cmd(qrunner("run", "--script", self.scripts["hold_all"]), sample=True),
             run_done("qrunner run, hold all", "held")),
            ("qrunner release --all", self.cmd(qrunner("release", "--all"), sample=True),
             run_done("qrunner release --all", "released")),
            ("exim -Mf", exim_all("-Mf", "is now frozen"), None),
            ("exim -Mt", exim_all("-Mt", "is no longer frozen"), None),
        ]
        rounds(self.results, "exim", size, steps, *long_rounds(self.args, size), log=self.log)


class EximDispatchBench(SinkBench):
    """``qrunner run`` sending N messages with ``exim -Mc`` batches at dispatch_concurrency 1, 2 and 4."""

    scratch_prefix = "qr-bench-exd-"

    def run(self) -> None:
        self.instance = make_instance(self.sink.port)
        self.instance.start()
        messages = list(corpus.messages(self.n, seed=47))
        config = os.path.join(self.tmp, "qrunner.toml")
        runs = {c: [] for c in (1, 2, 4)}
        for number in range(self.args.repeat):
            for concurrency in runs:
                write_config(config, self.tmp, self.instance, concurrency, self.scripts["send_all"])
                env = qrunner_env(config)
                self.sink.clear()
                inject(self.instance, messages)
                expect("messages in Exim's named queue", self.instance.bp_count(), self.n)
                result = measured(qrunner("run"), env, sample_memory=True)
                expect("qrunner run -Mc: sent", last_run(env)["sent"], self.n)
                self.sink.wait_for(self.n, timeout=600)
                expect("messages left in Exim's named queue after the run", self.instance.bp_count(), 0)
                runs[concurrency].append(result)
                self.log(f"  exim -Mc dispatch of {self.n}: round {number + 1}/{self.args.repeat}: "
                         f"concurrency {concurrency}: {result.seconds:.2f} s")
        for concurrency, done in runs.items():
            self.results.add("exim", self.n, f"-Mc dispatch, concurrency {concurrency} (msg/s)",
                             Figure(runs=[self.n / r.seconds for r in done], unit="msg/s", count=self.n,
                                    max_rss_kb=[r.max_rss_kb for r in done], tree_rss_kb=[r.tree_rss_kb for r in done],
                                    qrunner_rss_kb=[r.qrunner_rss_kb for r in done],
                                    command=f"qrunner run, dispatch_concurrency = {concurrency}"))

