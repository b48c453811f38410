"""Queue ids crafted to look like options or paths never reach a command line or a path (issue 14, point 2).

Each entry point where an id comes in gets ids such as ``-d``, ``--all``, ``../x``, ``ALL``, ``-``, ``A B`` and
``A<newline>B``: a Postfix queue file and an Exim ``-H`` file named so in the real queue, an entry of the memory model,
hold records in the state database, and the ids an admin types after ``release``, ``explain`` and ``flush`` (a snapshot
line's id is covered in test_cli_plan.py). The real MTAs' commands run through wrappers that log every argument and
every line of standard input (``postsuper -h -`` reads ids there) before they hand over to the real program: the log
is what the MTA was asked, and none of the crafted ids may appear in it. The crafted files stay as they were, the real
message beside them is handled, and no traceback is printed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess

import pytest

from memory_harness import MemoryHarness
from mta_harness import HELD, harness_for
from qrunner.mta.postfix_queuefile import is_queue_id
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, Qrunner

LONG = os.environ.get("QRUNNER_LONG") == "1"
CRAFTED = ["-d", "--all", "../x", "ALL", "-", "A B", "A\nB", "-Mrm", "/etc/passwd"]
# Those that can be a file name in a queue directory (no "/"; "-" and "ALL" are names like any other).
FILE_NAMES = [c for c in CRAFTED if "/" not in c]

WRAPPER = """#!/bin/sh
# one line per call: ARGV and the arguments, NUL-separated
{{ printf 'ARGV'; for a in "$0" "$@"; do printf '\\0%s' "$a"; done; printf '\\n'; }} >> {log}
exec {real} "$@"
"""
# postsuper -h/-H/-d - reads the ids on standard input: each line logged as STDIN<NUL>line
STDIN_WRAPPER = """#!/bin/sh
{{ printf 'ARGV'; for a in "$0" "$@"; do printf '\\0%s' "$a"; done; printf '\\n'; }} >> {log}
while IFS= read -r line; do printf 'STDIN\\0%s\\n' "$line" >> {log}; printf '%s\\n' "$line"; done | {real} "$@"
"""


@pytest.fixture
def mta(request, tmp_path):
    return harness_for(request, tmp_path)


def _wrap(directory, name: str, real: str, log: str, stdin: bool = False) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write((STDIN_WRAPPER if stdin else WRAPPER).format(log=log, real=real))
    os.chmod(path, 0o755)
    return path


def wrapped_config(tmp_path, mta) -> str:
    """The harness's configuration with the MTA's commands replaced by logging wrappers; returns the log's path."""
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    log = str(tmp_path / "mta-commands.log")
    open(log, "w").close()
    if mta.name == "postfix":
        real_dir = mta.instance.postconf("command_directory")
        for name in ("postconf", "postqueue", "postcat", "postfix"):
            _wrap(wrappers, name, os.path.join(real_dir, name), log)
        _wrap(wrappers, "postsuper", os.path.join(real_dir, "postsuper"), log, stdin=True)
        mta.config = lambda: (f'mta = "postfix"\n[postfix]\nconfig_directory = "{mta.instance.config_directory}"\n'
                              f'command_directory = "{wrappers}"\n')
    else:
        real = mta.instance.binary
        exim = _wrap(wrappers, "exim4", real, log)
        dumpdb = os.path.join(os.path.dirname(real), "exim_dumpdb")
        if os.path.exists(dumpdb):
            _wrap(wrappers, "exim_dumpdb", dumpdb, log)
        i = mta.instance
        mta.config = lambda: (f'mta = "exim"\n[exim]\nbinary = "{exim}"\nconfig = "{i.config_path}"\n'
                              f'spool_directory = "{i.spool_directory}"\nqueue = "{i.queue_name}"\n')
    return log


