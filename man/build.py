#!/usr/bin/env python3
"""Write qrunner's manual pages and example configuration from their one source each (``make man``).

- The commands and options: qrunner's own argparse definitions (``qrunner.cli.build_parser``).
- The settings: the table the configuration loader reads (``qrunner.settings``).
- The exit codes: ``qrunner.exceptions.EXIT_STATUS``.
- Everything else: the hand-written prose in ``man/*.md``, the only place it lives.

The prose is a small subset of Markdown, turned into man(7) roff here:
``# HEADING`` (.SH), ``## Heading`` (.SS), paragraphs, ``- `` bullets (continued by indented lines),
``@ TERM`` then its text (a tagged paragraph, .TP; a following paragraph indented by two spaces
continues it), two-column ``| a | b |`` tables (rows become tagged paragraphs, the header row is
dropped), fenced code blocks, and inline `code` (bold, as man pages show literal text) and **bold**.
A line ``{{NAME}}`` is replaced by generated text (see ``GENERATED``; ``{{command NAME}}`` is one
command's entry, ``{{file PATH}}`` a file of the repository shown whole).

The output depends on nothing but the sources (no date, no terminal width), so a test can compare the
committed pages with a fresh build: ``python3 man/build.py --output DIR``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from typing import Callable, Dict, Iterable, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qrunner import __version__  # noqa: E402
from qrunner.cli import build_parser  # noqa: E402
from qrunner.exceptions import EXIT_STATUS  # noqa: E402
from qrunner.settings import SECTIONS, Setting, in_section, toml_value  # noqa: E402

HERE = os.path.join(ROOT, "man")

# page file -> (title, section, the NAME line's description, the manual's name)
PAGES = {
    "qrunner.8": ("QRUNNER", "8", "run a VPOP3 Lua policy over the outgoing queue of Postfix or Exim",
                  "System Manager's Manual"),
    "qrunner.toml.5": ("QRUNNER.TOML", "5", "configuration of qrunner", "File Formats Manual"),
    "qrunner-policy.7": ("QRUNNER-POLICY", "7", "the VPOP3 policy API that qrunner runs (relayout.lua, CheckFile)",
                         "Miscellaneous Information Manual"),
}
SELECTORS = "selecting messages"  # the argparse group of the selectors, listed once in SELECTING MESSAGES
CONTRIB_TOML = os.path.join("contrib", "qrunner.toml")


# -- inline mark-up -------------------------------------------------------------------------------------

def _escape(text: str) -> str:
    """Text as roff reads it literally: backslashes escaped, non-ASCII as named Unicode characters."""
    text = text.replace("\\", "\\e")
    return "".join(c if ord(c) < 128 else "\\[u%04X]" % ord(c) for c in text)


def _code(text: str) -> str:
    return "\\fB" + _escape(text).replace("-", "\\-") + "\\fR"


def inline(text: str) -> str:
    """One line of prose: `code` and **bold** to fonts; a hyphen that starts a word (an option) stays a minus."""
    out: List[str] = []
    text = re.sub(r"\*\*`([^`]*)`\*\*", r"`\1`", text)  # bold code is code: man shows literals in bold anyway
    for index, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if index % 2:
            out.append(_code(part[1:-1]))
            continue
        part = _escape(part)
        part = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", part)
        part = re.sub(r"(?<![\w\\])-", r"\\-", part)
        out.append(part)
    line = "".join(out)
    return "\\&" + line if line.startswith((".", "'")) else line


def _literal(line: str) -> str:
    line = _escape(line).replace("-", "\\-")
    return "\\&" + line if line.startswith((".", "'")) or not line else line


# -- blocks ---------------------------------------------------------------------------------------------

def render(markdown: str) -> List[str]:
    """The prose subset of Markdown (see the module's docstring) as man(7) lines."""
    lines = markdown.split("\n")
    out: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line.startswith("```"):
            end = lines.index("```", i + 1) if "```" in lines[i + 1:] else len(lines)
            out += [".PP", ".RS 4", ".nf"] + [_literal(code) for code in lines[i + 1:end]] + [".fi", ".RE"]
            i = end + 1
            continue
        if line.startswith("# "):
            out.append(".SH " + _quote(line[2:].strip().upper()))
            i += 1
            continue
        if line.startswith("## "):
            out.append(".SS " + _quote(line[3:].strip()))
            i += 1
            continue
        if line.startswith("|"):
            i = _table(lines, i, out)
            continue
        # A paragraph: up to the next blank line, fence or heading; bullets and terms start their own.
        block = [line]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(("```", "#", "|", "- ", "@ ")):
            block.append(lines[i])
            i += 1
        _paragraph(block, out)
    return out


def _quote(text: str) -> str:
    return '"' + inline(text).replace('"', '\\(dq') + '"'


def _paragraph(block: List[str], out: List[str]) -> None:
    """One paragraph as one input line, so that `code` may run across the source's line breaks."""
    first = block[0]
    rest = " ".join(t.strip() for t in block[1:])
    if first.startswith("@ "):
        out += [".TP", inline(first[2:].strip())] + ([inline(rest)] if rest else [])
        return
    joined = " ".join(t.strip() for t in block)
    if first.startswith("- "):
        out += [".IP \\(bu 2", inline(joined[2:])]
    elif first.startswith("  "):
        out += [".IP", inline(joined)]  # continues the tagged paragraph or bullet above
    else:
        out += [".PP", inline(joined)]


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: List[str], i: int, out: List[str]) -> int:
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append(_cells(lines[i]))
        i += 1
    for row in rows[2:]:  # the header and the --- row are dropped: each row says what it is
        out += [".TP", inline(row[0]), inline(" ".join(row[1:]))]
    return i


