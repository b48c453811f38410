"""The command line: argument parsing and output, nothing else.

Each command builds its settings, hands them to the pipeline and prints what
came back. Errors end as one sentence on stderr and an exit code from
:mod:`qrunner.exceptions`; no traceback reaches the admin.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import textwrap
import time
from contextlib import closing
from typing import Dict, List, Optional, Sequence, Tuple

from qrunner import __version__, selection
from qrunner.config import LUA_VERSIONS, ON_SCRIPT_ERROR, Config, Sender, check_senders, load_config
from qrunner.decision import Decision
from qrunner.exceptions import (EX_DATAERR, EX_OK, EX_POLICY_ERRORS, EXIT_STATUS, LockHeldError, NothingSelected,
                               QrunnerError, UsageError)
from qrunner.log import report_failure, setup_logging, shown
from qrunner.mta import backend_for
from qrunner.mta.base import Gate
from qrunner.plan import Expire, Planned, Wait, report_order
from qrunner.policy import PolicySettings, lua_implementation, lupa_version
from qrunner.progress import Progress, wanted as wanted_progress
from qrunner.runner import Explanation, RunResult, Runner, decide_offline
from qrunner.state import HistoryEntry

EXIT_CODES = "exit codes:\n" + "".join(
    textwrap.fill(meaning, 79, initial_indent=f"  {code:<4}", subsequent_indent=" " * 6) + "\n"
    for code, meaning in EXIT_STATUS)


RAW = argparse.RawDescriptionHelpFormatter  # keep the exit code list and descriptions as written


class _Parser(argparse.ArgumentParser):
    """argparse that ends bad usage with exit 64 (EX_USAGE), not 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see '{self.prog} --help'.")


