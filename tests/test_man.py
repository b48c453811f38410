"""The manual pages: one source of truth, every command, option and setting in them, and clean roff.

``make man`` (man/build.py) writes qrunner(8), qrunner.toml(5), qrunner-policy(7) and
contrib/qrunner.toml from qrunner's argparse definitions, its settings table (the one the loader
reads), its exit codes and the prose in man/*.md. These tests read the pages as an admin does, through
``man -l`` (and groff with every warning on), and hold them to the code: a command, option, setting,
exit code or environment variable the code has and the manual lacks fails here, and so does a page
that was edited by hand or not regenerated.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import os
import re
import shutil
import subprocess
import sys

import pytest

from qrunner import exceptions
from qrunner.cli import build_parser
from qrunner.config import Config, EximSettings, MemorySettings, PostfixSettings, load_config
from qrunner.settings import SECTIONS, SETTINGS, in_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("qrunner.8", "qrunner.toml.5", "qrunner-policy.7")
GENERATED = [os.path.join("man", page) for page in PAGES] + [os.path.join("contrib", "qrunner.toml")]


def need(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        pytest.fail(f"{tool} is not installed: make install-test-deps installs man-db and groff-base", pytrace=False)
    return found


def read_page(page: str) -> str:
    """The page as ``man -l`` shows it, wide, without hyphenation or justification, words single-spaced."""
    need("man")
    shown = subprocess.run(["man", "--nh", "--nj", "-l", os.path.join(ROOT, "man", page)], capture_output=True,
                           text=True, env=dict(os.environ, MANWIDTH="250", LC_ALL="C.UTF-8"), check=True).stdout
    return re.sub(r"(?<=\S)[ \t]+", " ", shown)


def section(text: str, heading: str) -> str:
    """One .SH section of a page as shown: from its heading to the next one."""
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^[A-Z][A-Z ]+\n|\Z)", text, re.M | re.S)
    assert match, f"no {heading} section"
    return match.group(1)


def test_the_committed_pages_and_example_config_are_what_make_man_writes(tmp_path):
    built = subprocess.run([sys.executable, os.path.join(ROOT, "man", "build.py"), "--output", str(tmp_path)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    for path in GENERATED:
        assert filecmp.cmp(tmp_path / path, os.path.join(ROOT, path), shallow=False), \
            f"{path} differs from what make man writes: edit its source (man/*.md, qrunner/settings.py, cli.py) " \
            "and run make man"


@pytest.mark.parametrize("page", PAGES)
def test_groff_and_man_find_no_problem_in_the_page(page):
    path = os.path.join(ROOT, "man", page)
    groff = subprocess.run([need("groff"), "-man", "-Tutf8", "-ww", "-z", path], capture_output=True, text=True)
    assert (groff.returncode, groff.stderr) == (0, "")
    checked = subprocess.run([need("man"), "--warnings", "-l", path], capture_output=True, text=True,
                             env=dict(os.environ, MANWIDTH="80"))
    assert (checked.returncode, checked.stderr) == (0, "")
    assert len(checked.stdout.splitlines()) > 50


def _commands(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    return [(name, command, helps.get(name)) for name, command in action.choices.items()]


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_command_and_option_has_help_text():
    parser = build_parser()
    for action in _options(parser):
        assert action.help and action.help.strip(), action.option_strings
    for name, command, summary in _commands(parser):
        assert summary and command.description, name
        for action in _options(command):
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)


def test_every_command_and_option_is_in_qrunner_8_and_only_those():
    text = read_page("qrunner.8")
    commands = section(text, "COMMANDS")
    parser = build_parser()
    documented = re.findall(r"^ {3}qrunner (\w+)$", commands, re.M)
    assert sorted(documented) == sorted(name for name, _c, _s in _commands(parser))
    assert set(documented) == {"plan", "check", "run", "flush", "release", "status", "explain", "snapshot"}
    for option in _options(parser):
        for name in option.option_strings:
            assert re.search(rf"^ {{7}}(-\w, )?{re.escape(name)}\b", section(text, "GLOBAL OPTIONS"), re.M), name
    for name, command, _summary in _commands(parser):
        block = commands.split(f"   qrunner {name}\n", 1)[1].split("\n   qrunner ", 1)[0]
        for option in _options(command):
            where = section(text, "SELECTING MESSAGES") if option.dest.startswith("select_") else block
            if option.dest == "verbosity":
                where = section(text, "GLOBAL OPTIONS")
            for flag in option.option_strings or [option.metavar]:
                assert re.search(rf"^ {{7}}(-\w, )?{re.escape(flag)}\b", where, re.M), (name, flag)
        assert f"qrunner [GLOBAL OPTIONS] {name} " in section(text, "SYNOPSIS")


def test_every_exit_code_is_in_qrunner_8():
    codes = section(read_page("qrunner.8"), "EXIT STATUS")
    constants = {value for name, value in vars(exceptions).items() if name.startswith("EX_")}
    raised = {cls.exit_code for cls in vars(exceptions).values()
              if isinstance(cls, type) and issubclass(cls, exceptions.QrunnerError)}
    listed = {code for code, _meaning in exceptions.EXIT_STATUS}
    assert constants | raised == listed
    for code, meaning in exceptions.EXIT_STATUS:
        assert re.search(rf"^ {{7}}{code} +{re.escape(meaning.split()[0])}", codes, re.M), code


def test_every_environment_variable_qrunner_reads_is_in_qrunner_8():
    environment = section(read_page("qrunner.8"), "ENVIRONMENT")
    read = set()
    for top, _dirs, names in os.walk(os.path.join(ROOT, "qrunner")):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(top, name)) as f:
                    source = f.read()
                for quoted, constant in re.findall(r'environ\.get\((?:"(\w+)"|(\w+))', source):
                    if constant:
                        quoted = re.search(rf'^{constant} = "(\w+)"', source, re.M).group(1)
                    read.add(quoted)
    assert {"QRUNNER_CONFIG", "SUDO_USER", "JOURNAL_STREAM", "INVOCATION_ID"} <= read
    for variable in read | {"TZ", "PATH"}:
        assert re.search(rf"^ {{7}}{variable}(\s|$)", environment, re.M), variable


def test_the_log_lines_in_qrunner_8_have_the_pinned_format():
    from test_log_format import GOLDEN

    def shape(line: str):
        """The action and the names of its fields, in order: what admins' scripts parse."""
        action, rest = re.match(r"qrunner\[\w+\]: \S+: action=(\w+)(.*)", line).groups()
        return action, tuple(re.findall(r" (\w+)=", rest.split(' reason="')[0])), ' reason="' in rest

    logging = section(read_page("qrunner.8"), "LOGGING")
    shown = [line.strip() for line in logging.splitlines() if re.match(r"\s+qrunner\[\d+\]: \S+: action=", line)]
    pinned = {shape(line) for line in GOLDEN.splitlines() if ": action=" in line}
    assert len(shown) >= 10
    for line in shown:
        assert shape(line) in pinned, line


