"""Exactly-once hand-over to a sender (issue 14, point 1b): a kill at every step of a hand-over, then a normal run.

A Postfix send by a sender's route holds the original, re-injects a copy into the sender's listener, which puts
the copy on hold as it accepts it (``smtpd_data_restrictions=check_client_access,static:HOLD``), records the
copy, deletes the original and only then releases the copy. Each case here kills ``qrunner run`` (SIGKILL) at
one step of that, runs qrunner again, and judges from the MTA alone (the relay's sink, ``postqueue -j``, the
memory MTA's queue file) that every message left exactly once: none lost, none twice, none left queued.

The memory back end models the same listener (``listener_holds``), so the orchestration runs on any machine;
the real Postfix confirms it. A listener without the HOLD (an older master.cf) keeps the at-least-once
hand-over, which ``run`` and ``plan`` warn about: shown here too, duplicate included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from memory_harness import MemoryHarness
from postfix_instance import free_loopback_port
from qrunner_e2e import ALLOW_ALL, Qrunner, queue_message, queue_state
from smtp_sink import wait_for_greeting
from test_senders import NEXTHOPS, listener_ports, postfix_qrunner, relays  # noqa: F401  (fixtures: the routes)

SUBJECTS = ("first", "second", "third")

# Every step of a hand-over, in the order it takes them: where the kill lands, on each back end.
KILLS = {
    "before the copy's DATA": ("qrunner.mta.memory:MemoryBackend._hand_over",
                               "qrunner.mta.postfix_reinject:_Session.send_data"),
    "after the listener's 250, before the copy is recorded": ("qrunner.executor:Executor.copied",) * 2,
    "after the record, before the original is removed": ("qrunner.mta.memory:MemoryBackend.remove",
                                                         "qrunner.mta.postfix:PostfixBackend.remove"),
    "after the original is removed, before the copy is released": (
        "qrunner.mta.memory:MemoryBackend.release_copies", "qrunner.mta.postfix:PostfixBackend.release_copies"),
    "after the copy is released, before that is recorded": ("qrunner.state:State.mark_copies_released",) * 2,
    "after the hand-over, before its outcome is logged": ("qrunner.executor:Executor.sent",) * 2,
}
# Up to here the copy cannot have left: the listener holds it until the original is gone.
NOT_LEFT_YET = list(KILLS)[:4]


@pytest.fixture
def memory(tmp_path):
    """The memory MTA and a qrunner with two routed senders (the name puts these cases under the coverage gate)."""
    mta = MemoryHarness(str(tmp_path / "memory-queue"))
    qr = Qrunner(tmp_path, mta, ALLOW_ALL)
    # Two routed senders, as on the Postfix side: "isp" takes everything (one sender alone would be the default).
    qr.config_path.write_text(qr.config_path.read_text() + '[[sender]]\nid = 0\nname = "isp"\n'
                              '[[sender]]\nid = 1\nname = "backup"\n')
    return mta, qr


def memory_queue(mta) -> dict:
    """queue id -> (state, route) from the memory MTA's own queue file."""
    mta.sink.finish()
    return {e["id"]: (e["state"], e.get("route", "")) for e in mta._entries()}


def judge(subjects, expected=SUBJECTS):
    """(lost, duplicates) of what the relay got against what was sent."""
    got = Counter(subjects)
    return sum(1 for s in expected if got[s] == 0), sum(n - 1 for n in got.values() if n > 1)


@pytest.mark.reliability
@pytest.mark.parametrize("step", list(KILLS))
def test_memory_kill_at_each_step_of_a_hand_over_delivers_each_message_once(memory, step, figures):
    mta, qr = memory
    for subject in SUBJECTS:
        mta.queue_message(subject)

    killed = qr.run_killed_at(KILLS[step][0])

    assert killed.code == -signal.SIGKILL, killed.stderr
    if step in NOT_LEFT_YET:
        assert mta.sink.messages == []  # nothing left by the route while qrunner had not removed the original
    status, plan = qr("status"), qr("plan")
    assert status.code == 0 and plan.code == 0, status.stderr + plan.stderr  # right after the crash
    again = qr("run")
    assert again.code == 0, again.stderr
    delivered = mta.sink.messages
    lost, duplicates = judge([m.header("Subject").decode() for m in delivered])
    figures.record("faults", f"hand-over killed {step} (memory)", tried=1,
                   survived=int(not lost and not duplicates), lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 0), [m.header("Subject") for m in delivered]
    assert {m.route for m in delivered} == {"isp"}
    assert memory_queue(mta) == {}  # nothing left queued, held or not
    assert qr("run").code == 0 and len(mta.sink.messages) == len(SUBJECTS)  # and a later run sends nothing more


