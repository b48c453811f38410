"""Each MTA command qrunner runs, failing in turn, over the real Postfix and Exim (issue 14, point 1).

tests/test_faults_mta.py has the kills, Postfix stopped in the middle of the sends, ``postsuper`` failing for a
whole run and ``exim -Mf`` failing; here each other command fails as it can fail on a real host:

- a non-zero exit with nothing done (an error the command prints, e.g. a full spool);
- a half-applied batch: the command does the first id of its batch, then fails;
- the binary missing (removed, e.g. by a package upgrade in the middle of a run) or not executable (its mode
  lost), at the moment qrunner is about to run that command: the file is removed or made 0644 right then, by the
  fault injector's ``exec`` (tests/faults/sitecustomize.py), so every command before it ran;
- Exim stopped in the middle of a run: every command after its first delivery batch fails;
- Postfix's flush service gone: its socket missing, or a socket nobody answers on.

Exim: qrunner runs ``exim -bP`` (the configuration, at start), ``-Mf`` (hold), ``-Mt`` (release), ``-Mc`` (send),
``-MG`` (hand back to Exim's own queue, for mail past max_queue_time) and ``-Mg`` (return to sender); it lists the
queue from the spool's ``-H`` files and removes nothing (Exim never copies a message). Postfix: ``postconf``,
``postfix status``, ``postqueue -j`` (the listing), ``postsuper -h/-H/-d/-f`` and the flush service (its socket,
``postqueue -i`` when the socket fails). ``postcat -hq`` and ``exim -Mvh`` run only when a queue file vanished
while the policy reads its headers: the policy then reads no headers (tests/test_policy_headers.py).

Each case: the faulted command ends with one sentence naming the command on stderr and a documented exit code (69
when the run had to stop, 1 when it went on and says which sends failed), never a traceback; once the fault is
healed, the next normal run leaves every message as the policy says, judged from ``postqueue -j`` / ``exim -bp``,
the sinks and ``qrunner status`` (qrunner's records as the admin reads them): delivered once, or on hold with
qrunner's record.
"""

from __future__ import annotations

import os
import time
import socket
import subprocess
import textwrap

import pytest

from fault_harness import SENT
from mta_harness import HELD as IN_HOLD, WAITING
from test_faults_mta import (EXIM_SUBJECTS, SUBJECTS, ex, judge_real, looks_work, pf,  # noqa: F401
                             queue_scenario, recover_and_judge)
from test_senders import sinks  # noqa: F401  (the fixture: one sink per Exim sender's transport)

pytestmark = pytest.mark.reliability

# The error a failing command prints: what Exim and Postfix say when their spool or queue is out of space.
EXIM_ERROR = "exim: failed to write spool file: No space left on device"
POSTFIX_ERROR = "fatal: queue file write error: No space left on device"


def failing_command(path, real: str, flag: str, mode: str, error: str = EXIM_ERROR) -> str:
    """``path``: ``real`` (Exim's binary, or one of Postfix's commands) with its ``flag`` failing as ``mode`` says.

    ``exit``: every call with ``flag`` prints an error and exits 1, doing nothing. ``half``: a call with ``flag``
    and two ids or more does the first id, then prints the error and exits 1 (ids on the command line, after the
    flag and, for ``-MG``, its queue name; or for ``postsuper FLAG -``, on stdin); ``postqueue -j`` prints its
    first message, then fails. ``stops``: after the first call
    with ``flag`` has ended, every call (any flag) fails: the MTA stopped working. ``pass``: every call goes
    through (the case removes the file or takes its mode away later). Any other call goes to ``real``.
    """
    path.write_text(textwrap.dedent(f"""\
        #!/usr/bin/python3
        import os, subprocess, sys
        real, flag, mode, error = {real!r}, {flag!r}, {mode!r}, {error!r}
        stopped = {str(path) + '.stopped'!r}
        args = sys.argv[1:]
        def fail():
            sys.stdout.flush()
            sys.stderr.write(error + "\\n")
            sys.exit(1)
        if os.path.exists(stopped):
            fail()
        if flag in args and mode == "exit":
            fail()
        if flag in args and mode == "half" and flag == "-j":  # a listing that stops after its first message
            listing = subprocess.run([real] + args, stdout=subprocess.PIPE).stdout
            sys.stdout.buffer.write(listing.split(b"\\n")[0] + b"\\n")
            fail()
        if flag in args and mode == "half":
            cut = args.index(flag) + 1 + (flag == "-MG")
            if args[cut:] == ["-"]:
                ids = sys.stdin.read().split()
                code = subprocess.run([real] + args, input="".join(i + "\\n" for i in ids[:1]), text=True).returncode
                if len(ids) > 1:
                    fail()
                sys.exit(code)
            if len(args) - cut > 1:
                subprocess.run([real] + args[:cut + 1])
                fail()
        if flag in args and mode == "stops":
            code = subprocess.run([real] + args).returncode
            open(stopped, "w").close()
            sys.exit(code)
        os.execv(real, [real] + args)
        """))
    path.chmod(0o755)
    return str(path)


