"""The Postfix half of ``make bench``: a private instance's real queue, planned, dispatched, held and released.

The instance is tests/postfix_instance.py's (its own configuration, queue
and log under /tmp, loopback only), gated (``defer_transports = smtp``) and
relaying to a :class:`~harness.RefusingRelay` that answers 451: whatever a
benchmark dispatches comes back to the deferred queue. :meth:`PostfixBench.restore`
then puts it back the way it was built (every message deferred by the gate,
as after its arrival): its retry time is moved to the past, and Postfix's
queue manager gates it again within a second.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import corpus
from harness import (BIG_LIMIT, CONFIG_TOP, HERE, RefusingRelay, SinkBench, decisions_check, expect, last_run,
                     long_rounds, profile, qrunner, qrunner_env, rounds, wait_until, write_scripts)
from report import FLOOR_NO_HEADER, FLOOR_ONE_HEADER, LIST_FROM_FILES
from results import Figure, Results
from timing import BenchFailure, Measured, measured

from postfix_instance import free_loopback_port, make_instance  # noqa: E402  (tests/, on sys.path via harness)
from smtp_sink import wait_for_greeting  # noqa: E402
from batches import in_batches  # noqa: E402
import safe_tmp  # noqa: E402  (tests/: scratch directories qrunner's strict modes accept)

GATE = "deferred transport"
SESSION = 500  # messages per SMTP session while building


def _quiet_flush(instance) -> None:
    """The tests run Postfix's flush daemon with -v (a log line per request); a real server does not."""
    path = os.path.join(instance.config_directory, "master.cf")
    with open(path) as f:
        lines = [re.sub(r"(\s)-v$", "", line) if line.startswith("flush ") else line for line in f.read().splitlines()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# A gated message's next retry time (its file's mtime) stays put for hours, so that only a schedule (or the
# bench's own restore) touches it while a group runs: "did the command schedule it" is then "did its file's
# mtime change" (see untouched()).
BACKOFF = {"minimal_backoff_time": "4h", "maximal_backoff_time": "4h"}


def new_instance(relay_port: int):
    instance = make_instance(relay_port, settings=dict(BACKOFF))
    instance.write_config()
    _quiet_flush(instance)
    instance.start()
    return instance


def inject(instance, port: int, messages, threads: int = 2) -> float:
    """Submit ``messages`` over SMTP sessions of SESSION messages each, ``threads`` sessions at a time."""

    def session(batch) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            for m in batch:
                refused = client.sendmail(corpus.SENDER, m.recipients, m.text().encode())
                if refused:
                    raise BenchFailure(f"Postfix refused recipients of message {m.number}: {refused}")

    started = time.perf_counter()
    errors = in_batches(messages, SESSION, threads, session)
    if errors:
        raise BenchFailure("building the Postfix queue: " + errors[0])
    return time.perf_counter() - started


def queue(instance) -> List[dict]:
    out = subprocess.run(["postqueue", "-c", instance.config_directory, "-j"], capture_output=True)
    if out.returncode != 0:
        raise BenchFailure("postqueue -j failed: " + out.stderr.decode(errors="replace")[-300:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def gated(entry: dict) -> bool:
    return entry["queue_name"] == "deferred" and all(GATE in r.get("delay_reason", "") for r in entry["recipients"])


def deferred_mtimes(instance) -> Dict[str, float]:
    """Each deferred queue file's mtime (Postfix's next retry time for it), by queue id."""
    found = {}
    for directory, _dirs, files in os.walk(os.path.join(instance.queue_directory, "deferred")):
        for name in files:
            try:
                found[name] = os.stat(os.path.join(directory, name)).st_mtime
            except FileNotFoundError:
                pass  # moved meanwhile
    return found


def untouched(instance, ids, before: Dict[str, float]) -> List[str]:
    """Those of ``ids`` that are still deferred by the gate with the file time they had ``before``: never scheduled.

    A scheduled message leaves the gate's deferral (to incoming/, then the 451
    relay's deferral); one that the queue manager gated again (a flush racing
    its queue scan: seen for 1 of 9,990 scheduled messages before qrunner
    marked each file flushed before its request) would come back with a new
    retry time, so it would still count as scheduled.
    """
    now = deferred_mtimes(instance)
    return [e["queue_id"] for e in queue(instance)
            if e["queue_id"] in ids and gated(e) and now.get(e["queue_id"]) == before.get(e["queue_id"])]


class PostfixBench:
    def __init__(self, size: int, args, results: Results, log: Callable[[str], None] = print):
        self.size = size
        self.args = args
        self.results = results
        self.log = log
        self.repeat = args.repeat
        self.relay = RefusingRelay()
        self.instance = None
        self.tmp = safe_tmp.mkdtemp("qr-bench-pf-")  # qrunner as root refuses a script under /tmp
        self.scripts = write_scripts(self.tmp)
        self.messages = list(corpus.messages(size))
        self.big = sum(1 for m in self.messages if m.size > BIG_LIMIT)
        self.sevens = sum(1 for m in self.messages if corpus.selected_by_header(m.number))

    # -- the queue ---------------------------------------------------------

    def build(self) -> None:
        self.instance = new_instance(self.relay.port)
        port = free_loopback_port()
        self.instance.add_smtpd_listener(port)
        wait_for_greeting(port)
        self.config = os.path.join(self.tmp, "qrunner.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG_TOP + f'mta = "postfix"\nstate_dir = "{self.tmp}/state"\n[postfix]\n'
                    f'config_directory = "{self.instance.config_directory}"\n')
        self.env = qrunner_env(self.config)
        self.log(f"  postfix {self.size}: building the queue ({corpus.expected_bytes(self.size) / 1e6:.0f} MB)")
        started = time.perf_counter()
        inject(self.instance, port, self.messages)
        self.settle(timeout=600 + self.size / 20)
        self.results.build_seconds[f"postfix|{self.size}"] = time.perf_counter() - started
        self.ids = sorted(e["queue_id"] for e in queue(self.instance))

    def settle(self, timeout: float = 0) -> None:
        """Wait until every message is back in the deferred queue, deferred by the gate alone."""
        timeout = timeout or 120 + self.size / 50
        def done() -> bool:
            entries = queue(self.instance)
            return len(entries) == self.size and all(gated(e) for e in entries)
        wait_until(f"the Postfix queue did not settle to {self.size} gated messages", done, timeout, every=1.0)

    def restore(self) -> None:
        """Dispatched mail came back deferred by the 451 relay: make it due, and let Postfix gate it again."""
        past = time.time() - 3600
        paths = {}
        for directory, _dirs, files in os.walk(os.path.join(self.instance.queue_directory, "deferred")):
            paths.update((name, os.path.join(directory, name)) for name in files)
        for entry in queue(self.instance):
            if entry["queue_name"] == "deferred" and not gated(entry) and entry["queue_id"] in paths:
                os.utime(paths[entry["queue_id"]], (past, past))
        self.settle()

    def after_dispatch(self, _name: str = "", release: bool = False) -> None:
        """Wait for the dispatched mail to be tried (and refused), release what a run held, then gate it again."""
        def quiet() -> bool:
            return all(e["queue_name"] in ("deferred", "hold") for e in queue(self.instance))
        wait_until("dispatched Postfix mail did not come back deferred", quiet, 900 + self.size / 10, every=1.0)
        if release:
            measured(qrunner("release", "--all"), self.env)
        self.restore()

    def cleanup(self) -> None:
        if self.instance is not None:
            self.instance.cleanup()
        self.relay.stop()
        subprocess.run(["rm", "-rf", self.tmp])

    # -- commands ----------------------------------------------------------

    def cmd(self, argv: List[str], check: Optional[Callable[[Measured], None]] = None, sample: bool = False):
        def run() -> Measured:
            return measured(argv, self.env, sample_memory=sample)
        return run

    def plan(self, script: str) -> List[str]:
        return qrunner("plan", "--script", self.scripts[script], "--format", "json")

    def floor(self, script: str, *args: str) -> List[str]:
        """bench/floor_plan.py: the same plan in one plain Python and lupa process (the floor of planning)."""
        return [sys.executable, os.path.join(HERE, "floor_plan.py"), "postfix", self.instance.config_directory,
                self.instance.queue_directory, self.scripts[script], *args]

    def postqueue_j(self) -> List[str]:
        return ["postqueue", "-c", self.instance.config_directory, "-j"]

    # -- groups --------------------------------------------------------------

    def planning(self) -> None:
        """qrunner plan (no header; one header) against postqueue -j and against reading every file once."""
        size = self.size

        def listed(result: Measured) -> None:
            expect("postqueue -j lines", len(result.lines()), size)

        def read(result: Measured) -> None:
            expect("queue files read", int(result.stdout.split()[0]), size)

        recipients = sum(len(m.recipients) for m in self.messages)

        def listed_from_files(result: Measured) -> None:
            messages, pending = (int(n) for n in result.stdout.split())
            expect("messages listed from the queue files", messages, size)
            expect("recipients listed from the queue files", pending, recipients)

        steps = [
            ("postqueue -j", self.cmd(self.postqueue_j()), listed),
            ("read every queue file", self.cmd([sys.executable, os.path.join(HERE, "read_queue.py"), "postfix",
                                                self.instance.queue_directory]), read),
            (LIST_FROM_FILES, self.cmd([sys.executable, os.path.join(HERE, "read_queue.py"), "postfix-list",
                                        self.instance.queue_directory]), listed_from_files),
            ("plan, no header", self.cmd(self.plan("no_header"), sample=True), decisions_check(size, self.big)),
            ("plan, one header", self.cmd(self.plan("one_header"), sample=True), decisions_check(size, self.sevens)),
            (FLOOR_NO_HEADER, self.cmd(self.floor("no_header")), decisions_check(size, self.big)),
            (FLOOR_ONE_HEADER, self.cmd(self.floor("one_header", "--header")), decisions_check(size, self.sevens)),
        ]
        rounds(self.results, "postfix", size, steps, self.repeat, log=self.log)
        if size == self.args.target_size:
            for name, limit in (("plan, no header", 1.5), ("plan, one header", 2.0)):
                ratio = self.results.ratio("postfix", size, name, "postqueue -j")
                if ratio is not None and ratio > limit:
                    script = "no_header" if "no header" in name else "one_header"
                    profile(self.results, f"Postfix {name}, {size} messages", self.plan(script), self.env, self.log)

    def todays_tools(self) -> None:
        """The usual selection and dispatch: postqueue -j | jq | xargs postqueue -i, against qrunner run."""
        size, sends = self.size, self.size - self.big
        ids_file = os.path.join(self.tmp, "jq-ids")
        config = self.instance.config_directory
        pipeline = ["bash", "-o", "pipefail", "-c",
                    f"postqueue -c {config} -j | jq -r 'select(.queue_name == \"deferred\" and .message_size <= "
                    f"{BIG_LIMIT}) | .queue_id' | tee {ids_file} | xargs -r -n 1 postqueue -c {config} -i"]

        before: Dict[str, float] = {}

        def timed(argv: List[str], sample: bool = False) -> Callable[[], Measured]:
            def run() -> Measured:
                before.clear()
                before.update(deferred_mtimes(self.instance))  # untimed: measured() starts the clock
                return measured(argv, self.env, sample_memory=sample)
            return run

        def piped(_result: Measured) -> None:
            with open(ids_file) as f:
                scheduled = set(f.read().split())
            expect("ids the jq pipeline scheduled", len(scheduled), sends)
            expect("messages the jq pipeline never scheduled (still gated, same retry time)",
                   len(untouched(self.instance, scheduled, before)), 0)

        def ran(_result: Measured) -> None:
            done = last_run(self.env)
            expect("qrunner run: sent", done["sent"], sends)
            expect("qrunner run: held", done["held"], self.big)
            expect("messages qrunner run never scheduled nor held (still gated, same retry time)",
                   len(untouched(self.instance, set(before), before)), 0)
            expect("messages postqueue -j shows on hold after qrunner run",
                   sum(1 for e in queue(self.instance) if e["queue_name"] == "hold"), self.big)

        def between(name: str) -> None:
            self.after_dispatch(name, release=name == "qrunner run, no header")

        steps = [("jq | xargs postqueue -i", timed(pipeline), piped),
                 ("qrunner run, no header", timed(qrunner("run", "--script", self.scripts["no_header"]), sample=True),
                  ran)]
        rounds(self.results, "postfix", size, steps, self.args.tool_repeat, warmup=False, between=between,
               log=self.log)

    def pymailq(self) -> None:
        """pymailq with header parsing (a postcat per message) against qrunner plan with the header script."""
        python = os.path.join(self.args.bench_venv, "bin", "python")
        size = self.size

        def selected(result: Measured) -> None:
            loaded, parsed, chosen = (int(x) for x in result.stdout.split())
            expect("pymailq: loaded", loaded, size)
            expect("pymailq: parsed", parsed, size)
            expect("pymailq: selected", chosen, self.sevens)

        steps = [("plan, one header (beside pymailq)", self.cmd(self.plan("one_header")),
                  decisions_check(size, self.sevens)),
                 ("pymailq, headers parsed", self.cmd([python, os.path.join(HERE, "pymailq_select.py"),
                                                       self.instance.config_directory]), selected)]
        rounds(self.results, "postfix", size, steps, self.args.tool_repeat, warmup=False, log=self.log)

    def dispatch(self) -> None:
        """N messages through the flush service (qrunner's client) against N postqueue -i processes."""
        n = min(self.size, self.args.dispatch)
        ids_file = os.path.join(self.tmp, "dispatch-ids")
        with open(ids_file, "w") as f:
            f.write("\n".join(self.ids[:n]) + "\n")
        config = self.instance.config_directory
        loops: List[float] = []

        def flushed(result: Measured) -> None:
            accepted, seconds = result.stdout.split()
            expect("flush service: accepted", int(accepted), n)
            loops.append(float(seconds))

        named = set(self.ids[:n])
        before: Dict[str, float] = {}

        def timed(argv: List[str]) -> Callable[[], Measured]:
            def run() -> Measured:
                before.clear()
                before.update(deferred_mtimes(self.instance))  # untimed: measured() starts the clock
                return measured(argv, self.env)
            return run

        def moved(_result: Measured) -> None:
            # every named message was scheduled (the flush service moves it to incoming/ before it replies)
            expect("messages never scheduled (still gated, same retry time)",
                   len(untouched(self.instance, named, before)), 0)

        steps = [("flush service, qrunner's client (process)",
                  timed([sys.executable, os.path.join(HERE, "flush_driver.py"), config, ids_file]),
                  lambda r: (flushed(r), moved(r))),
                 ("postqueue -i per message", timed(["bash", "-o", "pipefail", "-c",
                                                     f"xargs -r -n 1 postqueue -c {config} -i < {ids_file}"]),
                  moved)]
        rounds(self.results, "postfix", self.size, steps, self.args.dispatch_repeat, warmup=False,
               between=self.after_dispatch,
               log=self.log)
        loop_runs = loops[-self.args.dispatch_repeat:]
        self.results.add("postfix", self.size, "flush service, qrunner's client (loop)",
                         Figure(runs=loop_runs, count=n,
                                command="the send inside flush_driver.py (PostfixBackend.send)"))
        for name in ("flush service, qrunner's client (process)", "postqueue -i per message"):
            self.results.get("postfix", self.size, name).count = n
        if self.size == self.args.target_size:
            ratio = self.results.ratio("postfix", self.size, "postqueue -i per message",
                                       "flush service, qrunner's client (loop)")
            if ratio is not None and ratio < 10:
                profile(self.results, f"Postfix flush dispatch of {n} messages",
                        [sys.executable, os.path.join(HERE, "flush_driver.py"), config, ids_file], self.env, self.log)
                self.after_dispatch("profile")

    def hold_release(self) -> None:
        """qrunner run holding every message, then qrunner release --all, against postsuper -h / -H of the same ids."""
        size = self.size
        ids = "".join(i + "\n" for i in self.ids).encode()
        config = self.instance.config_directory

        def run_done(what: str, key: str) -> Callable[[Measured], None]:
            def check(_result: Measured) -> None:
                expect(f"{what}: {key}", last_run(self.env)[key], size)
                on_hold = sum(1 for e in queue(self.instance) if e["queue_name"] == "hold")  # what postqueue -j says
                expect(f"{what}: messages postqueue -j shows on hold", on_hold, size if key == "held" else 0)
            return check

        def postsuper(flag: str, word: str) -> Callable[[], Measured]:
            def run() -> Measured:
                result = measured(["postsuper", "-c", config, flag, "-"], self.env, input=ids)
                summary = re.search(rf"{word}: (\d+) messages?", result.stderr.decode(errors="replace"))
                expect(f"postsuper {flag}: {word}", int(summary.group(1)) if summary else 0, size)
                return result
            return run

        def listed_then(flag: str, word: str) -> Callable[[], Measured]:
            # the floor of any run that lists the queue before it acts: postqueue -j, then postsuper of the ids
            def run() -> Measured:
                result = measured(["sh", "-c", f"postqueue -c {config} -j >/dev/null && exec postsuper -c {config} "
                                               f"{flag} -"], self.env, input=ids)
                summary = re.search(rf"{word}: (\d+) messages?", result.stderr.decode(errors="replace"))
                expect(f"postqueue -j, then postsuper {flag}: {word}", int(summary.group(1)) if summary else 0, size)
                return result
            return run

        steps = [
            ("qrunner run, hold all", self.cmd(qrunner("run", "--script", self.scripts["hold_all"]), sample=True),
             run_done("qrunner run, hold all", "held")),
            ("qrunner release --all", self.cmd(qrunner("release", "--all"), sample=True),
             run_done("qrunner release --all", "released")),
            ("postsuper -h", postsuper("-h", "Placed on hold"), None),
            ("postsuper -H", postsuper("-H", "Released from hold"), None),
            ("postqueue -j, then postsuper -h", listed_then("-h", "Placed on hold"), None),
            ("postqueue -j, then postsuper -H", listed_then("-H", "Released from hold"), None),
        ]
        rounds(self.results, "postfix", size, steps, *long_rounds(self.args, size), log=self.log)
        self.settle()
        if size == self.args.target_size:
            run = self.results.ratio("postfix", size, "qrunner run, hold all", "postsuper -h")
            rel = self.results.ratio("postfix", size, "qrunner release --all", "postsuper -H")
            if run is not None and run > 1.5:
                profile(self.results, f"Postfix qrunner run holding {size} messages",
                        qrunner("run", "--script", self.scripts["hold_all"]), self.env, self.log)
                if rel is None or rel <= 1.5:
                    measured(qrunner("release", "--all"), self.env)
            if rel is not None and rel > 1.5:
                if run is None or run <= 1.5:
                    measured(qrunner("run", "--script", self.scripts["hold_all"]), self.env)
                profile(self.results, f"Postfix qrunner release --all of {size} messages",
                        qrunner("release", "--all"), self.env, self.log)
            self.settle()


class ReinjectBench(SinkBench):
    """Re-injection through a sender's listener: a queue of N built per round, each copy relayed to an accepting sink."""

    scratch_prefix = "qr-bench-ri-"

    def run(self) -> None:
        self.instance = new_instance(free_loopback_port())  # the gated relay: nothing goes there
        listener, inject_port = free_loopback_port(), free_loopback_port()
        nexthop = f"[127.0.0.1]:{self.sink.port}"
        self.instance.add_reinjection_listener(listener, "relay-bench", nexthop)
        self.instance.add_smtpd_listener(inject_port)
        wait_for_greeting(listener)
        wait_for_greeting(inject_port)
        config = os.path.join(self.tmp, "qrunner.toml")
        with open(config, "w") as f:
            f.write(CONFIG_TOP + f'mta = "postfix"\nstate_dir = "{self.tmp}/state"\nscript = "{self.scripts["send_all"]}"\n'
                    f'[postfix]\nconfig_directory = "{self.instance.config_directory}"\n'
                    f'[[sender]]\nid = 0\nname = "bench"\n[sender.postfix]\nlistener = "127.0.0.1:{listener}"\n'
                    f'transport = "relay-bench"\nnexthop = "{nexthop}"\n')
        env = qrunner_env(config)
        messages = list(corpus.messages(self.n, seed=31))
        injections, runs = [], []
        for number in range(self.args.repeat):
            self.sink.clear()
            injections.append(inject(self.instance, inject_port, messages, threads=1))
            wait_until("the re-injection queue did not fill",
                       lambda: sum(1 for e in queue(self.instance) if gated(e)) == self.n, 600)
            result = measured(qrunner("run"), env, sample_memory=True)
            done = last_run(env)
            expect("qrunner run through the listener: sent", done["sent"], self.n)
            self.sink.wait_for(self.n, timeout=600)
            wait_until("copies left in the Postfix queue after re-injection", lambda: not queue(self.instance), 600)
            runs.append(result)
            self.log(f"  postfix re-injection of {self.n}: round {number + 1}/{self.args.repeat}: "
                     f"qrunner run {result.seconds:.2f} s, SMTP injection {injections[-1]:.2f} s")
        self.results.add("postfix", self.n, "re-injection, qrunner run (msg/s)",
                         Figure(runs=[self.n / r.seconds for r in runs], unit="msg/s", count=self.n,
                                max_rss_kb=[r.max_rss_kb for r in runs], tree_rss_kb=[r.tree_rss_kb for r in runs],
                                qrunner_rss_kb=[r.qrunner_rss_kb for r in runs],
                                command="qrunner run (one routed sender, every message sent)"))
        self.results.add("postfix", self.n, "SMTP injection, one session (msg/s)",
                         Figure(runs=[self.n / s for s in injections], unit="msg/s", count=self.n,
                                command="smtplib, one session into a plain smtpd listener"))