def test_memory_a_held_copy_the_crash_left_unrecorded_is_removed_and_its_original_handed_over_again(memory):
    mta, qr = memory
    queue_id = mta.queue_message("only once")
    assert qr.run_killed_at("qrunner.executor:Executor.copied").code == -signal.SIGKILL
    (copy,) = [q for q in memory_queue(mta) if q != queue_id]
    assert memory_queue(mta)[copy] == ("held", "isp")

    plan = qr("plan")
    again = qr("run")

    assert f"{copy}" in plan.stdout and "its original" in plan.stdout and queue_id in plan.stdout
    assert again.code == 0, again.stderr
    assert f'{copy}: action=delete reason="copy for sender isp held by its listener; its original {queue_id} ' \
           'is still queued and is decided again"' in again.stderr
    assert f"{queue_id}: action=route sender=isp" in again.stderr
    assert [m.header("Subject") for m in mta.sink.messages] == [b"only once"]


def test_memory_a_held_copy_whose_original_is_gone_is_released_without_any_record(memory):
    """The queue file is the truth: with qrunner's records lost, a held copy of a gone original still leaves."""
    mta, qr = memory
    queue_id = mta.queue_message("records lost")
    assert qr.run_killed_at("qrunner.mta.memory:MemoryBackend.release_copies").code == -signal.SIGKILL
    os.remove(os.path.join(qr.state_dir, "qrunner.sqlite"))
    (copy,) = memory_queue(mta)
    assert copy != queue_id

    again = qr("run")

    assert again.code == 0, again.stderr
    assert f"{copy}: action=release" in again.stderr
    assert [m.header("Subject") for m in mta.sink.messages] == [b"records lost"]
    assert memory_queue(mta) == {}


def test_memory_a_copy_released_and_then_held_by_the_admin_stays_the_admins(memory):
    mta, qr = memory
    mta.set(routes_down=["isp"])  # the copy stays queued on its route
    queue_id = mta.queue_message("held by the admin later")
    assert qr("run").code == 0
    (copy,) = memory_queue(mta)
    assert copy != queue_id
    mta.admin_hold(copy)

    again = qr("run")

    assert again.code == 0, again.stderr
    assert copy not in again.stderr  # neither released nor removed: the admin's hold
    assert memory_queue(mta)[copy] == ("held", "isp")


def test_memory_a_copy_the_mta_would_not_release_waits_on_hold_for_the_next_run(memory):
    mta, qr = memory
    queue_id = mta.queue_message("release refused")
    mta.set(fail={"release_copies": "postsuper -H failed"})

    first = qr("run")

    assert f"{queue_id}: action=route sender=isp" in first.stderr
    assert "copy not confirmed released from its listener's hold: the next run releases it if still held" in \
        first.stderr
    mta.set(fail={})
    again = qr("run")
    assert again.code == 0, again.stderr
    assert [m.header("Subject") for m in mta.sink.messages] == [b"release refused"]
    assert memory_queue(mta) == {}


def test_memory_release_all_after_a_kill_deletes_the_original_and_releases_its_copy(memory):
    mta, qr = memory
    queue_id = mta.queue_message("the way out")
    assert qr.run_killed_at("qrunner.mta.memory:MemoryBackend.remove").code == -signal.SIGKILL
    (copy,) = [q for q in memory_queue(mta) if q != queue_id]

    dry = qr("release", "--all", "--dry-run")
    result = qr("release", "--all")

    assert f"{copy}" in dry.stdout and "release" in dry.stdout
    assert result.code == 0, result.stderr
    assert f"{queue_id}: action=delete" in result.stderr and f"{copy}: action=release" in result.stderr
    assert [m.header("Subject") for m in mta.sink.messages] == [b"the way out"]
    assert memory_queue(mta) == {}