class _Version(argparse.Action):
    """``--version``: what a bug report needs, found now (the configuration's Lua and MTA), never a traceback."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"qrunner {__version__}")
        try:
            config = load_config(namespace.config)
        except QrunnerError as error:
            print(f"configuration: {error.message}")
            parser.exit(0)
        print(f"lupa {lupa_version()}, {lua_implementation(config.lua)} (lua = \"{config.lua}\")")
        try:
            with closing(backend_for(config)) as backend:
                print(f"MTA: {backend.version()}")
        except QrunnerError as error:
            print(f"MTA: none usable: {error.message}")
        parser.exit(0)


def _now(text: str) -> int:
    try:
        return int(time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--now {text!r} is not a local time like 2026-11-25T09:00:00")


def _sender(text: str) -> Sender:
    number, colon, name = text.partition(":")
    if not colon or not number.isdigit() or not name.strip():
        raise argparse.ArgumentTypeError(f"--sender {text!r} is not ID:NAME, e.g. 0:isp")
    return Sender(int(number), name)


def _add_policy_options(parser: argparse.ArgumentParser, queue_file_help: str) -> None:
    parser.add_argument("--queue-file", metavar="PATH|-", help=queue_file_help)
    parser.add_argument("--script", metavar="PATH", help="the policy script (default: the config's 'script')")
    parser.add_argument("--sender", dest="senders", metavar="ID:NAME", type=_sender, action="append",
                        help="a sender to run the script for (repeatable; default: the config's, else 0:default)")
    parser.add_argument("--now", metavar="YYYY-MM-DDTHH:MM:SS", type=_now,
                        help="the local time the script's os.time()/os.date() show (default: the real clock)")
    parser.add_argument("--on-script-error", choices=ON_SCRIPT_ERROR,
                        help="what a policy error does to a message (default: the config's, else skip = hold)")
    parser.add_argument("--lua", choices=LUA_VERSIONS, help="the Lua version to run the script with")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qrunner",
        description="Run a VPOP3-style Lua policy (relayout.lua, CheckFile) over an MTA's outgoing queue.",
        epilog=EXIT_CODES, formatter_class=RAW,
    )
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $QRUNNER_CONFIG, else /etc/qrunner/qrunner.toml)")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0,
                        help="more on stderr (and debug lines in the system log)")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", help="only errors on stderr (the system log still gets every action and warning)")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="qrunner's version, lupa's and the configured Lua's, and the MTA qrunner finds")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    plan = commands.add_parser(
        "plan", help="show what the policy would do, change nothing",
        description="Show, for every message, whether the policy sends it (and in which order) or skips it. "
                    "Changes nothing.",
        epilog=EXIT_CODES, formatter_class=RAW)
    _add_policy_options(plan, "a queue snapshot (postqueue -j lines, '-' for stdin) instead of the live queue")
    plan.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    plan.set_defaults(func=cmd_plan)

    check = commands.add_parser(
        "check", help="check that the policy script loads (and runs over a snapshot)",
        description="Load the policy script for every sender and report load errors with line numbers; "
                    "with --queue-file, also run it over every message and list the policy errors; with --cases, "
                    "run it over the messages of a cases file and say where it does not do what each case expects.",
        epilog=EXIT_CODES, formatter_class=RAW)
    _add_policy_options(check, "a queue snapshot to run the script over (postqueue -j lines, '-' for stdin)")
    check.add_argument("--cases", metavar="FILE",
                       help="a TOML (or .json) file of messages, each with the action, priority, sender or reason "
                            "the policy must give it (see examples/relayout-cases.toml); exit 1 when one differs")
    check.set_defaults(func=cmd_check)

    run = commands.add_parser(
        "run", help="decide every message and act: hold what the policy skips, deliver the rest",
        description="One run over the live queue: reconcile qrunner's records with the queue, run the policy over "
                    "the waiting messages (Postfix: deferred; Exim: qrunner's named queue) and qrunner's own holds, "
                    "hold (Exim: freeze) what it skips, release and send the rest in dispatch order (only those due "
                    "for a retry), each by the sender that took it. This is what the timer runs.",
        epilog=EXIT_CODES, formatter_class=RAW)
    _add_run_options(run)
    run.add_argument("--dry-run", action="store_true", help="show what the run would do; change nothing")
    run.set_defaults(func=cmd_run)

    flush = commands.add_parser(
        "flush", help="the admin's flush: decide and deliver the named messages now",
        description="Without --ignore-policy: the policy decides for the named messages (or all with --all) as in "
                    "'run', retry times included. With --ignore-policy: the named messages are released (if qrunner "
                    "held them) and scheduled now, whatever the policy or their retry time says; the log says the "
                    "policy was overridden.",
        epilog=EXIT_CODES, formatter_class=RAW)
    _add_run_options(flush)
    _add_id_arguments(flush, "the messages to flush")
    flush.add_argument("--ignore-policy", action="store_true",
                       help="release and schedule the named messages now, without asking the policy")
    _add_bulk_options(flush, "hand the MTA at most N messages per second (also N/m, N/h), so a big flush does "
                             "not swamp the relay")
    _add_selectors(flush, "the flush (among the waiting messages and qrunner's holds)")
    flush.set_defaults(func=cmd_flush)

    release = commands.add_parser(
        "release", help="release qrunner's holds back to the MTA without sending them",
        description="Release qrunner's own holds (the named ones, or all with --all) back to the MTA's normal "
                    "handling, without sending them: the way out when uninstalling. Messages an admin held (or "
                    "froze) are never touched. Warning (as postsuper(1) says): mail released after a long hold is "
                    "subject to maximal_queue_lifetime at once, and may bounce on Postfix's next attempt if it is "
                    "older than that. In gate mode released mail waits until qrunner sends it or the gate is "
                    "removed (Postfix: defer_transports; Exim: use --to-default-queue, and see timeout_frozen_after).",
        epilog=EXIT_CODES, formatter_class=RAW)
    _add_id_arguments(release, "the holds to release")
    release.add_argument("--to-default-queue", action="store_true",
                         help="Exim: also move them to Exim's default queue, where its own queue runners deliver "
                              "them; with --all, every message in qrunner's named queue, held or not (the way out "
                              "when uninstalling)")
    release.add_argument("--for-removal", action="store_true",
                         help="the last step before qrunner is removed (make uninstall): refused (exit 78, nothing "
                              "released) while the MTA is still gated for qrunner; otherwise every hold is released "
                              "and, where the MTA has a named queue (Exim), every message in it moved to the "
                              "default queue")
    release.add_argument("--gate-removed", action="store_true",
                         help="with --for-removal, when qrunner cannot tell whether the MTA is still gated: you "
                              "checked that the gate is gone")
    _add_bulk_options(release, "with --to-default-queue: move at most N messages per second (also N/m, N/h) "
                               "to the MTA's own queue runners")
    _add_selectors(release, "the release (among qrunner's holds)")
    release.set_defaults(func=cmd_release)

    status = commands.add_parser(
        "status", help="qrunner's holds and the last run",
        description="List qrunner's holds (queue id, since when, senders, reason), the senders, whether the MTA "
                    "is gated for qrunner (gated: yes, no or unknown, with why) and the last run's summary.",
        epilog=EXIT_CODES, formatter_class=RAW)
    status.add_argument("--check", action="store_true",
                        help="one line for monitoring (Nagios-style): exit 0 all well; 1 a warning (the MTA not "
                             "gated, holds near the MTA's queue lifetime or max_hold_age, the last run had policy "
                             "errors or ended with exit 1); 2 no run completed within --max-age, or the last one "
                             "failed")
    status.add_argument("--max-age", metavar="SECONDS", type=_seconds, default=1800,
                        help="with --check: how long ago the last run may have completed (default 1800: the timer "
                             "runs every 5 minutes)")
    status.add_argument("--format", choices=("table", "json"), default="table",
                        help="output format (default: table); json for scripts")
    status.add_argument("--history", metavar="N", type=_positive, nargs="?", const=20,
                        help="the last N commands that changed the queue (default 20), with who ran them, instead "
                             "of the holds")
    _add_selectors(status, "the list of holds")
    status.set_defaults(func=cmd_status)

    explain = commands.add_parser(
        "explain", help="why one message is where it is: what the policy got and said, what a run would do, "
                        "what qrunner did",
        description="For one message in the live queue: the arguments CheckFile gets for it, each sender's answer "
                    "(or policy error), the action a run would take now and why (from the plan a dry run builds: "
                    "the whole queue is decided, since the script's globals carry over between calls), qrunner's "
                    "hold record and its history (held, released, sent, routed: when, by which run or command). "
                    "Changes nothing and logs nothing. An id not in the queue: its history, if any, and exit 1.",
        epilog=EXIT_CODES, formatter_class=RAW)
    explain.add_argument("queue_id", metavar="QUEUE_ID", help="the message to explain")
    _add_run_options(explain)
    explain.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    explain.set_defaults(func=cmd_explain)

    snapshot = commands.add_parser(
        "snapshot", help="write the live queue's candidates as a snapshot for plan --queue-file",
        description="Write the messages a run would ask the policy about now (the waiting mail and qrunner's own "
                    "holds), with their headers and queue file names, as the JSON lines 'plan --queue-file' and "
                    "'check --queue-file' read: test a policy change offline against today's queue, and keep the "
                    "file as a regression case. The file holds users' headers: it is created mode 0600. "
                    "Changes nothing.",
        epilog=EXIT_CODES, formatter_class=RAW)
    snapshot.add_argument("-o", "--output", metavar="FILE",
                          help="the file to write (replaced whole; default: standard output)")
    snapshot.set_defaults(func=cmd_snapshot, script=None, on_script_error=None, lua=None, senders=None,
                          queue_file=None)
    for command in (plan, check, run, flush, release, status, explain, snapshot):
        _add_log_options(command)
    return parser


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    """-v/-q after the command too (qrunner run -v); SUPPRESS keeps the global value when absent."""
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity",
                        default=argparse.SUPPRESS, help="more on stderr (and debug lines in the system log)")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                        default=argparse.SUPPRESS, help="only errors on stderr (the system log still gets every action and warning)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--script", metavar="PATH", help="the policy script (default: the config's 'script')")
    parser.add_argument("--now", metavar="YYYY-MM-DDTHH:MM:SS", type=_now,
                        help="the local time the script's clock shows (for tests; records and logs keep real time)")
    parser.add_argument("--on-script-error", choices=ON_SCRIPT_ERROR,
                        help="what a policy error does to a message (default: the config's, else skip = hold)")
    parser.add_argument("--lua", choices=LUA_VERSIONS, help="the Lua version to run the script with")
    parser.set_defaults(senders=None, queue_file=None)


def _add_id_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID", help=what)
    parser.add_argument("--all", action="store_true", help="all of them")


def _seconds(text: str) -> float:
    """A number of seconds above 0 (``--max-age``): not nan, not inf."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _add_selectors(parser: argparse.ArgumentParser, what: str) -> None:
    """The selectors (qrunner.selection): each narrows the command to the messages it matches."""
    group = parser.add_argument_group(
        "selecting messages", f"narrow {what} to the messages that match; a selector given twice matches either "
        "value, different selectors must all match; addresses and domains compare without case and may be "
        "shell patterns (*@example.com); no match: exit 1, nothing done")
    group.add_argument("--sender", dest="select_senders", metavar="ADDRESS", action="append", default=[],
                       help="the envelope sender (<> for a bounce's empty sender)")
    group.add_argument("--recipient", dest="select_recipients", metavar="ADDRESS", action="append", default=[],
                       help="any recipient still to be delivered")
    group.add_argument("--recipient-domain", dest="select_domains", metavar="DOMAIN", action="append", default=[],
                       help="the domain of any recipient still to be delivered")
    group.add_argument("--reason", dest="select_reason", metavar="TEXT",
                       help="qrunner's reason for the hold contains TEXT (without case); selects qrunner's holds only")
    group.add_argument("--reason-regex", dest="select_regex", metavar="REGEX", type=selection.parse_regex,
                       help="qrunner's reason for the hold matches REGEX (Python re, anywhere, without case)")
    group.add_argument("--older-than", dest="select_age", metavar="AGE", type=selection.parse_age,
                       help="arrived longer ago than AGE (90, 90s, 30m, 2h, 3d, 1w)")
    group.add_argument("--priority", dest="select_priority", metavar="N|LOW-HIGH", type=selection.parse_priority,
                       help="the priority the policy gave when qrunner held it (90, 50-100); qrunner's holds only")