def take_away(path: str, how: str) -> list:
    """The command that makes ``path`` missing or not executable, as ``exec`` runs it at the step."""
    return ["rm", "-f", path] if how == "missing" else ["chmod", "0644", path]


# -- Exim ------------------------------------------------------------------------------------------------------------

EXIM = "qrunner.mta.exim:EximBackend"
# flag -> the back-end method that runs it (where the binary goes missing or loses its mode)
EXIM_STEPS = {"-Mt": f"{EXIM}.release", "-Mc": f"{EXIM}._start"}
EXIM_CASES = [("-bP", "exit"), ("-Mt", "exit"), ("-Mt", "half"), ("-Mt", "missing"), ("-Mt", "not executable"),
              ("-Mc", "exit"), ("-Mc", "half"), ("-Mc", "missing"), ("-Mc", "not executable"),
              ("-Mc", "half, two batches at once"), ("every command", "Exim stopped after its first delivery")]


def use_binary(qr, real: str, binary: str, extra: str = "") -> str:
    """The configuration with [exim] binary = ``binary`` (and ``extra`` settings); the old text, to heal with."""
    config = qr.config_path.read_text()
    qr.config_path.write_text(config.replace(f'binary = "{real}"\n', f'binary = "{binary}"\n{extra}'))
    return config


@pytest.mark.parametrize("flag,mode", EXIM_CASES, ids=[f"{f} {m}" for f, m in EXIM_CASES])
def test_exim_command_failing_loses_nothing(ex, figures, tmp_path, flag, mode):  # noqa: F811
    mta, qr, sinks_by_fate = ex
    ids = queue_scenario(mta, qr)  # later one/two frozen (now allowed: thawed, -Mt), the rest waiting (-Mc)
    ids["night p70"] = mta.queue_message("night p70")
    real = mta.instance.binary
    extra = "overlap_priorities = true\ndispatch_concurrency = 2\n" if "at once" in mode else ""
    wrapper = tmp_path / "exim"
    how = {"exit": "exit", "missing": "pass", "not executable": "pass"}.get(mode, "stops" if "stopped" in mode
                                                                          else "half")
    failing_command(wrapper, real, "-Mc" if "stopped" in mode else flag, how)
    config = use_binary(qr, real, str(wrapper), extra)

    if mode in ("missing", "not executable"):
        result = qr.faulted([{"target": EXIM_STEPS[flag], "do": "exec", "command": take_away(str(wrapper), mode)}])
    else:
        result = qr("run")

    assert "Traceback" not in result.stderr, result.stderr
    if flag == "-Mc" and mode in ("exit", "half", "half, two batches at once") or "stopped" in mode:
        # exim -Mc failing is a send that failed, said per message; the run goes on with the others
        assert result.code == 1, f"exit {result.code}:\n{result.stderr}"
        assert f"failed: exim -Mc exited 1: {EXIM_ERROR}" in result.stderr, result.stderr
    else:
        assert result.code == 69, f"exit {result.code}:\n{result.stderr}"
        if flag == "-bP":  # at start, before anything is touched
            assert f"Exim cannot read its configuration ({EXIM_ERROR}); check [exim] binary and config." \
                in result.stderr, result.stderr
        elif mode == "missing":
            assert f"cannot run {wrapper}: No such file or directory; check [exim] binary." in result.stderr
        elif mode == "not executable":
            assert f"cannot run {wrapper}: Permission denied; check [exim] binary." in result.stderr
        else:
            changed = "1 of 2" if mode == "half" else "0 of 2"
            assert f"exim -Mt failed ({EXIM_ERROR}); {changed} messages were changed before it stopped." \
                in result.stderr, result.stderr
    later = [ids["later one"], ids["later two"]]
    if flag == "-Mt" and mode == "half":  # the first thawed, the second still frozen, as exim -bp shows them
        assert sorted(mta.where(i) for i in later) == [IN_HOLD, WAITING], mta.snapshot()
    if flag == "-Mc" and "half" in mode:  # the batch of two: its first delivered, the other still queued
        arrived = [m.header("Subject").decode() for m in sinks_by_fate[SENT].messages]
        assert sorted(s for s in arrived if s.startswith("later")) in (["later one"], ["later two"]), arrived
        assert [mta.where(i) for i in later].count(WAITING) == 1, mta.snapshot()
    qr.config_path.write_text(config)
    looks_work(qr, ids["hold this"], f"exim {flag} {mode}")
    recover_and_judge(mta, qr, ids, EXIM_SUBJECTS, sinks_by_fate, figures,
                      "Exim: each exim command failing (exit 1, half-applied, missing, not executable, "
                      "Exim stopped)", f"{flag} {mode}")


