"""Each MTA command qrunner runs, failing in turn, over the real Postfix and Exim (issue 14, point 1).

tests/test_faults_mta.py has the kills, Postfix stopped in the middle of the sends, ``postsuper`` failing for a
whole run and ``exim -Mf`` failing; here each other command fails as it can fail on a real host:

- a non-zero exit with nothing done (an error the command prints, e.g. a full spool);
- a half-applied batch: the command does the first id of its batch, then fails;
- the binary missing (removed, e.g. by a package upgrade in the middle of a run) or not executable (its mode
  lost), at the moment qrunner is about to run that command: the file is removed or made 0644 right then, by the
  fault injector's ``exec`` (tests/faults/sitecustomize.py), so every command before it ran (both fail where
  qrunner starts the command, so each place that starts one gets one of the two);
- Exim stopped in the middle of a run: every command after its first delivery batch fails;
- Postfix's flush service gone: its socket missing, or a socket nobody answers on.

Exim: qrunner runs ``exim -bP`` (the configuration, at start), ``-Mf`` (hold), ``-Mt`` (release), ``-Mc`` (send),
``-MG`` (hand back to Exim's own queue, for mail past max_queue_time) and ``-Mg`` (return to sender); it lists the
queue from the spool's ``-H`` files and removes nothing (Exim never copies a message). Postfix: ``postconf``,
``postfix status``, ``postqueue -j`` (the listing), ``postsuper -h/-H/-d/-f`` and the flush service (its socket,
``postqueue -i`` when the socket fails). ``postcat -hq`` and ``exim -Mvh`` run only when a queue file vanished
while the policy reads its headers, and then fail with it (tests/test_hostile_queue_files.py, "vanished").

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
from collections import Counter

import pytest

from fault_harness import SENT, FaultyQrunner
from mta_harness import HELD as IN_HOLD, WAITING, harness_for
from qrunner_e2e import ALLOW_ALL, SKIP_ALL, queue_message, queue_state
from test_hold_age import configure
from test_faults_mta import (EXIM_SUBJECTS, SUBJECTS, ex, judge_real, looks_work, pf,  # noqa: F401
                             queue_scenario, recover_and_judge)
from test_senders import listener_ports, postfix_qrunner, relays, sinks  # noqa: F401  (fixtures: the routes)

pytestmark = pytest.mark.reliability

# The error a failing command prints: what Exim and Postfix say when their spool or queue is out of space.
EXIM_ERROR = "exim: failed to write spool file: No space left on device"
POSTFIX_ERROR = "fatal: queue file write error: No space left on device"


def failing_command(path, real: str, flag: str, mode: str, error: str = EXIM_ERROR) -> str:
    """``path``: ``real`` (Exim's binary, or one of Postfix's commands) with its ``flag`` failing as ``mode`` says.

    ``exit``: every call with ``flag`` prints an error and exits 1, doing nothing. ``half``: a call with ``flag``
    and two ids or more does the first id, then prints the error and exits 1 (ids on the command line, after the
    flag and, for ``-MG``, its queue name; or for ``postsuper FLAG -``, on stdin); ``-Mf``/``-Mt`` with one id per
    call (the batch split over processes running at once): the first call goes through, every later one fails;
    ``postqueue -j`` prints its
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
            if flag in ("-Mf", "-Mt"):  # one id per call (qrunner runs its batch in several processes at once):
                try:                    # the first call goes through, every later one fails
                    os.close(os.open({str(path) + '.first'!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
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
# A missing binary and a non-executable one fail at the same place (the OSError of starting it): each of the two
# places that start exim (_exim for -bP/-Mf/-Mt/-MG/-Mg, _start for -Mc) gets one of them, to keep the real-MTA
# cases few; -Mf's exit 1 is tests/test_faults_mta.py's.
EXIM_CASES = [("-bP", "exit"), ("-Mt", "half"), ("-Mt", "missing"),
              ("-Mc", "exit"), ("-Mc", "half"), ("-Mc", "not executable"),
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


@pytest.mark.parametrize("mode", ["half"])
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


POSTSUPER_RELEASE = ["half", "missing"]  # not executable: tests/test_faults_mta.py's postsuper, for the whole run


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


def test_postfix_flush_service_gone_loses_nothing(pf, figures):  # noqa: F811
    """The flush service's socket (public/flush) missing, then nobody answering on it: nothing is scheduled.

    qrunner asks the flush service to deliver each message of the default route; its fallback, ``postqueue -i``,
    needs the same service. Each such send fails, said per message with both errors (exit 1), and nothing leaves;
    the two faulted runs change nothing else (the holds the policy now allows are released by the first, and
    wait to be sent), so the next run, with the service back, is judged for both.
    """
    mta, qr = pf
    ids = queue_scenario(mta, qr)
    flush = os.path.join(mta.instance.queue_directory, "public", "flush")
    os.rename(flush, flush + ".aside")
    results = {}
    try:
        results["No such file or directory"] = qr("run")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(flush)
        dead.close()  # the socket file stays, nobody listens
        results["Connection refused"] = qr("run")
    finally:
        if os.path.exists(flush):
            os.unlink(flush)
        os.rename(flush + ".aside", flush)
    for why, result in results.items():
        assert result.code == 1 and "Traceback" not in result.stderr, f"{why}: exit {result.code}:\n{result.stderr}"
        for subject in ("send p90", "send p80", "later one", "later two"):
            assert f"{ids[subject]}: action=send sender=default failed: Postfix's flush service did not take the " \
                   f"delivery request ({flush}: {why}; postqueue -i: postqueue: fatal: " in result.stderr, result.stderr
    assert mta.sink.messages == []
    looks_work(qr, ids["hold this"], "the flush service gone")
    again = qr("run")
    assert again.code == 0 and "Traceback" not in again.stderr, again.stderr
    problems = judge_real(mta, qr, ids, SUBJECTS, {SENT: mta.sink})
    figures.record("faults", "Postfix: the flush service gone (socket missing, refusing)", tried=len(results),
                   survived=len(results) * int(not problems), lost=sum("never" in p for p in problems),
                   duplicates=sum("times" in p for p in problems))
    assert not problems, problems


@pytest.fixture
def routed(postfix, smtp_sink, relays, listener_ports, tmp_path):  # noqa: F811
    """A qrunner whose one sender, "isp", is routed: each send re-injects a copy into its listener (which holds
    it), records it, removes the original with ``postsuper -d`` and then releases the copy."""
    for relay in relays:
        relay.clear()
    qr = postfix_qrunner(tmp_path, postfix, ALLOW_ALL, ["isp"], listener_ports)
    qr.__class__ = FaultyQrunner
    return qr, relays[0]


def test_postfix_remove_failing_in_a_hand_over_then_half_applied_delivers_each_once(routed, postfix, smtp_sink,
                                                                                    figures, tmp_path):
    """``postsuper -d`` (the original, once its copy is recorded) failing: first in every hand-over, then
    half-applied in the next run's recovery, which removes the originals left beside their copies.

    The copy must not leave while its original is still queued (it would go twice): it stays on the listener's
    hold until the original is gone. After both faults, a normal run delivers each message exactly once.
    """
    qr, relay = routed
    ids = [queue_message(postfix, subject) for subject in ("first", "second", "third")]
    directory = command_directory(tmp_path, "postsuper", "-d", "exit")
    config = use_command_directory(qr, directory)

    failed = qr("run")

    # exit 1: a monitor hears at once that the hand-overs are not finished (the copies wait, the next run ends them)
    assert failed.code == 1 and "Traceback" not in failed.stderr, f"exit {failed.code}:\n{failed.stderr}"
    for queue_id in ids:
        assert f"{queue_id}: the original of an accepted copy was not removed (postsuper -d failed " \
               f"({postfix_error('postsuper')}); 0 of 1 messages were changed before it stopped.); the next run " \
               "removes it" in failed.stderr, failed.stderr
    time.sleep(1.0)
    assert relay.messages == [] and smtp_sink.messages == []  # the copies wait on hold beside their originals
    held = queue_state(postfix)
    assert len(held) == 6 and {where for where, _ in held.values()} == {"hold"}, held  # postqueue -j
    failing_command(tmp_path / "sbin" / "postsuper", "/usr/sbin/postsuper", "-d", "half", postfix_error("postsuper"))

    half = qr("run")

    assert half.code == 69 and "Traceback" not in half.stderr, f"exit {half.code}:\n{half.stderr}"
    assert f"postsuper -d failed ({postfix_error('postsuper')}); 1 of 3 messages were changed before it stopped." \
        in half.stderr, half.stderr
    time.sleep(1.0)
    assert relay.messages == [] and len(queue_state(postfix)) == 5  # one original gone, its copy still held
    qr.config_path.write_text(config)
    looks_work(qr, ids[0], "postsuper -d failing")

    again = qr("run")

    assert again.code == 0 and "Traceback" not in again.stderr, again.stderr
    relay.wait_for(3)
    time.sleep(1.0)  # a second copy, if one was on its way, arrives by now
    got = Counter(m.header("Subject").decode() for m in relay.messages)
    lost = sum(1 for s in ("first", "second", "third") if not got[s])
    duplicates = sum(n - 1 for n in got.values() if n > 1)
    figures.record("faults", "Postfix: postsuper -d failing in hand-overs, then half-applied in the recovery",
                   tried=2, survived=2 * int(not lost and not duplicates), lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 0) and smtp_sink.messages == [], got
    deadline = time.monotonic() + 20
    while queue_state(postfix) and time.monotonic() < deadline:  # the last copies leave the active queue
        time.sleep(0.1)
    assert queue_state(postfix) == {}  # postqueue -j: nothing held, deferred or stranded


# -- both: returning a hold past max_hold_age to its sender ------------------------------------------------------------

@pytest.mark.parametrize("mta_name", ["postfix", "exim"])
def test_return_to_sender_failing_keeps_the_hold_and_its_record(request, tmp_path, figures, mta_name):
    """``postsuper -f`` / ``exim -Mg`` (``on_hold_expiry = "bounce"``) failing: the hold stays, on record.

    The next run, the command working again, returns the message: the MTA's log says so.
    """
    mta = harness_for(request, tmp_path, mta_name)
    qr = FaultyQrunner(tmp_path, mta, SKIP_ALL)
    queue_id = mta.queue_message("held, then returned")
    assert qr("run").code == 0 and mta.where(queue_id) == IN_HOLD
    time.sleep(2)
    configure(qr, max_hold_age=1, on_hold_expiry="bounce")
    if mta_name == "postfix":
        flag, command = "-f", "postsuper"
        config = use_command_directory(qr, command_directory(tmp_path, "postsuper", "-f", "exit"))
        error = postfix_error("postsuper")
    else:
        flag, command, real, error = "-Mg", "exim", mta.instance.binary, EXIM_ERROR
        config = use_binary(qr, real, failing_command(tmp_path / "exim", real, "-Mg", "exit"))

    result = qr("run")

    assert result.code == 69 and "Traceback" not in result.stderr, f"exit {result.code}:\n{result.stderr}"
    assert f"{command} {flag} failed ({error}); 0 of 1 messages were changed before it stopped." in result.stderr, \
        result.stderr
    assert "action=vanished" not in result.stderr  # not taken for a message gone meanwhile
    qr.config_path.write_text(config)
    looks_work(qr, queue_id, f"{command} {flag} failing")
    status = qr("status")
    problems = [] if mta.where(queue_id) == IN_HOLD and queue_id in status.stdout else \
        [f"{queue_id}: {mta.where(queue_id)}, on record: {queue_id in status.stdout}"]

    again = qr("run")

    assert again.code == 0 and "Traceback" not in again.stderr, again.stderr
    mta.wait_gone(queue_id)
    log = mta.instance.log_text()
    said = f"{queue_id}: from=<alice@qrunner-test.localdomain>, status=force-expired, returned to sender" \
        if mta_name == "postfix" else f"{queue_id} cancelled by root"
    if said not in log:
        problems.append(f"{queue_id}: gone, but the MTA's log does not say it was returned to its sender")
    figures.record("faults", "Postfix postsuper -f / Exim -Mg (return to sender) failing", tried=1,
                   survived=int(not problems), lost=len(problems))
    assert not problems, problems
