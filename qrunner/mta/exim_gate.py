"""qrunner's gate in Exim's configuration, judged from what ``exim -bP`` prints.

The gate (contrib/exim/) is the ACL options that put relay mail into the
named queue and keep Exim from delivering it at once, CHUNKING turned off,
and, for senders with a route, the router that reads qrunner's routes file.
Without it Exim delivers relay mail by itself: a run lists an empty queue
(``listed=0``) while the mail leaves without the policy. So every run says so
(``Runner._warn_gate``) and ``status`` shows it.

Read from Exim, never from the files: Debian's ``update-exim4.conf`` builds
the configuration from many pieces, and only Exim knows the result. Two
``exim -bP`` processes per run, never one per message (Exim 4.96, measured):

- ``exim -bP acl_not_smtp_start ... chunking_advertise_hosts`` prints each
  option as ``name = value``, macros expanded and defaults filled in (an
  unset ACL option prints ``name = ``; ``chunking_advertise_hosts``
  defaults to ``*``).
- ``exim -bP config`` prints the whole configuration as Exim read it:
  macros expanded, ``.ifdef`` resolved, continuation lines joined, each ACL
  and router a block of lines under ``  name:`` (to users other than root
  and Exim's admins only the macro definitions and ``hide`` options are
  masked). Exim 4.96 has no ``-bP acl NAME``, and ``config`` must be asked
  alone: after another name it prints nothing, and names after it are
  ignored.

An ACL option names an ACL when its value is one word that is an ACL's
name, a file when the word starts with ``/``, and is the ACL's text itself
otherwise (Exim's ``acl_check_internal``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from qrunner.mta.base import Gate

OPTIONS = ("acl_not_smtp_start", "acl_not_smtp", "acl_smtp_predata", "acl_smtp_rcpt", "acl_smtp_mail",
           "chunking_advertise_hosts")
WHERE_TO_FIX = ("see contrib/exim/README.md (the gate: contrib/exim/exim-gate.conf; on Debian's split "
                "configuration: contrib/exim/conf.d/)")
NO_TEXT = "exim -bP config printed no configuration, so qrunner cannot read Exim's ACLs and routers"

_OPTION = re.compile(r"^(\w+) = ?(.*)$")
_BLOCK = re.compile(r"^\s*([\w.-]+):\s*$")
_SECTION = re.compile(r"^begin\s+(\w+)\s*$")
# One ACL line: an optional verb, then a condition or modifier "name = value" (the value is the rest of the line).
_STATEMENT = re.compile(r"^\s*(?:(?:accept|defer|deny|discard|drop|require|warn)\s+)?!?(\w+)\s*=\s*(.*?)\s*$")
_HOLD = re.compile(r"^queue(?:_only)?(?:/.*)?$")  # control = queue (queue_only: its older name, still accepted)


@dataclass
class Configuration:
    """What ``exim -bP`` said: option values, and the ACLs and routers when Exim showed its configuration."""

    options: Dict[str, str]
    shown: bool = False  # False: ``exim -bP config`` printed no configuration
    acls: Dict[str, List[str]] = field(default_factory=dict)
    routers: List[Tuple[str, Dict[str, str]]] = field(default_factory=list)


@dataclass
class _Findings:
    missing: List[str] = field(default_factory=list)  # what is certainly not there
    unsure: List[str] = field(default_factory=list)   # what qrunner cannot judge


# -- reading -------------------------------------------------------------------


def read(options_output: str, config_output: str) -> Configuration:
    """``exim -bP OPTIONS...`` and ``exim -bP config`` as one :class:`Configuration`."""
    options = {}
    for line in options_output.splitlines():
        match = _OPTION.match(line)
        if match:
            options[match.group(1)] = match.group(2).strip()
    if not config_output.startswith("# Exim Configuration"):
        return Configuration(options)
    sections = _sections(config_output)
    acls = {name: lines for name, lines in _blocks(sections.get("acl", []))}
    routers = [(name, _router_options(lines)) for name, lines in _blocks(sections.get("routers", []))]
    return Configuration(options, True, acls, routers)


def _sections(text: str) -> Dict[str, List[str]]:
    sections: Dict[str, List[str]] = {"main": []}
    current = sections["main"]
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            current = sections.setdefault(match.group(1), [])
        else:
            current.append(line)
    return sections


def _blocks(lines: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """The named blocks of an ACL or routers section, each with its lines."""
    blocks: List[Tuple[str, List[str]]] = []
    for line in lines:
        match = _BLOCK.match(line)
        if match:
            blocks.append((match.group(1), []))
        elif blocks and line.strip():
            blocks[-1][1].append(line.strip())
    return blocks


def _router_options(lines: Sequence[str]) -> Dict[str, str]:
    options = {}
    for line in lines:
        name, equals, value = line.partition("=")
        if equals:
            options[name.strip()] = value.strip()
    return options


# -- judging -------------------------------------------------------------------


def judge(config: Configuration, queue: str, routes_file: str = "", routed: Sequence[str] = (),
          old_routes_file: str = "") -> Gate:
    """Is mail for outside put in ``queue`` and held there for qrunner, on every way in?

    ``routed``: the names of senders with a route, whose mail needs the
    router that reads ``routes_file`` first, or it leaves by Exim's usual
    routers. A router that reads ``old_routes_file`` (where releases before
    the routes file's own directory kept it) still routes, since qrunner
    keeps that file up to date while a router names it; the run warns. Certain gaps make the answer False (each named, with where to
    fix it); what qrunner cannot read or judge makes it None.
    """
    if not queue:
        return Gate(False, "[exim] queue is empty, so qrunner works on Exim's default queue, which Exim's own "
                           "queue runners deliver on their schedule; set queue = \"qrunner\" and add the gate: " +
                           WHERE_TO_FIX)
    found = _Findings()
    if not config.shown:
        found.unsure.append(NO_TEXT)
    _check_command_line(config, queue, found)
    _check_smtp(config, queue, found)
    if routed:
        _check_router(config, routes_file, routed, found, old_routes_file)
    if found.missing:
        return Gate(False, "Exim is not gated for qrunner: " + "; ".join(found.missing) + "; " + WHERE_TO_FIX,
                    leftover=_leftover(config, queue))
    if found.unsure:
        return Gate(None, "; ".join(found.unsure))
    return Gate(True, f"Exim's ACLs put outbound mail into the queue {queue} and hold it there, CHUNKING is off" +
                ("; a router sends routed senders' mail by their transport" if routed else ""))


def _check_command_line(config: Configuration, queue: str, found: _Findings) -> None:
    """sendmail, cron and Exim's own bounces: queued by acl_not_smtp_start, held by acl_not_smtp."""
    start = _acl_lines(config, "acl_not_smtp_start", found)
    if start is not None and not _sets_queue(start, queue):
        found.missing.append("command-line mail (sendmail, cron, Exim's bounces) leaves at once, without the "
                             "policy: " + _lacks(config, "acl_not_smtp_start", f"queue = {queue}"))
    after = _acl_lines(config, "acl_not_smtp", found)
    if after is not None and not _holds(after):
        found.missing.append(f"command-line mail in the queue {queue} is delivered at once, without the policy: " +
                             _lacks(config, "acl_not_smtp", "control = queue"))


def _check_smtp(config: Configuration, queue: str, found: _Findings) -> None:
    """SMTP mail: gated before DATA (contrib's acl_smtp_predata, CHUNKING off), or at MAIL/RCPT.

    BDAT (CHUNKING) skips acl_smtp_predata in Exim 4.96; the MAIL and RCPT
    ACLs run for every client (contrib/exim/conf.d/acl/35_qrunner_gate
    names the RCPT way as an alternative).
    """
    for option in ("acl_smtp_mail", "acl_smtp_rcpt"):
        lines = _acl_lines(config, option, _Findings())
        if lines is not None and _sets_queue(lines, queue) and _holds(lines):
            return
    predata = _acl_lines(config, "acl_smtp_predata", found)
    if predata is not None and not (_sets_queue(predata, queue) and _holds(predata)):
        found.missing.append("SMTP mail leaves at once, without the policy: " +
                             _lacks(config, "acl_smtp_predata", f"queue = {queue} and control = queue"))
    chunking = config.options.get("chunking_advertise_hosts", "*")
    if chunking:
        found.missing.append("SMTP mail sent with CHUNKING (BDAT) skips acl_smtp_predata and leaves at once: "
                             f"chunking_advertise_hosts = {chunking} (set it empty)")


def _leftover(config: Configuration, queue: str) -> str:
    """The ACL options whose ACL still puts mail into ``queue``: a gate half taken out still strands mail there."""
    still = [option for option in OPTIONS[:-1] if _sets_queue(_acl_lines(config, option, _Findings()) or [], queue)]
    return f"{', '.join(still)} still put mail into the queue {queue}" if still else ""


def _check_router(config: Configuration, routes_file: str, routed: Sequence[str], found: _Findings,
                  old_routes_file: str = "") -> None:
    """The router that reads qrunner's routes file must come first, or routed mail leaves by another router."""
    if not config.shown:
        return
    wrong_way = f"the mail of the senders with a route ({', '.join(routed)}) would leave by Exim's usual routers"
    wanted = {routes_file, os.path.normpath(routes_file)} | ({old_routes_file} if old_routes_file else set())
    reading = [name for name, options in config.routers if any(w in v for w in wanted for v in options.values())]
    if not reading:
        other = [name for name, options in config.routers
                 if any(os.path.basename(routes_file) in v for v in options.values())]
        if other:
            found.missing.append(f"{wrong_way}: router {other[0]} reads another routes file than the one qrunner "
                                 f"writes ({routes_file}, beside state_dir); make the paths the same")
        else:
            found.missing.append(f"{wrong_way}: no router reads qrunner's routes file {routes_file}; add "
                                 "qrunner_route (contrib/exim/conf.d/router/05_qrunner_route) as the first router")
        return
    first = config.routers[0][0]
    if first != reading[0]:
        found.missing.append(f"{wrong_way}: router {reading[0]}, which reads qrunner's routes file, is not the first "
                             f"router ({first} comes before it)")


def _acl_lines(config: Configuration, option: str, found: _Findings) -> Optional[List[str]]:
    """The lines of the ACL an option names (with the ACLs it calls by ``acl =``); None when they cannot be judged."""
    value = config.options.get(option, "")
    if not value:
        return []
    if "$" in value:
        found.unsure.append(f"{option} = {value} is expanded when Exim uses it, so qrunner cannot tell which ACL "
                            "runs")
        return None
    if not config.shown:
        return None
    if " " in value or value not in config.acls:
        if value.startswith("/"):
            found.unsure.append(f"{option} reads its ACL from the file {value}, which qrunner does not judge")
            return None
        return [value]  # the ACL's text itself
    return _with_called(config, value, set())


def _with_called(config: Configuration, name: str, seen: set) -> List[str]:
    """An ACL's lines and those of the named ACLs it calls (``acl = NAME``), each once."""
    seen.add(name)
    lines = list(config.acls.get(name, []))
    for line in config.acls.get(name, []):
        match = _STATEMENT.match(line)
        if match and match.group(1) == "acl" and match.group(2) in config.acls and match.group(2) not in seen:
            lines.extend(_with_called(config, match.group(2), seen))
    return lines


def _sets_queue(lines: Sequence[str], queue: str) -> bool:
    """A ``queue =`` modifier whose value names the queue (contrib's is an ``${if ...{qrunner}{}}``)."""
    name = re.compile(r"(?<![\w-])" + re.escape(queue) + r"(?![\w-])")
    return any(match.group(1) == "queue" and name.search(match.group(2))
               for match in map(_STATEMENT.match, lines) if match)


def _holds(lines: Sequence[str]) -> bool:
    return any(match.group(1) == "control" and _HOLD.match(match.group(2))
               for match in map(_STATEMENT.match, lines) if match)


def _lacks(config: Configuration, option: str, what: str) -> str:
    value = config.options.get(option, "")
    if not value:
        return f"{option} is not set"
    return f"{option} = {value} does not set {what}"