@pytest.mark.parametrize("mode", ["exit", "half"])
def test_exim_hand_back_failing_loses_nothing(ex, figures, tmp_path, mode):  # noqa: F811
    """``exim -MG`` (mail past max_queue_time handed to Exim's default queue) failing: said, stopped, done next run."""
    mta, qr, sinks_by_fate = ex
    qr.set_script("function CheckFile(f, a) return a end\n")
    old = [mta.queue_message(subject) for subject in ("old one", "old two")]
    time.sleep(2.1)  # both older than max_queue_time = 1 s, counted in whole seconds of arrival
    real = mta.instance.binary
    config = use_binary(qr, real, failing_command(tmp_path / "exim", real, "-MG", mode), "max_queue_time = 1\n")

    result = qr("run")

    assert result.code == 69 and "Traceback" not in result.stderr, f"exit {result.code}:\n{result.stderr}"
    changed = "1 of 2" if mode == "half" else "0 of 2"
    assert f"exim -MG failed ({EXIM_ERROR}); {changed} messages were changed before it stopped." in result.stderr, \
        result.stderr
    assert len(mta.instance.queue_ids()) == (1 if mode == "half" else 2)  # exim -bp of qrunner's queue
    qr.config_path.write_text(config.replace("[exim]\n", "[exim]\nmax_queue_time = 1\n"))
    looks_work(qr, old[0], f"exim -MG {mode}")

    again = qr("run")

    assert again.code == 0 and "Traceback" not in again.stderr, again.stderr
    default_queue = {m["id"]: m["frozen"] for m in mta.instance.queue("")}  # exim -bp of Exim's default queue
    problems = [f"{i}: not in Exim's default queue, waiting ({default_queue.get(i, 'missing')})" for i in old
                if default_queue.get(i) is not False]
    problems += [f"{i}: still in qrunner's queue" for i in mta.instance.queue_ids() if i in old]
    problems += [f"{m.header('Subject')}: delivered by qrunner" for s in sinks_by_fate.values() for m in s.messages]
    figures.record("faults", "Exim: exim -MG (hand back past max_queue_time) failing (exit 1, half-applied)",
                   tried=1, survived=int(not problems), lost=sum("missing" in p for p in problems))
    assert not problems, problems


# -- Postfix ---------------------------------------------------------------------------------------------------------

POSTFIX = "qrunner.mta.postfix:PostfixBackend"


def postfix_error(command: str) -> str:
    return f"{command}: {POSTFIX_ERROR}"


def command_directory(tmp_path, command: str, flag: str, mode: str) -> str:
    """Postfix's commands linked into a directory of their own, ``command`` failing there as ``mode`` says."""
    directory = tmp_path / "sbin"
    directory.mkdir()
    for name in os.listdir("/usr/sbin"):
        if name.startswith("post") and name != command:
            os.symlink(os.path.join("/usr/sbin", name), directory / name)
    failing_command(directory / command, f"/usr/sbin/{command}", flag, mode, postfix_error(command))
    return str(directory)


def use_command_directory(qr, directory: str) -> str:
    """The configuration with [postfix] command_directory = ``directory``; the old text, to heal with."""
    config = qr.config_path.read_text()
    qr.config_path.write_text(config.replace("[postfix]\n", f'[postfix]\ncommand_directory = "{directory}"\n'))
    return config