def _add_bulk_options(parser: argparse.ArgumentParser, rate_help: str) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list what would be touched; change nothing")
    parser.add_argument("--limit", metavar="N", type=_positive,
                        help="at most N messages, the oldest of the selection first")
    parser.add_argument("--rate", metavar="N/s", type=selection.parse_rate, help=rate_help)


def _selector(args: argparse.Namespace) -> selection.Selector:
    return selection.Selector(
        senders=tuple(args.select_senders), recipients=tuple(args.select_recipients),
        recipient_domains=tuple(args.select_domains), reason=args.select_reason, reason_regex=args.select_regex,
        older_than=args.select_age, priority=args.select_priority)


def _choice(args: argparse.Namespace, backend) -> selection.Choice:
    """The named ids (checked against the MTA's syntax), --all, the selectors and --limit, as one choice."""
    selector = _selector(args)
    if args.all and args.queue_ids:
        raise UsageError("name queue ids or give --all, not both.")
    if not args.all and not args.queue_ids and selector.empty:
        raise UsageError("name the queue ids to act on, give --all, or select messages (--sender, "
                         "--recipient-domain, --reason, --older-than, --priority, ...).")
    for queue_id in args.queue_ids:
        if not backend.is_message_id(queue_id):
            raise UsageError(f"'{shown(queue_id)}' is not {backend.id_hint}.")
    return selection.Choice(tuple(args.queue_ids) if args.queue_ids else None, selector, args.limit)


# -- settings --------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(script=args.script, on_script_error=args.on_script_error, lua=args.lua)


def _senders(args: argparse.Namespace, config: Config) -> Sequence[Sender]:
    if not args.senders:
        return config.senders
    try:
        return check_senders(args.senders, "--sender")
    except QrunnerError as error:
        raise UsageError(error.message)


def _policy_settings(config: Config, now: Optional[int]) -> PolicySettings:
    return PolicySettings(script=config.script, lua=config.lua, timeout=config.script_timeout,
                          memory_mb=config.script_memory_mb, on_script_error=config.on_script_error, now=now,
                          strict_modes=config.strict_modes,
                          script_user=config.script_user)