# -- generated parts: the commands and options --------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _summaries(parser: argparse.ArgumentParser) -> Dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help for choice in action._choices_actions}
    return {}


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar:
        return str(action.metavar)
    if action.choices:
        return "|".join(str(c) for c in action.choices)
    return action.dest.upper()


def option_name(action: argparse.Action) -> str:
    """How an option is written in the manual: ``-o FILE``, ``--output FILE``, ``--history [N]``."""
    value = _value(action)
    if action.nargs == "?":
        value = f"[{value}]"
    if not action.option_strings:
        return f"{value} ..." if action.nargs in ("*", "+") else value
    names = ", ".join(action.option_strings)
    return f"{names} {value}" if value else names


def options(parser: argparse.ArgumentParser, skip_group: str = SELECTORS) -> List[argparse.Action]:
    """A parser's own options and arguments (not --help, not the selectors, not the repeated -v/-q)."""
    skipped = {id(a) for g in parser._action_groups if g.title == skip_group for a in g._group_actions}
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and id(a) not in skipped
            and not (a.default is argparse.SUPPRESS and a.dest == "verbosity")]


def _help(action: argparse.Action) -> str:
    return (action.help or "") % {"default": action.default, "prog": "qrunner"}


def _terms(actions: Iterable[argparse.Action]) -> str:
    return "\n\n".join(f"@ `{option_name(a)}`\n{_help(a)}" for a in actions)


def _usage_word(action: argparse.Action) -> str:
    word = option_name(action).split(", ")[-1]
    if not action.option_strings:
        return f"[{word}]" if action.nargs in ("*", "?") else word
    return f"[{word}]"


def command_synopsis(name: str, command: argparse.ArgumentParser) -> str:
    words = [_usage_word(a) for a in options(command)]
    if any(g.title == SELECTORS for g in command._action_groups):
        words.append("[SELECTORS]")
    return f"qrunner [GLOBAL OPTIONS] {name} " + " ".join(words)


def _wrap_synopsis(name: str, command: argparse.ArgumentParser) -> str:
    """A command's synopsis in lines of at most 78 characters, never breaking inside one [option VALUE]."""
    words = command_synopsis(name, command).replace("[GLOBAL OPTIONS]", "[GLOBAL\u00a0OPTIONS]")
    words = re.sub(r"\[[^]]*\]", lambda m: m.group(0).replace(" ", "\u00a0"), words)
    lines = textwrap.wrap(words, 78, subsequent_indent="        ", break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines).replace("\u00a0", " ")


def gen_synopsis(parser: argparse.ArgumentParser) -> str:
    return "\n".join("```\n" + _wrap_synopsis(n, c) + "\n```" for n, c in _subcommands(parser).items())


def gen_global_options(parser: argparse.ArgumentParser) -> str:
    return _terms(options(parser))


def gen_command(parser: argparse.ArgumentParser, name: str) -> str:
    command = _subcommands(parser)[name]
    text = [f"## qrunner {name}", command.description or _summaries(parser)[name]]
    own = [a for a in options(command) if a.dest != "verbosity"]
    if own:
        text.append(_terms(own))
    if any(g.title == SELECTORS for g in command._action_groups):
        text.append("The selectors (SELECTING MESSAGES below) narrow it.")
    return "\n\n".join(text)


def gen_selectors(parser: argparse.ArgumentParser) -> str:
    group = next(g for g in _subcommands(parser)["status"]._action_groups if g.title == SELECTORS)
    return group.description[0].upper() + group.description[1:] + ".\n\n" + _terms(group._group_actions)


def gen_exit_status(_parser) -> str:
    return "\n\n".join(f"@ {code}\n{meaning}" for code, meaning in EXIT_STATUS)