@pytest.mark.reliability
def test_memory_a_listener_without_the_hold_keeps_the_documented_at_least_once(memory, figures):
    mta, qr = memory
    mta.set(listener_holds=False)
    mta.queue_message("old listener")

    assert qr.run_killed_at("qrunner.executor:Executor.copied").code == -signal.SIGKILL
    assert qr("run").code == 0

    lost, duplicates = judge([m.header("Subject").decode() for m in mta.sink.messages], ("old listener",))
    figures.record("faults", "hand-over killed after the 250 with a listener without HOLD (memory, at least once)",
                   tried=1, survived=int(not lost), lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 1)  # the one duplicate such a listener allows, and never a loss
    assert memory_queue(mta) == {}


# -- real Postfix ----------------------------------------------------------------------------------------------


@pytest.fixture
def pf(postfix, smtp_sink, relays, listener_ports):  # noqa: F811
    for relay in relays:
        relay.clear()
    yield postfix


def sink_subjects(sink, count: int):
    """What the relay got once ``count`` messages came, and a moment more for any duplicate to arrive."""
    sink.wait_for(count)
    time.sleep(1.0)
    return [m.header("Subject").decode() for m in sink.messages]


@pytest.mark.reliability
@pytest.mark.parametrize("step", list(KILLS))
def test_postfix_kill_at_each_step_of_a_hand_over_delivers_each_message_once(tmp_path, pf, smtp_sink, relays,
                                                                             listener_ports, step, figures):
    qr = postfix_qrunner(tmp_path, pf, ALLOW_ALL, ["isp"], listener_ports)
    ids = [queue_message(pf, subject) for subject in SUBJECTS]

    killed = qr.run_killed_at(KILLS[step][1])

    assert killed.code == -signal.SIGKILL, killed.stderr
    if step in NOT_LEFT_YET:
        time.sleep(1.0)
        assert relays[0].messages == []  # the listener holds the copy: nothing left beside its original
        assert {where for where, _ in queue_state(pf).values()} == {"hold"}  # originals and copy, all on hold
    if step == "after the listener's 250, before the copy is recorded":
        (copy,) = set(queue_state(pf)) - set(ids)
        envelope = subprocess.run(["postcat", "-c", pf.config_directory, "-eq", copy], capture_output=True,
                                  text=True).stdout
        # what the next run knows the unrecorded copy by: its route and its original, in its own queue file
        assert f"content_filter: qr-sender-0:{NEXTHOPS[listener_ports[0]]}" in envelope
        assert f"named_attribute: log_ident={ids[0]}" in envelope
    again = qr("run")
    assert again.code == 0, again.stderr
    got = sink_subjects(relays[0], len(SUBJECTS))
    lost, duplicates = judge(got)
    figures.record("faults", f"hand-over killed {step} (Postfix)", tried=1,
                   survived=int(not lost and not duplicates), lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 0), got
    assert smtp_sink.messages == []  # none by the default route either
    pf.wait_gone(ids)
    deadline = time.monotonic() + 20
    while queue_state(pf) and time.monotonic() < deadline:  # the last copies leave the active queue
        time.sleep(0.1)
    assert queue_state(pf) == {}  # postqueue -j: nothing held, deferred or stranded


@pytest.fixture(scope="module")
def old_listener(_module_postfix, relays):  # noqa: F811
    """A sender's listener from an older master.cf: no HOLD, so its copies leave at once."""
    port = free_loopback_port()
    NEXTHOPS[port] = f"[127.0.0.1]:{relays[0].port}"
    _module_postfix.add_reinjection_listener(port, "qr-sender-0", NEXTHOPS[port], {"smtpd_data_restrictions": ""})
    wait_for_greeting(port)
    return port


