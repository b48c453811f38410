"""The command line: argument parsing and output, nothing else.

Each command builds its settings, hands them to the pipeline and prints what
came back. Errors end as one sentence on stderr and an exit code from
:mod:`qrunner.exceptions`; no traceback reaches the admin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

from qrunner import __version__
from qrunner.config import LUA_VERSIONS, ON_SCRIPT_ERROR, Config, Sender, check_senders, load_config
from qrunner.exceptions import EX_OK, EX_POLICY_ERRORS, QrunnerError, UsageError
from qrunner.log import setup_logging
from qrunner.mta.snapshot import SnapshotBackend
from qrunner.plan import report_order
from qrunner.policy import Decision, PolicyEngine, PolicySettings

EXIT_CODES = """\
exit codes:
  0   every message decided (and acted on) without a policy error
  1   decided, but at least one message had a policy error
  64  bad usage (an unknown option, a malformed --now or --sender)
  65  malformed input (a snapshot line that is not postqueue -j JSON)
  66  an input file named on the command line does not exist
  69  the MTA is not installed or not running
  75  another qrunner run holds the lock; try again later
  77  not run with the rights the MTA's commands need
  78  configuration error, or a policy script that does not load
      (nothing was decided, nothing printed on stdout, nothing changed)
"""


class _Parser(argparse.ArgumentParser):
    """argparse that ends bad usage with exit 64 (EX_USAGE), not 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see '{self.prog} --help'.")


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
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $QRUNNER_CONFIG, else /etc/qrunner/qrunner.toml)")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0,
                        help="log more")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", help="log errors only")
    parser.add_argument("--version", action="version", version=f"qrunner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    plan = commands.add_parser(
        "plan", help="show what the policy would do, change nothing",
        description="Show, for every message, whether the policy sends it (and in which order) or skips it. "
                    "Changes nothing.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_policy_options(plan, "a queue snapshot (postqueue -j lines, '-' for stdin) instead of the live queue")
    plan.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    plan.set_defaults(func=cmd_plan)

    check = commands.add_parser(
        "check", help="check that the policy script loads (and runs over a snapshot)",
        description="Load the policy script for every sender and report load errors with line numbers; "
                    "with --queue-file, also run it over every message and list the policy errors.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_policy_options(check, "a queue snapshot to run the script over (postqueue -j lines, '-' for stdin)")
    check.set_defaults(func=cmd_check)
    return parser


# -- settings --------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(script=args.script, on_script_error=args.on_script_error, lua=args.lua)


def _senders(args: argparse.Namespace, config: Config) -> Sequence[Sender]:
    if args.senders:
        return check_senders(args.senders, "--sender")
    return config.senders


def _policy_settings(config: Config, now: Optional[int]) -> PolicySettings:
    return PolicySettings(script=config.script, lua=config.lua, timeout=config.script_timeout,
                          memory_mb=config.script_memory_mb, on_script_error=config.on_script_error, now=now)


def _decide(args: argparse.Namespace) -> List[Decision]:
    config = _config(args)
    senders = _senders(args, config)
    if not args.queue_file:
        raise UsageError("plan and check need --queue-file PATH (a 'postqueue -j' snapshot, '-' for stdin).")
    messages = SnapshotBackend(args.queue_file).list_messages()
    with PolicyEngine(_policy_settings(config, args.now)) as engine:
        return engine.decide(messages, senders)


# -- commands --------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    decisions = report_order(_decide(args))
    if args.format == "json":
        print(json.dumps({"decisions": [_decision_json(d) for d in decisions]}, indent=None))
    else:
        print(format_table(decisions))
    return EX_POLICY_ERRORS if any(d.errors for d in decisions) else EX_OK


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    senders = _senders(args, config)
    settings = _policy_settings(config, args.now)
    with PolicyEngine(settings) as engine:
        for sender in senders:
            engine.load(sender)
        if not args.queue_file:
            names = ", ".join(f"{s.id}:{s.name}" for s in senders)
            print(f"{config.script}: loads without errors (Lua {config.lua}; senders {names})")
            return EX_OK
        messages = SnapshotBackend(args.queue_file).list_messages()
        decisions = engine.decide(messages, senders)
    failed = [d for d in decisions if d.errors]
    for decision in failed:
        for error in decision.errors:
            print(f"{decision.queue_id}: {error}")
    print(f"{config.script}: {len(decisions)} messages checked, {len(failed)} with policy errors")
    return EX_POLICY_ERRORS if failed else EX_OK


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


def _note(decision: Decision) -> str:
    if not decision.send:
        return decision.reason
    return "; ".join(f"policy error: {e}" for e in decision.errors)


def format_table(decisions: Sequence[Decision]) -> str:
    """An aligned table, sends in dispatch order then skips, and a summary line."""
    rows = [("QUEUE ID", "ACTION", "PRIO", "SENDER", "REASON")]
    for d in decisions:
        rows.append((d.queue_id, d.action, str(d.priority) if d.send else "-",
                     d.sender.name if d.sender else "-", _note(d)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n" + summary_line(decisions)


def summary_line(decisions: Sequence[Decision]) -> str:
    """One line: how many are sent (per sender), skipped, and policy errors per sender."""
    sent: dict = {}
    errors: dict = {}
    for d in decisions:
        if d.send:
            sent[d.sender.name] = sent.get(d.sender.name, 0) + 1
        for verdict in d.verdicts:
            if verdict.error:
                errors[verdict.sender.name] = errors.get(verdict.sender.name, 0) + 1
    skipped = sum(1 for d in decisions if not d.send)
    per_sender = ", ".join(f"{name} {count}" for name, count in sent.items())
    text = f"{len(decisions)} messages: {sum(sent.values())} to send"
    text += f" ({per_sender})" if per_sender else ""
    text += f", {skipped} to skip"
    if errors:
        text += "; policy errors: " + ", ".join(f"{name} {count}" for name, count in errors.items())
    else:
        text += "; no policy errors"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        setup_logging(args.verbosity)
        return args.func(args)
    except QrunnerError as error:
        print(f"qrunner: {error.message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("qrunner: interrupted", file=sys.stderr)
        return 130