# -- generated parts: the settings ---------------------------------------------------------------------

def _setting_entry(setting: Setting) -> str:
    kind = setting.kind.manual
    return (f"@ `{setting.name}`\nType: {kind}. Default: {setting.default_text}.\n\n  {setting.reason}")


def gen_settings(_parser) -> str:
    parts: List[str] = []
    for section, (heading, about) in SECTIONS.items():
        parts.append(f"## {heading}\n{about}")
        group = ""
        for setting in in_section(section):
            if setting.group != group:
                group = setting.group
                parts.append(f"**{group}.**")
            parts.append(_setting_entry(setting))
    return "\n\n".join(parts)


GENERATED: Dict[str, Callable[[argparse.ArgumentParser], str]] = {
    "synopsis": gen_synopsis,
    "global_options": gen_global_options,
    "selectors": gen_selectors,
    "exit_status": gen_exit_status,
    "settings": gen_settings,
}


def expand(markdown: str, parser: argparse.ArgumentParser) -> str:
    def one(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name.startswith("command "):
            return gen_command(parser, name.split(" ", 1)[1])
        if name.startswith("file "):  # a shipped file, shown whole (the example policy): never a stale copy
            with open(os.path.join(ROOT, name.split(" ", 1)[1])) as f:
                return "```\n" + f.read().rstrip("\n") + "\n```"
        return GENERATED[name](parser)

    return re.sub(r"^\{\{([\w .-]+)\}\}$", one, markdown, flags=re.M)


def page(file: str, parser: argparse.ArgumentParser) -> str:
    title, section, description, manual = PAGES[file]
    with open(os.path.join(HERE, file + ".md")) as f:
        markdown = expand(f.read(), parser)
    head = [".\\\" Generated by man/build.py from man/%s.md, qrunner's argparse definitions and settings table:" % file,
            ".\\\" edit those and run make man, never this file.",
            f'.TH {title} {section} "" "qrunner {__version__}" "{manual}"',
            ".SH NAME", f"{file.rsplit('.', 1)[0]} \\- {_escape(description)}"]
    return "\n".join(head + render(markdown)) + "\n"


# -- contrib/qrunner.toml -------------------------------------------------------------------------------

NOTE_COLUMN = 42


def _example_line(setting: Setting) -> List[str]:
    value = setting.default if setting.default is not None else setting.example
    line = f"# {setting.name} = {toml_value(value)}"
    notes = textwrap.wrap(setting.note, 120 - NOTE_COLUMN - 2, break_on_hyphens=False, break_long_words=False)
    if not notes:
        return [line]
    first = f"{line.ljust(NOTE_COLUMN - 1)} # {notes[0]}"
    return [first] + ["#".ljust(NOTE_COLUMN) + "# " + n for n in notes[1:]]


def _comment(text: str) -> List[str]:
    return ["# " + t for t in textwrap.wrap(text.replace("`", ""), 108, break_on_hyphens=False, break_long_words=False)]


def gen_toml_settings(section: str) -> str:
    lines: List[str] = []
    group = ""
    for setting in in_section(section):
        if section == "" and setting.group != group:
            group = setting.group
            if lines:
                lines.append("")
            if group:
                lines += _comment(f"{group}.")
        if setting.set_in_example:
            lines += _comment(setting.note[0].upper() + setting.note[1:] + ".")
            lines += [f"{setting.name} = {toml_value(setting.default)}", ""]
        else:
            lines += _example_line(setting)
    if section:
        lines = _comment(SECTIONS[section][1]) + [f"# [{section}]"] + lines
    return "\n".join(lines)


def example_config() -> str:
    with open(os.path.join(HERE, "qrunner.toml.in")) as f:
        template = f.read()
    return re.sub(r"^\{\{settings ?([\w.]*)\}\}$", lambda m: gen_toml_settings(m.group(1)), template, flags=re.M)


# -- main -----------------------------------------------------------------------------------------------

def build(output: str) -> List[str]:
    """Write every page and the example configuration under ``output`` (man/ and contrib/ as in the repository)."""
    parser = build_parser()
    written = []
    for file in PAGES:
        path = os.path.join(output, "man", file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(page(file, parser))
        written.append(path)
    path = os.path.join(output, CONTRIB_TOML)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(example_config())
    written.append(path)
    return written


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description="Write man/qrunner.8, man/qrunner.toml.5, man/qrunner-policy.7 "
                                                 "and contrib/qrunner.toml from their sources.")
    parser.add_argument("--output", default=ROOT, help="the directory to write into (default: the repository)")
    args = parser.parse_args(argv)
    for path in build(args.output):
        print(f"man/build.py: wrote {os.path.relpath(path, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