def test_every_setting_has_a_type_a_default_and_a_reason_in_qrunner_toml_5():
    text = read_page("qrunner.toml.5")
    settings = section(text, "SETTINGS")
    for heading in (h for h, _about in SECTIONS.values()):
        assert re.search(rf"^ {{3}}{re.escape(heading)}$", settings, re.M), heading
    for setting in SETTINGS:
        assert setting.reason.strip() and setting.default_text.strip(), setting.key
        block = settings.split(f"   {SECTIONS[setting.section][0]}\n", 1)[1].split("\n   [", 1)[0]
        entry = re.search(rf"^ {{7}}{setting.name}(\n {{14}}| +)Type: (.*?)\. Default: (.*?)\.\n", block, re.M)
        assert entry, setting.key
        plain = lambda s: re.sub(r"[`*]", "", s)  # noqa: E731 - the mark-up man shows as fonts
        assert entry.group(3) == plain(setting.default_text), setting.key


def test_every_key_the_loader_accepts_is_a_documented_setting(tmp_path):
    """The loader's fields are the table's, and every setting of the table, set to its default, loads as it."""
    tables = {"postfix": PostfixSettings, "exim": EximSettings, "memory": MemorySettings}
    top = {f.name for f in dataclasses.fields(Config)} - set(tables) - {"senders", "path"}
    assert top == {s.name for s in in_section("")}
    for name, cls in tables.items():
        assert {f.name for f in dataclasses.fields(cls)} == {s.name for s in in_section(name)}, name
    from qrunner.config import _SENDER_KEYS
    assert set(_SENDER_KEYS) == {s.name for s in in_section("sender")} | {"postfix", "exim"}

    lines = []
    for name in ("", "postfix", "exim", "memory"):
        if name:
            lines.append(f"[{name}]")
        for setting in in_section(name):
            value = setting.default if setting.default is not None else setting.example
            assert value is not None, f"{setting.key}: neither a default nor an example for contrib/qrunner.toml"
            lines.append(f"{setting.name} = {value!r}".replace("True", "true").replace("False", "false"))
    path = tmp_path / "every.toml"
    path.write_text("\n".join(lines).replace("mta = 'auto'", "mta = 'memory'") + "\n")
    config = load_config(str(path))
    for setting in in_section(""):
        if setting.name != "mta":
            assert getattr(config, setting.name) == setting.default, setting.name
    assert config.exim == EximSettings(**{s.name: s.default if s.default is not None else s.example
                                          for s in in_section("exim")})