def calls(log: str):
    """Each call the MTA's commands got: (argv, the standard-input lines that followed it)."""
    with open(log, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    out = []
    for line in text.split("\n"):
        kind, _sep, rest = line.partition("\0")
        if kind == "ARGV":
            out.append((rest.split("\0"), []))
        elif kind == "STDIN" and out:
            out[-1][1].append(rest)
    return out


def assert_never_asked(log: str, mta, crafted=CRAFTED):
    """No crafted id among the arguments or the standard input of any MTA command.

    qrunner's own ``postsuper FLAG -`` is the one place "-" and "-d" may appear (as the flag and its "ids on
    standard input"); the ids that follow there are checked one by one.
    """
    seen = calls(log)
    assert seen, "the wrappers logged nothing: the test did not watch the MTA's commands"
    for argv, stdin in seen:
        args = argv[1:]
        if os.path.basename(argv[0]) == "postsuper" and args[-1:] == ["-"]:
            args = args[:-2]
        for c in crafted:
            assert c not in args, f"{c!r} reached the MTA's command line: {argv}"
            assert c not in stdin and not any(c in line for line in stdin if len(c) > 1), \
                f"{c!r} reached {argv[0]}'s standard input: {stdin}"
        if mta.name == "postfix":
            assert all(is_queue_id(line) for line in stdin), stdin


def assert_clean(result):
    assert "Traceback" not in result.stderr, result.stderr
    assert result.code in (0, 1, 64), result.stderr


# -- names in the MTA's own queue ------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("mta", ["postfix", "exim"], indirect=True)
def test_queue_files_named_like_options_or_paths_are_never_acted_on(tmp_path, figures, mta):
    log = wrapped_config(tmp_path, mta)
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    real = mta.queue_message("a real one")
    if mta.name == "postfix":
        source = mta.filename(real)
        directories = [os.path.dirname(source), os.path.join(mta.instance.queue_directory, "hold")]
        # "-" breaks Postfix's own listing (showq: "malformed showq server response"): tried on its own below
        names = [n for n in FILE_NAMES if n != "-"]
    else:
        source = mta.instance.header_path(real)
        directories = [os.path.dirname(source)]
        names = [n + "-H" for n in FILE_NAMES]
    planted = [os.path.join(directory, name) for directory in directories for name in names]
    with open(source, "rb") as f:
        source = (f.read(), os.stat(source))
    try:
        for path in planted:
            plant(source, path)
        before = {p: open(p, "rb").read() for p in planted}

        for args in (["plan"], ["run"], ["status"], ["release", "--all"], ["run"]):
            assert_clean(qr(*args))

        assert {p: open(p, "rb").read() for p in planted if os.path.exists(p)} == before, "a planted file changed"
        assert all(os.path.exists(p) for p in planted), "a planted file was removed"
        assert mta.where(real) == HELD, "the real message beside them was not handled"
        if mta.name == "postfix":
            dash = os.path.join(directories[0], "-")
            planted.append(dash)
            plant(source, dash)
            result = qr("run")
            assert result.code == 69 and result.stderr == ("qrunner: postqueue -j failed: postqueue: fatal: malformed "
                                                           "showq server response; is Postfix running?\n")
    finally:
        for path in planted:
            if os.path.exists(path):
                os.remove(path)
    assert_never_asked(log, mta)
    figures.record("inputs", f"{mta.name} queue files named like options or paths", tried=len(planted),
                   survived=len(planted))


def plant(source, path: str) -> None:
    """A copy of the real file (``source``: its bytes and stat) under ``path``, owned and dated as the MTA's own."""
    data, st = source
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.reliability
@pytest.mark.parametrize("mta", ["postfix"], indirect=True)
def test_postqueue_lines_with_crafted_ids_are_said_and_passed_over(tmp_path, figures, mta):
    """Postfix's showq leaves such file names out; if a listing ever held one, qrunner's own check is the guard."""
    log = wrapped_config(tmp_path, mta)
    postqueue = tmp_path / "wrappers" / "postqueue"
    real = postqueue.read_text().splitlines()[-1].split()[1]  # the wrapper's "exec REAL ..."
    lines = "".join(json.dumps({"queue_name": "deferred", "queue_id": c, "arrival_time": 1, "message_size": 5,
                                "forced_expire": False, "sender": "x@example.org",
                                "recipients": [{"address": "y@example.net", "delay_reason": "gated"}]}) + "\n"
                    for c in CRAFTED)
    (tmp_path / "extra.jsonl").write_text(lines)
    postqueue.write_text(postqueue.read_text().replace(
        f'exec {real} "$@"', f'{real} "$@"; status=$?; [ "$*" = "${{*%-j}}" ] || cat {tmp_path / "extra.jsonl"}; '
                             'exit $status'))
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("a real one")

    result = qr("run")

    assert_clean(result)
    assert result.code == 0, result.stderr
    assert mta.where(queue_id) == HELD
    assert result.stderr.count("is not a Postfix queue id, skipped") == len(CRAFTED)
    assert_never_asked(log, mta)
    assert not any(c in mta.instance.flush_requests() for c in CRAFTED)
    figures.record("inputs", "postqueue -j lines with ids like options or paths", tried=len(CRAFTED),
                   survived=len(CRAFTED))


@pytest.mark.reliability
def test_memory_entries_with_crafted_ids_are_said_and_passed_over(tmp_path, figures):
    mta = MemoryHarness(str(tmp_path / "memory-queue"))
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    real = mta.queue_message("a real one")
    with mta.queue.change() as queue:
        template = dict(queue["messages"][0])
        for crafted in CRAFTED:
            queue["messages"].append(dict(template, id=crafted))
    outside = tmp_path / "x"
    outside.write_bytes(b"Subject: outside the queue\n\n")

    result = qr("run")

    assert_clean(result)
    assert result.code == 0
    assert [m.header("Subject") for m in mta.sink.wait_for(1)] == [b"a real one"]
    for crafted in CRAFTED:
        assert f"memory queue entry {crafted!r} is not a memory queue id, skipped" in result.stderr
    assert sorted(m["id"] for m in mta.queue.read()["messages"]) == sorted(CRAFTED)
    assert real not in mta.snapshot()
    figures.record("inputs", "memory queue entries with ids like options or paths", tried=len(CRAFTED),
                   survived=len(CRAFTED))


# -- records in the state database -------------------------------------------------------------


def plant_hold_records(state_dir: str, ids) -> None:
    """Hold records for ``ids`` beside the one the real run made, as a damaged or hostile database would hold them."""
    db = sqlite3.connect(os.path.join(state_dir, "qrunner.sqlite"))
    with db:
        [(instance, arrival, held_at)] = db.execute("SELECT instance, arrival, held_at FROM holds").fetchall()
        for crafted in ids:
            db.execute("INSERT INTO holds (instance, queue_id, arrival, state, held_at, senders, reason) "
                       "VALUES (?, ?, ?, 'held', ?, 'default', 'planted')", (instance, crafted, arrival, held_at))
        # and one that is not even UTF-8
        db.execute("INSERT INTO holds (instance, queue_id, arrival, state, held_at, senders, reason) "
                   "VALUES (?, CAST(X'41FF42' AS TEXT), ?, 'held', ?, 'default', 'planted')",
                   (instance, arrival, held_at))
    db.close()


@pytest.mark.reliability
@pytest.mark.parametrize("mta", ["memory", "postfix", "exim"], indirect=True)
def test_hold_records_with_crafted_ids_never_reach_the_mta(tmp_path, figures, mta, monkeypatch):
    """Also under a strict UTF-8 locale, where a print of text that was not UTF-8 would raise."""
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    log = wrapped_config(tmp_path, mta) if mta.name != "memory" else None
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    real = mta.queue_message("a real one")
    assert qr("run").code == 0
    plant_hold_records(qr.state_dir, CRAFTED)

    status = qr("status")
    assert_clean(status)
    assert status.code == 0
    rows = [line.split()[0] for line in status.stdout.splitlines() if "planted" in line]
    assert sorted(rows) == sorted(["-d", "--all", "../x", "ALL", "-", "A", "A\\nB", "-Mrm", "/etc/passwd", "A\\xffB"])
    for args in (["status", "--format", "json"], ["plan"], ["run", "--dry-run"], ["explain", real]):
        result = qr(*args)
        assert_clean(result)
        assert all(line.startswith(("qrunner[", "qrunner:")) for line in result.stderr.splitlines()), result.stderr
    run = qr("run")
    assert_clean(run)
    assert "whose message id is not UTF-8 (b'A\\xffB') was removed" in run.stderr
    assert "A\\nB: qrunner's hold record dropped" in run.stderr  # one line, the newline shown as \n
    assert all(line.startswith("qrunner[") for line in run.stderr.splitlines()), run.stderr
    for args in (["release", "--all"], ["status"]):
        result = qr(*args)
        assert_clean(result)
    assert "planted" not in qr("status").stdout

    assert mta.where(real) != HELD, "release --all left the real hold"
    if log is not None:
        assert_never_asked(log, mta)
    figures.record("inputs", f"hold records with ids like options or paths ({mta.name})", tried=len(CRAFTED) + 1,
                   survived=len(CRAFTED) + 1)


# -- ids an admin types ---------------------------------------------------------------------------


@pytest.mark.reliability
@pytest.mark.parametrize("mta", ["memory", "postfix", "exim"], indirect=True)
def test_crafted_ids_on_the_command_line_are_refused_before_the_mta_sees_them(tmp_path, figures, mta, monkeypatch):
    """Also an id that is not UTF-8, under a strict UTF-8 locale: one sentence showing the byte as typed."""
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    log = wrapped_config(tmp_path, mta) if mta.name != "memory" else None
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    real = mta.queue_message("a real one")
    assert qr("run").code == 0
    tried = 0
    not_utf8 = "AB\udcffCD"  # the argument b"AB\xffCD", as Python holds it
    commands = ("release", "explain", "flush")
    pairs = [(command, crafted) for command in commands for crafted in CRAFTED + [not_utf8]]
    if not LONG:  # each id through one of the commands, in turn: a qrunner process each
        pairs = [(commands[n % 3], crafted) for n, crafted in enumerate(CRAFTED + [not_utf8])]
    for command, crafted in pairs:
        result = qr(command, "--", crafted) if crafted.startswith("-") else qr(command, crafted)
        assert_clean(result)
        assert result.code == 64, (command, crafted, result.stderr)
        assert result.stdout == ""
        [sentence] = result.stderr.splitlines() or [""]
        assert sentence.startswith("qrunner: ") and "is not" in sentence, result.stderr
        if crafted == not_utf8:
            assert sentence.startswith("qrunner: 'AB\\xffCD' is not "), sentence
        tried += 1
    assert mta.where(real) == HELD
    if log is not None:
        assert_never_asked(log, mta)
    figures.record("inputs", f"release/explain/flush ids like options or paths ({mta.name})", tried=tried,
                   survived=tried)


def test_the_wrappers_do_see_what_the_mta_is_asked(tmp_path):
    """The checks above can fail: what a command is given shows up in the log, arguments and standard input."""
    log = str(tmp_path / "log")
    open(log, "w").close()
    wrapper = _wrap(str(tmp_path), "postsuper", "sh -c 'cat > /dev/null' sh", log, stdin=True)
    subprocess.run([wrapper, "-d", "--all", "A B"], input=b"ABCDEF123\n../x\n", stdout=subprocess.DEVNULL, check=True)
    assert calls(log) == [([wrapper, "-d", "--all", "A B"], ["ABCDEF123", "../x"])]
    with pytest.raises(AssertionError):
        assert_never_asked(log, type("M", (), {"name": "postfix"}))