def _runner(args: argparse.Namespace, config: Optional[Config] = None) -> Runner:
    """The pipeline for this command; use it in ``with``, which closes the back end."""
    config = config or _config(args)
    return Runner(config, backend_for(config), _policy_settings(config, getattr(args, "now", None)),
                  _senders(args, config) if hasattr(args, "senders") else config.senders,
                  command_line=getattr(args, "command_line", ""), progress=_progress(args),
                  rate=getattr(args, "rate", None))


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(wanted_progress(args.verbosity))


def _exit_code(decisions: Sequence[Decision]) -> int:
    return EX_POLICY_ERRORS if any(d.errors for d in decisions) else EX_OK


# -- commands --------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    if args.queue_file:
        from qrunner.mta.snapshot import SnapshotBackend

        config = _config(args)
        snapshot = SnapshotBackend(args.queue_file)
        decisions = decide_offline(_policy_settings(config, args.now), _senders(args, config), snapshot,
                                   _progress(args))
        print_decisions(report_order(decisions), args.format)
        return EX_DATAERR if snapshot.bad_lines else _exit_code(decisions)
    with _runner(args) as runner:
        result = runner.run(command="plan", dry_run=True)
    print_plan(result, args.format)
    return _exit_code(result.plan.decisions)


def cmd_run(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        result = runner.run(command="run", dry_run=args.dry_run)
    if args.dry_run:
        print_plan(result, "table")
    return EX_POLICY_ERRORS if result.trouble else EX_OK


def cmd_flush(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        choice = _choice(args, runner.backend)
        if args.ignore_policy and not args.dry_run:
            named = "every message" if choice.ids is None else ", ".join(choice.ids)
            if choice.narrowed:
                named += f" of {choice.describe()}" if choice.ids is None else f" ({choice.describe()})"
            logging.getLogger("qrunner").warning("flush --ignore-policy: the policy is overridden by the admin for %s",
                                                 named)
        result = runner.run(command="flush", dry_run=args.dry_run, only_ids=choice.ids,
                            ignore_policy=args.ignore_policy, choice=choice)
    if args.dry_run:
        print_plan(result, "table")
    return EX_POLICY_ERRORS if result.trouble else EX_OK


def cmd_release(args: argparse.Namespace) -> int:
    if args.for_removal:
        return _release_for_removal(args)
    if args.gate_removed:
        raise UsageError("--gate-removed goes with --for-removal.")
    with _runner(args, load_config(args.config)) as runner:
        choice = _choice(args, runner.backend)
        if args.to_default_queue and not runner.backend.has_named_queue:
            raise UsageError("--to-default-queue is for Exim's named queue; this MTA has no such queue.")
        if args.rate and not args.to_default_queue:
            raise UsageError("--rate paces delivery, and a plain release delivers nothing (in gate mode released "
                             "mail waits for qrunner's next run): use it with --to-default-queue, or on flush.")
        result = runner.release(choice.ids, to_default_queue=args.to_default_queue, choice=choice,
                                dry_run=args.dry_run)
    if args.dry_run:
        print_release_plan(result)
        return EX_POLICY_ERRORS if result.plan.left_alone else EX_OK
    return EX_OK if result.summary.outcome == "ok" else EX_POLICY_ERRORS


def print_release_plan(result: RunResult) -> None:
    """``release --dry-run``: what the release would touch, one line each, then how many."""
    plan = result.plan
    rows = [("QUEUE ID", "WOULD", "WHY")]
    rows += [(step.queue_id, "delete", step.reason) for step in plan.remove]
    rows += [(step.queue_id, "release", step.reason) for step in plan.release_copies]
    rows += [(step.queue_id, "release", step.reason) for step in plan.release]
    rows += [(step.queue_id, "move to the default queue", step.reason) for step in plan.hand_back]
    rows += [(step.queue_id, "leave alone", step.reason) for step in plan.left_alone]
    if len(rows) > 1:
        print(_columns(rows))
    moved = f", move {len(plan.hand_back)} to the default queue" if plan.hand_back else ""
    print(f"dry run: would release {len(plan.release)}{moved}; nothing was changed")


def _release_for_removal(args: argparse.Namespace) -> int:
    """``release --for-removal``: every hold, by the removal rule (Runner.release_for_removal); then say what stays."""
    if args.queue_ids or args.all or not _selector(args).empty or args.limit or args.rate or args.dry_run \
            or args.to_default_queue:
        raise UsageError("--for-removal releases every hold by the removal rule and takes no ids, --all, selectors, "
                         "--limit, --rate, --dry-run or --to-default-queue; to see what it would release, run "
                         "'qrunner status'.")
    with _runner(args, load_config(args.config)) as runner:
        summary = runner.release_for_removal(gate_removed=args.gate_removed)
        instance, state_dir = runner.backend.instance, runner.config.state_dir
    if summary.failed:
        return EX_POLICY_ERRORS
    print(f"ready for removal: qrunner holds nothing in {instance} any more; its records stay in {state_dir}")
    return EX_OK


def cmd_status(args: argparse.Namespace) -> int:
    if (args.check or args.history) and not _selector(args).empty:
        raise UsageError("selectors narrow the list of holds; --check and --history take none.")
    if args.check and args.history:
        raise UsageError("give --check or --history, not both.")
    with _runner(args, load_config(args.config)) as runner:
        if args.check:
            verdict = runner.check_health(args.max_age)
            print(verdict.text)
            return verdict.code
        if args.history:
            history = runner.recent_runs(args.history)
            print_history(history, args.format)
            return EX_OK
        status = runner.status(_selector(args))
    if args.format == "json":
        print(json.dumps(status_json(status), indent=2))
        return EX_OK
    print(f"qrunner holds in {status.instance}: {len(status.holds)}")
    if status.holds:
        rows = [("QUEUE ID", "HELD SINCE", "ENVELOPE FROM", "DECIDED BY", "PRIO", "REASON")]
        for hold in status.holds:
            note = "" if hold.state == "held" else f" [{hold.state}, settled by the next run]"
            note += "".join(f" [{text}]" for text in status.notes.get(hold.key, ()))
            rows.append((hold.queue_id, _clock(hold.held_at, "%Y-%m-%d %H:%M:%S"), _envelope(hold.envelope_sender),
                         hold.senders, "?" if hold.priority is None else str(hold.priority), hold.reason + note))
        print(_columns(rows))
    print(senders_line(status.routes))
    print(gate_line(status.gate))
    run = status.last_run
    if run is None:
        print("last run: none recorded")
    else:
        print(f"last run: {_clock(run.started, '%Y-%m-%d %H:%M:%S')} ({run.command}, {run.outcome}): "
              f"{_counts(run)}")
    return EX_OK


def _envelope(sender: Optional[str]) -> str:
    return "?" if sender is None else sender or "<>"


def _counts(run) -> str:
    moved = f" moved={run.moved}" if run.moved else ""
    return (f"listed={run.listed} sent={run.sent} held={run.held} released={run.released}{moved} "
            f"errors={run.errors} seconds={run.seconds:.2f}")


def _run_json(run) -> dict:
    return {"run_id": run.run_id, "command": run.command, "command_line": run.command_line,
            "invoked_by": run.invoked_by, "started": run.started, "finished": run.finished,
            "outcome": run.outcome, "listed": run.listed, "sent": run.sent, "held": run.held,
            "released": run.released, "moved": run.moved, "errors": run.errors}


def status_json(status) -> dict:
    """``status --format json``: the same facts as the table, for scripts (times as epoch seconds)."""
    old = set(status.past_lifetime)
    return {
        "instance": status.instance,
        "holds": [{"queue_id": h.queue_id, "arrival": h.arrival, "held_since": h.held_at, "state": h.state,
                   "envelope_sender": h.envelope_sender, "senders": h.senders, "priority": h.priority,
                   "reason": h.reason, "past_queue_lifetime": h.key in old,
                   "notes": list(status.notes.get(h.key, ()))} for h in status.holds],
        "senders": [{"name": s.name, "id": s.id, "route": route} for s, route in status.routes.items()],
        "gated": {"gated": status.gate.gated, "why": status.gate.why},
        "last_run": None if status.last_run is None else _run_json(status.last_run),
    }


def print_history(history, fmt: str) -> None:
    """``status --history``: one line per command, newest first: when, who, what, how it ended."""
    if fmt == "json":
        print(json.dumps([_run_json(run) for run in history], indent=2))
        return
    if not history:
        print("history: no command recorded")
        return
    rows = [("STARTED", "BY", "COMMAND", "OUTCOME", "COUNTS")]
    for run in history:
        outcome = run.outcome or ("running, or cut short" if run.finished is None else "")
        rows.append((_clock(run.started, "%Y-%m-%d %H:%M:%S"), run.invoked_by or "?",
                     run.command_line or run.command, outcome, _counts(run) if run.finished else ""))
    print(_columns(rows))


def cmd_explain(args: argparse.Namespace) -> int:
    with _runner(args) as runner:
        if not runner.backend.is_message_id(args.queue_id):
            raise UsageError(f"'{shown(args.queue_id)}' is not {runner.backend.id_hint}.")
        explanation = runner.explain(args.queue_id)
    print_explanation(explanation, args.format)
    if explanation.message is None:
        report_failure(f"{args.queue_id}: not in the queue (delivered, deleted, or never there); "
                       + ("what qrunner recorded of it is above." if explanation.history else
                          "qrunner has no record of it either."))
        return EX_POLICY_ERRORS
    return EX_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from qrunner.mta.snapshot import write_snapshot, write_snapshot_file

    with _runner(args) as runner:
        candidates = list(runner.candidates())
    with _progress(args).bar("snapshot", len(candidates)) as tick:
        lines = _ticking(candidates, tick)  # each line reads its message's headers: the slow part
        if args.output:
            count = write_snapshot_file(args.output, lines)
            logging.getLogger("qrunner").info("snapshot: %d messages written to %s", count, args.output)
        else:
            write_snapshot(lines, sys.stdout)
            sys.stdout.flush()
    return EX_OK


def _ticking(items, tick):
    for item in items:
        yield item
        tick(1)


def cmd_check(args: argparse.Namespace) -> int:
    from qrunner.mta.snapshot import SnapshotBackend

    config = _config(args)
    senders = _senders(args, config)
    if args.cases:
        if args.queue_file:
            raise UsageError("give --cases or --queue-file, not both.")
        return check_cases(args.cases, _policy_settings(config, args.now), senders, config.script)
    backend = SnapshotBackend(args.queue_file) if args.queue_file else None
    decisions = decide_offline(_policy_settings(config, args.now), senders, backend)
    if backend is None:
        names = ", ".join(f"{s.id}:{s.name}" for s in senders)
        print(f"{config.script}: loads without errors (Lua {config.lua}; senders {names})")
        return EX_OK
    failed = [d for d in decisions if d.errors]
    for decision in failed:
        for error in decision.errors:
            print(f"{decision.queue_id}: {error}")
    print(f"{config.script}: {len(decisions)} messages checked, {len(failed)} with policy errors")
    if backend.bad_lines:  # each named on stderr; the good lines were checked
        return EX_DATAERR
    return EX_POLICY_ERRORS if failed else EX_OK


def check_cases(path: str, settings: PolicySettings, senders: Sequence[Sender], script: str) -> int:
    """Each case that changed behaviour, with what it expected and what the script did; then a summary."""
    from qrunner.cases import describe, load_cases, run_cases, summary

    outcomes = run_cases(settings, senders, load_cases(path))
    for outcome in outcomes:
        if outcome.changes:
            print(f"{outcome.case.title}: {'; '.join(outcome.changes)} (the script said: {describe(outcome.decision)})")
    print(summary(script, outcomes))
    return EX_POLICY_ERRORS if any(o.changes for o in outcomes) else EX_OK


# -- output ----------------------------------------------------------------


def _decision_json(decision: Decision) -> dict:
    return {
        "queue_id": decision.queue_id,
        "action": decision.action,
        "priority": decision.priority,
        "sender_id": decision.sender.id if decision.sender else None,
        "sender_name": decision.sender.name if decision.sender else None,
        "reason": decision.reason,
        "errors": list(decision.errors),
    }


def print_decisions(decisions: Sequence[Decision], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps({"decisions": [_decision_json(d) for d in decisions]}))
    else:
        print(format_table([(d, _shown(d), _note(d)) for d in decisions]) + "\n" + summary_line(decisions))


def _clock(epoch: float, fmt: str = "%Y-%m-%dT%H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(epoch))


def print_plan(result: RunResult, fmt: str) -> None:
    """A live plan: like a snapshot's, plus releases, waits and the recovery a run would do first."""
    plan = result.plan
    waiting = {w.queue_id: w for w in plan.wait}
    released = {r.queue_id for r in plan.release}
    kept_held = {s.queue_id for s in plan.send if s.from_hold}
    ordered = report_order(plan.decisions)
    recovery = [("delete", s) for s in plan.remove] + [("release", s) for s in plan.release_copies]
    recovery += [("handback", s) for s in plan.hand_back]
    recovery += [("expire", _expire_note(s, waiting.get(s.queue_id), s.queue_id in released)) for s in plan.expire]
    if fmt == "json":
        # Written a decision at a time (the same text as one json.dumps of the
        # whole object): a 100,000-message plan as one list of dicts and one
        # string would double the run's peak memory.
        # Rows are encoded a thousand at a time, as one list whose brackets are
        # cut off (json.dumps puts the same ", " between items).
        write = sys.stdout.write
        write('{"decisions": [')
        rows = []
        errors_of = _errors_by_verdicts()
        for n, d in enumerate(ordered):
            queue_id = d.message.queue_id
            sender = d.sender
            wait = waiting.get(queue_id) if waiting else None
            rows.append({  # _decision_json's keys, then the plan's
                "queue_id": queue_id,
                "action": "send" if d.send else "skip",
                "priority": d.priority,
                "sender_id": sender.id if sender else None,
                "sender_name": sender.name if sender else None,
                "reason": d.reason,
                "errors": errors_of(d),
                "next_retry": _clock(wait.until) if wait and wait.until is not None else None,
                "next_retry_reason": wait.reason if wait and not wait.paced else None,
                "paced": wait.paced if wait and wait.paced else None,
                "release": queue_id in released or queue_id in kept_held,
            })
            if len(rows) == 1000:
                write((", " if n >= 1000 else "") + json.dumps(rows)[1:-1])
                rows = []
        if rows:
            write((", " if len(ordered) > len(rows) else "") + json.dumps(rows)[1:-1])
        write('], "recovery": ' + json.dumps([{"queue_id": s.queue_id, "action": action, "reason": s.reason}
                                               for action, s in recovery]) + "}\n")
        return
    table = []
    for d in ordered:
        notes = []
        if d.queue_id in waiting:
            notes.append(_wait_note(waiting[d.queue_id]))
        elif d.queue_id in released:
            notes.append("released from qrunner's hold, then sent")
        elif d.queue_id in kept_held:
            notes.append(f"handed from qrunner's hold to sender {d.senders}'s route")
        if _note(d):
            notes.append(_note(d))
        table.append((d, "wait" if d.queue_id in waiting else _shown(d), "; ".join(notes)))
    print(format_table(table, [(s.queue_id, action, s.reason) for action, s in recovery]))
    print(summary_line(plan.decisions))
    print(senders_line(result.routes))


def _errors_by_verdicts():
    """``list(decision.errors)``, worked out once per verdicts tuple: the messages that got the same answer share one
    (the policy shares them), and every decision lives as long as the plan, so the tuple's id stays its own."""
    found: Dict[int, list] = {}

    def errors_of(decision: Decision) -> list:
        key = id(decision.verdicts)
        errors = found.get(key)
        if errors is None:
            errors = found[key] = list(decision.errors)
        return errors

    return errors_of


def _expire_note(step: Expire, wait: Optional[Wait], released: bool) -> Expire:
    """An expire step as the plan shows it: its reason, and whether it is released first or waits for a retry time."""
    notes = [step.reason]
    if released:
        notes.append("released from qrunner's hold first")
    if wait is not None:
        notes.append(_wait_note(wait))
    return Expire(step.message, "; ".join(notes), step.bounce)


def _wait_note(wait: Wait) -> str:
    """"waits for Exim's retry time 12:03:29 (host ...)": until when, and whose retry time holds it; or which limit."""
    if wait.paced:
        return f"waits for the next run: {wait.paced}"
    note = f"waits for {wait.due.whose} {_clock(wait.until, '%H:%M:%S')}"
    return f"{note} ({wait.due.detail})" if wait.due.detail else note


def senders_line(routes: Dict[Sender, str]) -> str:
    """The senders in the order they run, each with how its mail leaves."""
    return "senders: " + "; ".join(f"{s.id}:{s.name} ({route})" for s, route in routes.items())


def _shown(decision: Decision) -> str:
    """What the table calls the action: "hold", as the log and the README do (the JSON keeps the verdict "skip")."""
    return "send" if decision.send else "hold"


def gate_line(gate: Gate) -> str:
    """``gated: yes``, or no / unknown with why: the admin's first question when mail leaves unplanned."""
    if gate.gated:
        return "gated: yes"
    return f"gated: {'no' if gate.gated is False else 'unknown'} ({gate.why})"


def _note(decision: Decision) -> str:
    if not decision.send:
        return decision.reason
    return "; ".join(f"policy error: {e}" for e in decision.errors)


def format_table(rows: Sequence[Tuple[Decision, str, str]], recovery: Sequence[Tuple[str, str, str]] = ()) -> str:
    """An aligned table: the decisions (sends in dispatch order, then skips), then recovery steps."""
    lines = [("QUEUE ID", "ACTION", "PRIO", "SENDER", "REASON")]
    for d, action, note in rows:
        lines.append((d.queue_id, action, str(d.priority) if d.send else "-", d.senders if d.send else "-",
                      note))
    lines.extend((queue_id, action, "-", "-", reason) for queue_id, action, reason in recovery)
    return _columns(lines)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns; the last column is left ragged. Each cell is shown on one line, escaped
    (an id or reason from a snapshot or the state database may hold any character)."""
    rows = [[shown(cell, tabs=False) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def summary_line(decisions: Sequence[Decision]) -> str:
    """One line: how many are sent (per sender), skipped, and policy errors per sender."""
    sent: dict = {}
    errors: dict = {}
    for d in decisions:
        if d.send and d.sender is not None:
            sent[d.sender] = sent.get(d.sender, 0) + 1
        for verdict in d.verdicts:
            if verdict.error:
                errors[verdict.sender] = errors.get(verdict.sender, 0) + 1
    sent = {s.name: sent[s] for s in sorted(sent, key=lambda s: s.id)}
    errors = {s.name: errors[s] for s in sorted(errors, key=lambda s: s.id)}
    skipped = sum(1 for d in decisions if not d.send)
    per_sender = ", ".join(f"{name} {count}" for name, count in sent.items())
    text = f"{len(decisions)} messages: {sum(sent.values())} to send"
    text += f" ({per_sender})" if per_sender else ""
    text += f", {skipped} to hold"
    if errors:
        text += "; policy errors: " + ", ".join(f"{name} {count}" for name, count in errors.items())
    else:
        text += "; no policy errors"
    return text


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def checkfile_arguments(e: Explanation) -> dict:
    """CheckFile's arguments for the message, named as the VPOP3 API names them (Actions aside)."""
    m = e.message
    return {"Filename": m.queue_file(), "Size": m.size, "CreationTime": m.creation_time(), "ReturnPath": m.sender,
            "Recipients": list(m.recipients), "HeaderLines": [_text(line) for line in e.header_lines]}


def sender_answers(e: Explanation) -> List[dict]:
    """Each configured sender in the order they run, with what its pass returned for the message, if asked."""
    verdicts = {v.sender: v for v in (e.decision.verdicts if e.decision else ())}
    answers = []
    for sender in e.senders:
        v = verdicts.get(sender)
        answers.append({"sender_id": sender.id, "sender_name": sender.name, "asked": v is not None,
                        "action": None if v is None else "skip" if v.skip else "send",
                        "priority": None if v is None else v.priority, "reason": None if v is None else v.reason,
                        "error": None if v is None else v.error})
    return answers


def _step_json(step: Planned) -> dict:
    return {"action": step.action, "reason": step.reason, "priority": step.priority, "sender": step.sender,
            "position": step.position, "of": step.of, "until": _clock(step.until) if step.until else None}


def _history_json(entry: HistoryEntry) -> dict:
    event = entry.event
    return {"at": _clock(entry.at), "run_id": entry.run_id, "command": entry.command,
            "invoked_by": entry.invoked_by, "queue_id": event.key.queue_id,
            "arrival": event.key.arrival, "action": event.action, "sender": event.sender or None,
            "priority": event.priority, "reason": event.reason or None, "new_queue_id": event.new_queue_id or None}


def explanation_json(e: Explanation) -> dict:
    if e.message is None:
        return {"queue_id": e.queue_id, "in_queue": False, "history": [_history_json(h) for h in e.history]}
    m = e.message
    hold = e.hold
    return {
        "queue_id": e.queue_id, "in_queue": True, "arrival": _clock(m.arrival), "queue_name": m.queue_name,
        "state": m.state, "checkfile": checkfile_arguments(e), "header_problem": e.header_problem,
        "senders": sender_answers(e), "decision": _decision_json(e.decision) if e.decision else None,
        "steps": [_step_json(s) for s in e.steps],
        "hold": None if hold is None else {"held_since": _clock(hold.held_at), "state": hold.state,
                                           "senders": hold.senders, "reason": hold.reason},
        "history": [_history_json(h) for h in e.history],
    }


def print_explanation(e: Explanation, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(explanation_json(e)))
        return
    if e.message is not None:
        print("\n".join(explanation_lines(e)))
    if e.history or e.message is not None:
        print("history:" if e.history else "history: none recorded")
        if e.history:
            print(_columns([_history_row(h, e.queue_id, e.message is not None) for h in e.history]))


def explanation_lines(e: Explanation) -> List[str]:
    """The text report, section by section: the message, CheckFile's arguments, the senders, the plan, the hold."""
    m = e.message
    where = m.state if m.queue_name in ("", m.state) else f"{m.queue_name}: {m.state}"
    lines = [f"{m.queue_id}: in the queue ({where}), arrived {_clock(m.arrival, '%Y-%m-%d %H:%M:%S')}"]
    args = checkfile_arguments(e)
    called = e.decision is not None
    lines.append("CheckFile's arguments:" if called else "CheckFile's arguments (the policy is not asked about it):")
    headers = args.pop("HeaderLines")
    rows = [(f"  {name}", ", ".join(value) if isinstance(value, list) else str(value) or '""')
            for name, value in args.items()]
    rows.append(("  HeaderLines", f"{len(headers)} fields" + (f" ({e.header_problem})" if e.header_problem else "")))
    lines.append(_columns(rows))
    lines.extend("    " + line.replace("\n", "\n    ") for line in headers)
    if called:
        lines.append("senders (in the order they run):")
        rows = [(f"  {a['sender_id']}:{a['sender_name']}", _answer(a, e)) for a in sender_answers(e)]
        lines.append(_columns(rows))
    lines.append("a run now would:")
    lines.extend(f"  {_step_text(step)}" for step in e.steps)
    hold = e.hold
    if hold is None:
        lines.append("qrunner's hold: none")
    else:
        state = "" if hold.state == "held" else f" [{hold.state}, settled by the next run]"
        lines.append(f"qrunner's hold: since {_clock(hold.held_at, '%Y-%m-%d %H:%M:%S')}, by {hold.senders}: "
                     f"{hold.reason}{state}")
    return lines


def _answer(answer: dict, e: Explanation) -> str:
    if not answer["asked"]:
        return f"not asked: sender {e.decision.senders} sends it" if e.decision.send else "not asked"
    text = f"{answer['action']}, priority {answer['priority']}"
    if answer["error"]:
        return f"policy error: {answer['error']} (so: {text})"
    return f"{text}: {answer['reason']}" if answer["reason"] else text


def _step_text(step: Planned) -> str:
    """One planned step in words: "send, priority 80, by sender backup (3 of 12 in dispatch order): ..."."""
    if step.action == "send":
        return (f"send, priority {step.priority}, by sender {step.sender} ({step.position} of {step.of} in dispatch "
                f"order): {step.reason}")
    if step.action == "wait":
        return f"wait until {_clock(step.until, '%Y-%m-%d %H:%M:%S')} (priority {step.priority}, sender " \
               f"{step.sender}): {step.reason}"
    return f"{step.action}: {step.reason}"


def _history_row(entry: HistoryEntry, queue_id: str, live: bool) -> Tuple[str, ...]:
    """When, which run (and its command), the action, and the log line's fields.

    The message the entry is about is named when it may not be the one
    explained: an id no longer in the queue (each earlier message that had
    it), or the original whose route made this copy.
    """
    from qrunner.executor import quote

    event = entry.event
    by = f", by {entry.invoked_by}" if entry.invoked_by else ""
    run = f"run {entry.run_id} ({entry.command or 'record pruned'}{by})"
    fields = [f"sender={event.sender}" if event.sender else "",
              f"priority={event.priority}" if event.priority is not None else "",
              f"new_queue_id={event.new_queue_id}" if event.new_queue_id else "",
              f"reason={quote(event.reason)}" if event.reason else ""]
    if not live or event.key.queue_id != queue_id:
        fields.insert(0, f"{event.key.queue_id} (arrived {_clock(event.key.arrival, '%Y-%m-%d %H:%M:%S')})")
    return (f"  {_clock(entry.at, '%Y-%m-%d %H:%M:%S')}", run, event.action, " ".join(f for f in fields if f))


def _unbreakable_stdout() -> None:
    """Under a strict UTF-8 locale, text that was not UTF-8 (kept as surrogate escapes) would make print raise:
    written as backslash escapes instead (stderr already is). Tables escape their cells themselves."""
    stream = sys.stdout
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="backslashreplace")


def main(argv: Optional[List[str]] = None) -> int:
    _unbreakable_stdout()
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        args.command_line = shlex.join(["qrunner", *(sys.argv[1:] if argv is None else argv)])
        # A dry run and a look (plan, check, status) change nothing, so nothing of theirs reaches the mail log.
        acting = args.command in ("run", "flush", "release") and not getattr(args, "dry_run", False)
        setup_logging(args.verbosity, to_system_log=acting)
        return args.func(args)
    except NothingSelected as error:
        print(f"qrunner: {error.message}", file=sys.stderr)
        return error.exit_code
    except LockHeldError as error:
        # Not a failure: the previous run is still at work. Under -q (cron) only the system log hears it.
        report_failure(error.message, logging.WARNING, on_stderr=getattr(args, "verbosity", 0) >= 0)
        return error.exit_code
    except QrunnerError as error:
        report_failure(error.message)
        return error.exit_code
    except KeyboardInterrupt:
        print("qrunner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (qrunner plan | head): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