def test_the_readmes_worked_policy_does_what_the_readme_says(tmp_path):
    """The README's worked policy, planned over a snapshot at 10:00 and 20:00: big mail waits for the evening,
    newsletters (Precedence: bulk) go after everything else, invoices first."""
    import json

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    script = tmp_path / "worked.lua"
    script.write_text(re.search(r"```lua\n(.*?)```", readme, re.S).group(1))
    snapshot = tmp_path / "queue.jsonl"
    messages = [("BIG", 12500000, "carol@example.org", []), ("NEWS", 2000, "news@example.org", ["Precedence: bulk"]),
                ("INVOICE", 2000, "inv@billing.example.com", []), ("PLAIN", 2000, "dave@example.org", [])]
    snapshot.write_text("".join(json.dumps({
        "queue_name": "deferred", "queue_id": qid, "arrival_time": 1764057600 + n, "message_size": size,
        "sender": sender, "recipients": [{"address": "bob@example.net"}], "headers": headers}) + "\n"
        for n, (qid, size, sender, headers) in enumerate(messages)))

    def plan(now: str) -> list:
        shown = subprocess.run([sys.executable, "-m", "qrunner", "--config", "/dev/null", "plan", "--queue-file",
                                str(snapshot), "--script", str(script), "--now", now, "--format", "json"],
                               capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        assert shown.returncode == 0, shown.stderr
        return [(d["queue_id"], d["action"], d["priority"], d["reason"]) for d in json.loads(shown.stdout)["decisions"]]

    assert "over 10 MB: waits until 19:00" in readme
    day = plan("2026-11-25T10:00:00")
    assert [d[:3] for d in day[:3]] == [("INVOICE", "send", 90), ("PLAIN", "send", 50), ("NEWS", "send", 10)]
    assert day[3][:2] == ("BIG", "skip") and day[3][3] == "over 10 MB: waits until 19:00"
    evening = [d[:3] for d in plan("2026-11-25T20:00:00")]
    assert evening[-1] == ("NEWS", "send", 10) and ("BIG", "send", 50) in evening