@pytest.mark.reliability
def test_postfix_a_listener_without_the_hold_is_warned_about_and_stays_at_least_once(
        tmp_path, pf, relays, listener_ports, old_listener, figures):  # noqa: F811
    qr = postfix_qrunner(tmp_path, pf, ALLOW_ALL, ["isp"], [old_listener])
    queue_id = queue_message(pf, "old listener")

    plan = qr("plan")
    killed = qr.run_killed_at("qrunner.executor:Executor.copied")
    again = qr("run")

    assert plan.code == 0, plan.stderr
    for said in (plan.stderr, killed.stderr, again.stderr):
        assert (f"sender isp: its listener 127.0.0.1:{old_listener} does not put copies on hold" in said
                and "static:HOLD" in said), said
    assert killed.code == -signal.SIGKILL and again.code == 0, again.stderr
    got = sink_subjects(relays[0], 2)
    lost, duplicates = judge(got, ("old listener",))
    figures.record("faults", "hand-over killed after the 250 with a listener without HOLD (Postfix, at least once)",
                   tried=1, survived=int(not lost), lost=lost, duplicates=duplicates)
    assert (lost, duplicates) == (0, 1)  # the documented duplicate of such a listener, never a loss
    pf.wait_gone([queue_id])


def test_postfix_plan_is_quiet_about_a_listener_that_holds(tmp_path, pf, listener_ports):  # noqa: F811
    qr = postfix_qrunner(tmp_path, pf, ALLOW_ALL, ["isp"], listener_ports)
    plan = qr("plan")
    assert plan.code == 0, plan.stderr
    assert "does not put copies on hold" not in plan.stderr and "XFORWARD" not in plan.stderr


# Started as ``python KILL_AFTER SECONDS ARGS...``: qrunner, SIGKILLed SECONDS after its hand-over began (its first
# ``send`` call); a negative SECONDS only reports how long the hand-over took ("hand-over took S s" on stderr).
KILL_AFTER = """
import os, signal, sys, threading, time
from qrunner.mta import postfix
delay = float(sys.argv[1])
send = postfix.PostfixBackend.send
def timed_send(self, requests, journal):
    if delay >= 0:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    started = time.monotonic()
    try:
        return send(self, requests, journal)
    finally:
        sys.stderr.write("hand-over took %f s\\n" % (time.monotonic() - started))
postfix.PostfixBackend.send = timed_send
from qrunner.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.reliability
def test_postfix_kills_at_random_moments_of_hand_overs_never_lose_or_duplicate(tmp_path, pf, smtp_sink, relays,
                                                                              listener_ports, figures):  # noqa: F811
    """The issue's own measurement, again: kills at uniform times during hand-overs (12 of 95 sent twice before)."""
    import random
    import sys

    qr = postfix_qrunner(tmp_path, pf, ALLOW_ALL, ["isp"], listener_ports)
    wrapper = tmp_path / "kill_after.py"
    wrapper.write_text(KILL_AFTER)
    rounds = 95 if os.environ.get("QRUNNER_LONG") else 3
    rng = random.Random(1414)

    def one_round(number: int, delay: float):
        subjects = [f"round {number} message {i}" for i in range(3)]
        ids = [queue_message(pf, subject) for subject in subjects]
        proc = subprocess.run([sys.executable, str(wrapper), str(delay), "run"], env=qr._env(),
                              capture_output=True, text=True, timeout=120)
        again = qr("run")
        assert again.code == 0, again.stderr
        got = [s for s in sink_subjects(relays[0], len(subjects)) if s in subjects]
        pf.wait_gone(ids)
        deadline = time.monotonic() + 20
        while queue_state(pf) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue_state(pf) == {}, queue_state(pf)
        relays[0].clear()
        return proc, judge(got, subjects)

    calibration, (lost, duplicates) = one_round(0, -1)
    assert calibration.returncode == 0 and (lost, duplicates) == (0, 0), calibration.stderr
    took = float(calibration.stderr.split("hand-over took ")[1].split()[0])
    struck = lost_total = duplicates_total = 0
    for number in range(1, rounds + 1):
        proc, (lost, duplicates) = one_round(number, rng.uniform(0, took))
        struck += proc.returncode == -signal.SIGKILL
        lost_total += lost
        duplicates_total += duplicates
    # only a kill that struck before the run ended counts as a fault injected
    figures.record("faults", "kills at uniform random moments of Postfix hand-overs (3 messages each)", tried=struck,
                   survived=struck if not (lost_total or duplicates_total) else 0, lost=lost_total,
                   duplicates=duplicates_total, note=f"{struck} of {rounds} kills struck before the run ended")
    assert (lost_total, duplicates_total) == (0, 0)
    assert struck, f"none of the {rounds} kills struck before its run ended: the case tried nothing"