def test_postfix_listing_failing_changes_nothing_and_loses_nothing(pf, figures, tmp_path):  # noqa: F811
    """``postqueue -j`` failing (exit 1, stopping after its first message, missing, not executable): nothing done.

    A listing cut short must not pass for a queue that lost messages (their holds' records would be forgotten):
    each faulted run stops before any change, the queue as ``postqueue -j`` shows it exactly as before; the four
    are run one after another on one queue, and the run after them is judged.
    """
    mta, qr = pf
    ids = queue_scenario(mta, qr)
    before = mta.snapshot()
    postqueue = os.path.join(command_directory(tmp_path, "postqueue", "-j", "pass"), "postqueue")
    config = use_command_directory(qr, os.path.dirname(postqueue))
    said = {"exit": f"postqueue -j failed: {postfix_error('postqueue')}; is Postfix running?",
            "half": f"postqueue -j failed: {postfix_error('postqueue')}; is Postfix running?",
            "missing": f"cannot run {postqueue}: No such file or directory; is Postfix installed whole?",
            "not executable": f"cannot run {postqueue}: Permission denied; is Postfix installed whole?"}
    for mode, sentence in said.items():
        if mode in ("exit", "half"):
            failing_command(tmp_path / "sbin" / "postqueue", "/usr/sbin/postqueue", "-j", mode,
                            postfix_error("postqueue"))
        else:
            failing_command(tmp_path / "sbin" / "postqueue", "/usr/sbin/postqueue", "-j", "pass")
            subprocess.run(take_away(postqueue, mode), check=True)

        result = qr("run")

        assert result.code == 69 and "Traceback" not in result.stderr, f"{mode}: exit {result.code}:\n{result.stderr}"
        assert sentence in result.stderr, f"{mode}: {result.stderr}"
        assert mta.snapshot() == before, f"{mode}: the queue changed"
    qr.config_path.write_text(config)
    looks_work(qr, ids["hold this"], "postqueue -j failing")
    again = qr("run")
    assert again.code == 0 and "Traceback" not in again.stderr, again.stderr
    problems = judge_real(mta, qr, ids, SUBJECTS, {SENT: mta.sink})
    figures.record("faults", "Postfix: postqueue -j failing (exit 1, cut short, missing, not executable)",
                   tried=len(said), survived=len(said) * int(not problems),
                   lost=sum("never" in p for p in problems), duplicates=sum("times" in p for p in problems))
    assert not problems, problems


POSTSUPER_RELEASE = ["half", "missing", "not executable"]


@pytest.mark.parametrize("mode", POSTSUPER_RELEASE)
def test_postfix_release_failing_loses_nothing(pf, figures, tmp_path, mode):  # noqa: F811
    """``postsuper -H`` (the release of the holds the policy now allows) failing in the middle of the run."""
    mta, qr = pf
    ids = queue_scenario(mta, qr)  # later one/two held (now allowed: released, then scheduled), p90/p80 waiting
    directory = command_directory(tmp_path, "postsuper", "-H", "half" if mode == "half" else "pass")
    config = use_command_directory(qr, directory)
    postsuper = os.path.join(directory, "postsuper")

    if mode == "half":
        result = qr("run")
    else:
        result = qr.faulted([{"target": f"{POSTFIX}.release", "do": "exec", "command": take_away(postsuper, mode)}])

    assert result.code == 69 and "Traceback" not in result.stderr, f"exit {result.code}:\n{result.stderr}"
    if mode == "half":
        assert f"postsuper -H failed ({postfix_error('postsuper')}); 1 of 2 messages were changed before it " \
               "stopped." in result.stderr, result.stderr
        assert sorted(mta.where(ids[s]) for s in ("later one", "later two")) == [IN_HOLD, WAITING], mta.snapshot()
    else:
        why = "No such file or directory" if mode == "missing" else "Permission denied"
        assert f"cannot run {postsuper}: {why}; is Postfix installed whole?" in result.stderr, result.stderr
    qr.config_path.write_text(config)
    looks_work(qr, ids["hold this"], f"postsuper -H {mode}")
    recover_and_judge(mta, qr, ids, SUBJECTS, {SENT: mta.sink}, figures,
                      "Postfix: postsuper -H failing (half-applied, missing, not executable)", f"-H {mode}")


@pytest.mark.parametrize("how", ["missing", "refusing connections"])
def test_postfix_flush_service_gone_loses_nothing(pf, figures, how):  # noqa: F811
    """The flush service's socket (public/flush) missing, or nobody answering on it: nothing is scheduled.

    qrunner asks the flush service to deliver each message of the default route; its fallback, ``postqueue -i``,
    needs the same service. Each such send fails, said per message (exit 1); the next run, with the service
    back, delivers them.
    """
    mta, qr = pf
    ids = queue_scenario(mta, qr)
    flush = os.path.join(mta.instance.queue_directory, "public", "flush")
    os.rename(flush, flush + ".aside")
    try:
        if how != "missing":
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(flush)
            dead.close()  # the socket file stays, nobody listens: ECONNREFUSED

        result = qr("run")

    finally:
        if os.path.exists(flush):
            os.unlink(flush)
        os.rename(flush + ".aside", flush)
    assert result.code == 1 and "Traceback" not in result.stderr, f"exit {result.code}:\n{result.stderr}"
    for subject in ("send p90", "send p80"):
        assert f"{ids[subject]}: action=send sender=default failed: Postfix's flush service did not take the " \
               "delivery request" in result.stderr, result.stderr
    assert mta.sink.messages == []
    looks_work(qr, ids["hold this"], f"the flush service {how}")
    recover_and_judge(mta, qr, ids, SUBJECTS, {SENT: mta.sink}, figures,
                      "Postfix: the flush service gone (socket missing, refusing)", how)
