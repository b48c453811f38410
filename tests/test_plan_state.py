"""The plan (pure), the state records and their crash recovery, and the Postfix back end's error paths.

These run without an MTA: the plan is pure, the state is SQLite, and the
back end's error paths are reached by mocking subprocess (the real Postfix
runs in tests/test_postfix_run.py).
"""

from __future__ import annotations

import glob
import itertools
import os
import socket
import stat
import subprocess
import threading

import pytest

from qrunner.config import PostfixSettings, Sender
from qrunner.decision import Decision, MessageKey, Verdict
from qrunner.exceptions import LockHeldError, UnavailableError
from qrunner.message import Message, QueueState
from mta_harness import HELD
from qrunner.mta import postfix as postfix_mod
from qrunner.mta import postfix_flush
from qrunner.mta.base import Due, Outcome, Result, SendRequest
from qrunner.plan import (OVERRIDDEN, HoldAge, Listed, Triage, dispatch_order, duration, make_plan, release_plan,
                          report_order, triage)
from qrunner.state import RunLock, State, settle, settled

A, B = Sender(0, "a"), Sender(1, "b")


def decision(qid, arrival, send=True, priority=50, sender=A):
    message = Message(qid, arrival, 100, "s@x", ("r@y",), queue_name="deferred")
    verdict = Verdict(sender, not send, priority, "" if send else "no")
    return Decision(message, send, priority, sender if send else None, "" if send else "no", (verdict,))


def test_dispatch_order_is_priority_then_arrival_then_queue_id_for_every_permutation():
    items = [decision("C1", 10, priority=50), decision("A1", 10, priority=50), decision("B1", 5, priority=50),
             decision("D1", 20, priority=100), decision("E1", 1, priority=1)]
    expected = ["D1", "B1", "A1", "C1", "E1"]
    for permutation in itertools.permutations(items):
        assert [d.queue_id for d in dispatch_order(permutation)] == expected


def test_report_order_lists_sends_then_skips_oldest_first():
    items = [decision("S2", 30, send=False), decision("L1", 10, priority=1), decision("S1", 20, send=False),
             decision("H1", 40, priority=99)]
    assert [d.queue_id for d in report_order(items)] == ["H1", "L1", "S1", "S2"]


def test_make_plan_sorts_each_message_into_exactly_one_step():
    ours = {MessageKey("KEEP1", 1), MessageKey("REL1", 2), MessageKey("RELW1", 3)}
    items = [decision("KEEP1", 1, send=False), decision("REL1", 2, priority=10), decision("RELW1", 3),
             decision("NEW1", 4, send=False), decision("SEND1", 5, priority=90), decision("WAIT1", 6)]
    due = {MessageKey("WAIT1", 6): Due(9999.0), MessageKey("RELW1", 3): Due(8888.0)}
    plan = make_plan(items, Triage(ours=ours), due)
    assert [d.queue_id for d in plan.keep] == ["KEEP1"]
    assert [d.queue_id for d in plan.hold] == ["NEW1"]
    assert [r.queue_id for r in plan.release] == ["REL1", "RELW1"]
    assert [s.queue_id for s in plan.send] == ["SEND1", "REL1"]
    assert [(w.queue_id, w.until) for w in plan.wait] == [("RELW1", 8888.0), ("WAIT1", 9999.0)]
    assert plan.listed == 6 and plan.policy_errors == 0


def test_an_overridden_plan_sends_now_whatever_the_retry_time():
    plan = make_plan([decision("WAIT1", 6)], Triage(), {MessageKey("WAIT1", 6): Due(9999.0)}, overridden=True)
    assert [(s.queue_id, s.overridden, s.reason) for s in plan.send] == [("WAIT1", True, OVERRIDDEN)]
    assert plan.wait == []


def test_a_send_by_the_default_sender_takes_the_mtas_own_route():
    default = Sender(2, "d", True)
    plan = make_plan([decision("R1", 1, sender=A), decision("D1", 2, sender=default)], Triage(), {})
    assert {s.queue_id: s.route for s in plan.send} == {"R1": A, "D1": None}


def listed(qid, arrival=1, state=QueueState.WAITING, **facts):
    return Listed(Message(qid, arrival, 1, "a@b", ("c@d",), state=state), **facts)


def test_triage_recovery_before_the_policy_and_whatever_the_admin_named():
    items = [listed("COPY1", copy="isp"), listed("ORIG1", state=QueueState.HELD, ours=True, handed=("NEW1", "isp")),
             listed("OLD1", expired="too old"), listed("OLDOURS1", state=QueueState.HELD, ours=True, expired="too old"),
             listed("BUSY1", unfit="being delivered"), listed("GO1")]
    every = triage(items)
    assert [m.queue_id for m in every.candidates] == ["OLDOURS1", "GO1"]  # qrunner's own old hold stays, decided
    assert [(s.queue_id, s.reason) for s in every.remove] == [
        ("ORIG1", "already handed to sender isp as NEW1 by an interrupted run")]
    assert [(s.queue_id, s.reason) for s in every.hand_back] == [("OLD1", "too old")]
    assert every.left_alone == [] and every.ours == {MessageKey("ORIG1", 1), MessageKey("OLDOURS1", 1)}

    named = triage(items, only_ids=["BUSY1", "GONE1", "COPY1"])
    assert named.candidates == [] and [s.queue_id for s in named.remove] == ["ORIG1"]
    assert [(s.queue_id, s.reason) for s in named.left_alone] == [
        ("COPY1", "a copy qrunner handed to sender isp; the MTA delivers it on that route"),
        ("BUSY1", "being delivered"), ("GONE1", "not in the queue; nothing to do")]


def test_triage_expires_only_what_the_policy_would_decide_and_the_plan_sends_it_by_the_default_route():
    """Past max_hold_age: an expire step, never a candidate; an admin's hold or a copy never expires."""
    items = [listed("YOUNG1", arrival=950), listed("OLD1", arrival=100),
             listed("OURS1", arrival=100, state=QueueState.HELD, ours=True),
             listed("ADMIN1", arrival=100, state=QueueState.HELD, unfit="on hold by someone else"),
             listed("COPY1", arrival=100, copy="isp"), listed("DUE1", arrival=100), listed("EDGE1", arrival=400)]
    sorted_out = triage(items, hold_age=HoldAge(600, now=1000))
    assert [m.queue_id for m in sorted_out.candidates] == ["YOUNG1", "EDGE1"]  # 600 s old is not past 600
    assert [(s.queue_id, s.bounce) for s in sorted_out.expire] == [("OLD1", False), ("OURS1", False),
                                                                   ("DUE1", False)]
    assert sorted_out.expire[0].reason == ("past max_hold_age (10 min since arrival): sent by the MTA's own "
                                           "routing without asking the policy")

    plan = make_plan([], sorted_out, {MessageKey("DUE1", 100): Due(2000.0)})
    assert [(s.queue_id, s.route, s.priority, s.expired) for s in plan.send] == [
        ("OLD1", None, 50, True), ("OURS1", None, 50, True)]
    assert [r.queue_id for r in plan.release] == ["OURS1"] and [w.queue_id for w in plan.wait] == ["DUE1"]
    assert plan.listed == 0 and plan.decisions == []  # the policy was asked about none of them

    bounced = triage([listed("OLD1", arrival=100), Listed(Message("NULL1", 100, 1, "", ("c@d",)))],
                     hold_age=HoldAge(600, now=1000, bounce=True))
    assert [(s.queue_id, s.bounce) for s in bounced.expire] == [("OLD1", True), ("NULL1", False)]  # a bounce is sent
    assert make_plan([], bounced, {}).send[0].queue_id == "NULL1"
    named = triage(items, only_ids=["OLD1"], hold_age=HoldAge(600, now=1000))
    assert [s.queue_id for s in named.expire] == ["OLD1"] and named.candidates == []


def test_durations_read_as_an_admin_writes_them():
    assert [duration(s) for s in (259200, 86400, 7200, 1200, 1000, 2, 1.5)] == [
        "3 days", "1 day", "2 h", "20 min", "1000 s", "2 s", "1.5 s"]


def test_release_plan_releases_only_qrunners_holds_and_empties_the_queue_on_the_way_out():
    items = [listed("OURS1", state=QueueState.HELD, ours=True), listed("ADMIN1", state=QueueState.HELD),
             listed("WAIT1")]
    named = release_plan(items, ["OURS1", "ADMIN1"], to_default_queue=True)
    assert [r.queue_id for r in named.release] == ["OURS1"] and [h.queue_id for h in named.hand_back] == ["OURS1"]
    assert [(s.queue_id, s.reason) for s in named.left_alone] == [("ADMIN1", "not held by qrunner; left alone")]
    everything = release_plan(items, None, to_default_queue=True)
    assert [h.queue_id for h in everything.hand_back] == ["OURS1", "ADMIN1", "WAIT1"]
    assert [r.queue_id for r in release_plan(items, None, to_default_queue=False).release] == ["OURS1"]
    assert release_plan(items, None, to_default_queue=False).hand_back == []


def test_a_record_is_never_matched_to_a_reused_queue_id(tmp_path):
    state = State(str(tmp_path), "postfix:/q")
    state.record_holding([(MessageKey("ABC123", 1000), "a", "why", "s@x", 50)])
    state.mark_held([MessageKey("ABC123", 1000)])
    # Postfix reused the short id for a later message; the old one is gone.
    settlement = settle(state.load(), {MessageKey("ABC123", 2000): QueueState.HELD})
    state.apply(settlement)
    assert state.holds() == {}
    assert any("no longer in the queue" in n for n in settlement.notes)


def test_records_of_two_instances_never_mix(tmp_path):
    one, two = State(str(tmp_path), "postfix:/q1"), State(str(tmp_path), "postfix:/q2")
    one.record_holding([(MessageKey("ABC123", 1000), "a", "why", "s@x", 50)])
    assert two.holds() == {}
    two.apply(settle(two.load(), {}))
    assert list(one.holds()) == [MessageKey("ABC123", 1000)]


@pytest.mark.parametrize("interrupted, where, kept", [
    ("holding", QueueState.HELD, True),        # crash after the MTA held it, before marking: it is our hold
    ("holding", QueueState.WAITING, False),    # crash before the MTA was asked: no hold was made
    ("releasing", QueueState.HELD, True),      # crash before the release: still our hold
    ("releasing", QueueState.WAITING, False),  # crash after the release
    ("held", QueueState.WAITING, False),       # someone else released it
    ("held", None, False),                     # delivered or deleted
])
def test_reconcile_settles_every_interrupted_step(tmp_path, interrupted, where, kept):
    key = MessageKey("ABC123", 1000)
    state = State(str(tmp_path), "postfix:/q")
    state.record_holding([(key, "a", "why", "s@x", 50)])
    if interrupted == "held":
        state.mark_held([key])
    if interrupted == "releasing":
        state.mark_releasing([key])
    records = state.load()
    settlement = settle(records, {key: where} if where else {})
    assert (key in settled(records, settlement).holds) == kept  # what a dry run plans with ...
    state.apply(settlement)
    holds = state.holds()
    assert (key in holds) == kept  # ... is what the run writes
    if kept:
        assert holds[key].state == "held"


class CountedList(list):
    """A list that counts how often it is read whole."""

    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_what_a_dry_run_plans_with_reads_the_dropped_records_once_not_once_per_record(tmp_path):
    """An admin's ``postsuper -H ALL`` over 100,000 of qrunner's holds: the next run drops every record,
    and must not read the list of dropped ones once per record (10^10 steps: a run that never ends)."""
    state = State(str(tmp_path), "postfix:/q")
    keys = [MessageKey(f"ID{n:06d}", 1000) for n in range(2000)]
    state.record_holding((key, "a", "why", "s@x", 50) for key in keys)
    state.mark_held(keys)
    state.note_attempts(keys)
    records = state.load()
    settlement = settle(records, {key: QueueState.WAITING for key in keys[:1000]})  # half released, half gone
    settlement.forget = CountedList(settlement.forget)
    settlement.drop_attempts = CountedList(settlement.drop_attempts)

    after = settled(records, settlement)

    assert after.holds == {} and len(settlement.forget) == 2000
    assert set(after.attempts) == set(keys[:1000]) and len(settlement.drop_attempts) == 1000
    assert settlement.forget.reads <= 1 and settlement.drop_attempts.reads <= 1


def test_a_history_write_failing_mid_stage_still_logs_every_hold_and_stops_the_run_at_the_stage_end(
        tmp_path, monkeypatch, caplog):
    """A stage writes its history every HISTORY_BATCH actions (not an Event per message until it ends); when
    such a write fails, the stage still carries out and logs what the MTA confirmed, and its own write at the
    end tries every action again: it stops the run there if it fails too, and loses none if it does not."""
    import logging
    import time as clock

    from memory_harness import MemoryHarness
    from qrunner import executor as executor_mod
    from qrunner.exceptions import StateError
    from qrunner.mta.memory import MemoryBackend
    from qrunner.state import RunSummary

    mta = MemoryHarness(str(tmp_path / "queue"))
    ids = [mta.queue_message(f"m{n}") for n in range(5)]
    backend = MemoryBackend(mta.directory)
    state = State(str(tmp_path / "state"), backend.instance)
    summary = RunSummary(command="run", started=clock.time())
    run = executor_mod.Executor(backend, state, summary)
    run.run_id = state.start_run(summary)
    decisions = [Decision(m, False, 50, None, "night only", (Verdict(A, True, 50, "night only"),))
                 for m in backend.list()]
    monkeypatch.setattr(executor_mod, "HISTORY_BATCH", 2)
    written = state.record_history
    calls = []

    def full_disk_once(run_id, events):
        calls.append(len(events))
        if len(calls) == 1:
            raise StateError("the state database is full")
        written(run_id, events)

    monkeypatch.setattr(state, "record_history", full_disk_once)
    with caplog.at_level(logging.INFO, logger="qrunner"):
        run.hold(decisions)
        run._write_history()  # the stage's end

    assert [mta.where(q) for q in ids] == [HELD] * 5  # the memory queue's own record
    assert sum(f"{q}: action=hold" in caplog.text for q in ids) == 5
    assert calls == [2, 5]  # one mid-stage try, then none until the stage's end wrote all five
    assert sorted(e.event.key.queue_id for q in ids for e in state.history(q)) == sorted(ids)

    more = [mta.queue_message(f"later {n}") for n in range(2)]  # the next stage writes in batches again
    run.hold([Decision(m, False, 50, None, "night only", (Verdict(A, True, 50, "night only"),))
              for m in backend.list() if m.queue_id in more])
    assert calls == [2, 5, 2] and [mta.where(q) for q in more] == [HELD] * 2


def test_a_copy_record_lives_while_its_copy_or_its_original_is_queued(tmp_path):
    state = State(str(tmp_path), "postfix:/q")
    original = MessageKey("ORIG1", 1000)
    state.record_copy("COPY1", original, "isp")
    assert settle(state.load(), {original: QueueState.HELD}).drop_copies == []
    assert settle(state.load(), {MessageKey("COPY1", 2000): QueueState.WAITING}).drop_copies == []
    state.apply(settle(state.load(), {}))
    assert state.load().copies == []


def test_lock_names_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(LockHeldError) as error:
            with RunLock(str(tmp_path)):
                pass
    assert f"PID {os.getpid()}" in error.value.message
    with RunLock(str(tmp_path)):
        pass  # released after use


# -- the Postfix back end's error paths, with subprocess mocked -------------------


def completed(stdout="", stderr="", code=0):
    return subprocess.CompletedProcess([], code, stdout, stderr)


def postconf_output(queue_directory="/var/spool/postfix"):
    return completed("\n".join([queue_directory, "/usr/sbin", "deferred, defer", "1", "smtp", "5d",
                                "MAILER-DAEMON"]) + "\n")


@pytest.fixture
def backend(mocker, tmp_path):
    mocker.patch.object(postfix_mod, "find_postconf", return_value="/usr/sbin/postconf")
    run = mocker.patch.object(postfix_mod.subprocess, "run", return_value=postconf_output(str(tmp_path)))
    instance = postfix_mod.PostfixBackend(PostfixSettings(config_directory="/etc/postfix-out"))
    run.reset_mock()
    return instance, run


def test_every_postfix_command_gets_the_config_directory(backend):
    instance, run = backend
    run.return_value = completed(stderr="postsuper: ABC123: placed on hold\n")
    assert instance.hold(["ABC123"]) == {"ABC123"}
    argv = run.call_args[0][0]
    assert argv[:4] == ["/usr/sbin/postsuper", "-c", "/etc/postfix-out", "-h"]
    assert run.call_args[1]["input"] == "ABC123\n"


def test_half_applied_postsuper_batch_is_an_error_naming_what_changed(backend):
    instance, run = backend
    run.return_value = completed(stderr="postsuper: ABC123: placed on hold\npostsuper: fatal: open logfile\n", code=1)
    with pytest.raises(UnavailableError) as error:
        instance.hold(["ABC123", "DEF456"])
    assert "1 of 2 messages were changed" in error.value.message


def test_ids_that_are_not_queue_ids_never_reach_postsuper(backend):
    instance, run = backend
    assert instance.hold(["../etc/passwd", "-d ALL"]) == set()
    run.assert_not_called()


def test_postfix_not_installed_is_exit_69(mocker):
    mocker.patch.object(postfix_mod, "find_postconf", return_value=None)
    with pytest.raises(UnavailableError) as error:
        postfix_mod.PostfixBackend(PostfixSettings())
    assert "Postfix is not installed" in error.value.message and error.value.exit_code == 69


def test_schedule_falls_back_to_postqueue_i_without_the_flush_socket(backend):
    instance, run = backend  # tmp_path has no public/flush socket
    run.return_value = completed()
    assert instance.schedule("ABC123") is True
    assert run.call_args[0][0] == ["/usr/sbin/postqueue", "-c", "/etc/postfix-out", "-i", "ABC123"]


def _flush_server(tmp_path, greeting, answer=b"", greet_first=True, silent=None):
    """A one-connection flush socket. ``greet_first``: it greets before it reads the request, as the service does;
    else it waits for the request (up to its \\0\\0) first, which only a client that sends at once gets past, then
    greets a byte at a time. Then ``answer``, a byte at a time; with ``silent`` (an Event), nothing after the
    greeting until it is set."""
    os.makedirs(tmp_path / "public", exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "public" / "flush"))
    server.listen(1)
    seen = []

    def serve():
        conn, _ = server.accept()
        with conn:
            if greet_first:
                conn.sendall(greeting)
            if silent is not None:
                silent.wait(60)
                return
            data = b""
            while not data.endswith(b"\0\0"):
                data += conn.recv(100)
            seen.append(data)
            try:
                for byte in (b"" if greet_first else greeting) + answer:
                    conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                pass  # a client that does not believe the greeting leaves before the answer

    thread = threading.Thread(target=serve)
    thread.start()
    return server, thread, seen


def test_schedule_speaks_the_flush_protocol(backend, tmp_path):
    instance, run = backend
    server, thread, seen = _flush_server(tmp_path, b"protocol\0queue_flush_protocol\0\0", b"status\0" b"0\0\0")
    assert instance.schedule("ABC123") is True
    thread.join(5)
    server.close()
    assert seen == [b"request\0send_file\0queue_id\0ABC123\0\0"]
    run.assert_not_called()


def test_the_flush_request_goes_before_the_greeting_and_is_believed_only_after_it(backend, tmp_path):
    """The request is sent with the connection (the service reads it after greeting); greeting and answer may
    then arrive in any pieces, here a byte at a time."""
    instance, run = backend
    server, thread, seen = _flush_server(tmp_path, b"protocol\0queue_flush_protocol\0\0", b"status\0" b"0\0\0",
                                         greet_first=False)
    assert instance.schedule("ABC123") is True
    thread.join(5)
    server.close()
    assert seen == [b"request\0send_file\0queue_id\0ABC123\0\0"]
    run.assert_not_called()


def test_a_flush_socket_that_greets_as_something_else_is_not_believed(backend, tmp_path):
    instance, run = backend
    run.return_value = completed()
    server, thread, _seen = _flush_server(tmp_path, b"protocol\0something_else\0\0", b"status\0" b"0\0\0",
                                          greet_first=False)
    assert instance.schedule("ABC123") is True  # by postqueue -i, the fallback
    thread.join(5)
    server.close()
    assert run.call_args[0][0][-2:] == ["-i", "ABC123"]


def test_a_flush_socket_that_greets_as_something_else_and_then_says_nothing_is_left_at_once(backend, tmp_path, mocker):
    """No waiting for an answer from a peer that is not the flush service: the fallback runs as soon as the
    greeting is read (with a timeout of an hour, a client that waited would never return here)."""
    instance, run = backend
    run.return_value = completed()
    mocker.patch.object(postfix_flush, "FLUSH_TIMEOUT", 3600.0)
    done = threading.Event()
    server, thread, _seen = _flush_server(tmp_path, b"protocol\0something_else\0\0", silent=done)
    result = []
    client = threading.Thread(target=lambda: result.append(instance.schedule("ABC123")))
    client.start()
    client.join(30)
    done.set()
    thread.join(5)
    server.close()
    assert result == [True], "schedule() still waiting on a peer that is not the flush service"
    assert run.call_args[0][0][-2:] == ["-i", "ABC123"]


def test_a_message_gone_since_the_listing_is_vanished_not_an_error(backend, tmp_path, mocker):
    instance, run = backend  # an empty queue directory: the deferred file is not there
    message = Message("ABC123", 0, 1, "a@b", ("c@d",), queue_name="deferred")
    journal = mocker.Mock()
    assert instance.send([SendRequest(message, None)], journal) == {"ABC123": Outcome(Result.VANISHED)}
    journal.sent.assert_called_once_with(SendRequest(message, None), Outcome(Result.VANISHED))
    run.assert_not_called()  # nothing was asked of Postfix for it


class FlushService:
    """A flush socket for many connections, as the master's flush processes serve them: each request is read as
    its connection is accepted (in the order the client connected), then answered, in a thread of its own, with
    status 0 once ``gather`` requests have come in all (or after 5 s); a connection for an id in ``drop`` is
    closed without an answer. ``events`` is ("request", id), ("answer", id) and anything a test adds, in the order
    they happened."""

    def __init__(self, tmp_path, gather=1, drop=(), refuse=()):
        os.makedirs(tmp_path / "public", exist_ok=True)
        self.queue_directory = str(tmp_path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(tmp_path / "public" / "flush"))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.gather, self.drop, self.refuse = gather, set(drop), set(refuse)
        self.modes = {}  # queue id -> the mode of its file in deferred/ as its request came
        self.events, self.requests, self.closed = [], 0, False
        self.lock, self.enough = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def event(self, *what):
        with self.lock:
            self.events.append(what)

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue  # the timeout: closed yet?
            conn.settimeout(10)
            conn.sendall(b"protocol\0queue_flush_protocol\0\0")
            data = b""
            while not data.endswith(b"\0\0"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
            queue_id = data.split(b"\0")[3].decode()
            files = glob.glob(os.path.join(self.queue_directory, "deferred", "**", queue_id), recursive=True)
            if files:
                self.modes[queue_id] = os.stat(files[0]).st_mode
            self.event("request", queue_id)
            self.requests += 1
            if self.requests >= self.gather:
                self.enough.set()
            thread = threading.Thread(target=self._answer, args=(conn, queue_id), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _answer(self, conn, queue_id):
        with conn:
            if queue_id in self.drop:
                return
            self.enough.wait(5)
            self.event("answer", queue_id)
            try:
                conn.sendall(b"status\0" + (b"1" if queue_id in self.refuse else b"0") + b"\0\0")
            except OSError:
                pass  # a client that stopped early

    def close(self):
        self.closed = True
        for thread in list(self.threads):
            thread.join(10)
        self.server.close()

    def first(self, kind):
        return next(i for i, event in enumerate(self.events) if event[0] == kind)


def _deferred(instance, *queue_ids):
    for queue_id in queue_ids:
        path = instance.paths.path("deferred", queue_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
        os.chmod(path, 0o700)  # as Postfix leaves a queue file that is ready
    return [SendRequest(Message(q, 0, 1, "a@b", ("c@d",), queue_name="deferred"), None) for q in queue_ids]


def test_the_default_routes_flush_requests_go_a_few_ahead_of_their_answers(backend, tmp_path, mocker):
    """The service works on the next messages' requests while the first is answered: FLUSH_WINDOW requests are
    on their way before any answer (a one-at-a-time client would wait 5 s here for each), in the plan's order; a
    message gone from the deferred queue since the listing gets no request and counts as vanished."""
    instance, run = backend
    ids = ["AAA%03d" % i for i in range(10)]
    requests = _deferred(instance, *ids)
    os.unlink(instance.paths.path("deferred", ids[2]))
    service = FlushService(tmp_path, gather=postfix_flush.FLUSH_WINDOW)
    try:
        outcomes = instance.send(requests, mocker.Mock())
    finally:
        service.close()
    assert outcomes == {q: Outcome(Result.VANISHED if q == ids[2] else Result.SCHEDULED) for q in ids}
    asked = [event[1] for event in service.events if event[0] == "request"]
    assert asked == [q for q in ids if q != ids[2]]
    assert service.first("answer") == postfix_flush.FLUSH_WINDOW, service.events
    run.assert_not_called()


def test_no_flush_request_overtakes_a_senders_copy_before_it(backend, tmp_path, mocker):
    """A routed message between two runs of flushed ones: the requests after it leave only after its copy."""
    instance, run = backend
    first, second = _deferred(instance, "BBB001", "BBB002"), _deferred(instance, "BBB004", "BBB005")
    routed = SendRequest(Message("BBB003", 0, 1, "a@b", ("c@d",), queue_name="hold"), A, held=True)
    service = FlushService(tmp_path)
    sent, real_send = [], postfix_flush._send
    mocker.patch.object(postfix_flush, "_send", side_effect=lambda path, queue_id: sent.append(queue_id)
                        or real_send(path, queue_id))
    mocker.patch.object(instance, "_hand_over", side_effect=lambda request, journal: sent.append("copy")
                        or Outcome(Result.ROUTED, new_id="CCC001"))
    try:
        outcomes = instance.send(first + [routed] + second, mocker.Mock())
    finally:
        service.close()
    assert outcomes["BBB003"].result is Result.ROUTED
    assert all(outcomes[q].result is Result.SCHEDULED for q in ("BBB001", "BBB002", "BBB004", "BBB005"))
    assert sent == ["BBB001", "BBB002", "copy", "BBB004", "BBB005"]


def test_a_lower_prioritys_flush_requests_leave_after_every_higher_ones_answer(backend, tmp_path, mocker):
    """Requests on their way together are of one priority: the service can never take a lower one first."""
    instance, run = backend
    requests = [r._replace(priority=90) for r in _deferred(instance, "FFF001", "FFF002")] + \
        _deferred(instance, "FFF003", "FFF004", "FFF005")
    events, real_send, real_accepted = [], postfix_flush._send, postfix_flush._accepted
    mocker.patch.object(postfix_flush, "_send", side_effect=lambda path, queue_id: events.append(queue_id)
                        or real_send(path, queue_id))
    mocker.patch.object(postfix_flush, "_accepted", side_effect=lambda sock: [real_accepted(sock),
                                                                              events.append("answer")][0])
    service = FlushService(tmp_path)
    try:
        outcomes = instance.send(requests, mocker.Mock())
    finally:
        service.close()
    assert all(outcome.result is Result.SCHEDULED for outcome in outcomes.values())
    assert events == ["FFF001", "FFF002", "answer", "answer", "FFF003", "FFF004", "FFF005",
                      "answer", "answer", "answer"]


def test_a_send_stopped_by_its_journal_still_reports_the_requests_already_on_their_way(backend, tmp_path, mocker):
    """The journal fails on the first outcome: the requests sent ahead of it have moved their messages all the
    same, so each of their answers is reported before the send's own error goes on."""
    instance, run = backend
    ids = ["EEE001", "EEE002", "EEE003", "EEE004", "EEE005"]
    journal = mocker.Mock()
    journal.sent.side_effect = [OSError("disk full"), None, None, None, None]
    service = FlushService(tmp_path, gather=postfix_flush.FLUSH_WINDOW)
    try:
        with pytest.raises(OSError, match="disk full"):
            instance.send(_deferred(instance, *ids), journal)
    finally:
        service.close()
    reported = [(c[0][0].message.queue_id, c[0][1]) for c in journal.sent.call_args_list]
    assert reported == [(q, Outcome(Result.SCHEDULED)) for q in ids[:postfix_flush.FLUSH_WINDOW]]
    asked = [event[1] for event in service.events if event[0] == "request"]
    assert asked == ids[:postfix_flush.FLUSH_WINDOW]  # nothing sent after the failure


def _send_through(instance, tmp_path, requests, journal, **service_options):
    """``instance.send`` with a :class:`FlushService` on its socket: the outcomes, and the service (closed)."""
    service = FlushService(tmp_path, **service_options)
    try:
        return instance.send(requests, journal), service
    finally:
        service.close()


def _marked(instance, queue_id):
    return bool(os.stat(instance.paths.path("deferred", queue_id)).st_mode & stat.S_IRGRP)


def test_each_flush_request_finds_its_file_marked_and_a_refused_one_loses_the_mark(backend, tmp_path, mocker):
    """Every request comes to the service with its file already marked flushed (a queue scan before the service
    moves it lets it past the gate all the same); a refused request takes the mark off, so that the message
    does not pass the gate at its own retry time. The accepted ones keep theirs: Postfix's queue manager clears
    it when it reads the file, and this fake service moves nothing."""
    instance, run = backend
    ids = ["ACE001", "ACE002", "ACE003"]
    outcomes, service = _send_through(instance, tmp_path, _deferred(instance, *ids), mocker.Mock(),
                                      refuse={"ACE002"})
    assert [outcomes[q].result for q in ids] == [Result.SCHEDULED, Result.FAILED, Result.SCHEDULED]
    assert all(service.modes[q] & stat.S_IRGRP for q in ids), service.modes
    assert [_marked(instance, q) for q in ids] == [True, False, True]


@pytest.mark.parametrize("postqueue", ["exits 1", "cannot start"])
def test_a_flush_request_that_reached_no_one_leaves_no_mark(backend, tmp_path, mocker, postqueue):
    """No flush socket, and postqueue -i failing or not starting at all: Postfix was not asked, so the file is
    as it was, by a run's send and by the single request of a release of copies or a give-up."""
    instance, run = backend
    if postqueue == "exits 1":
        run.return_value = completed(stderr="postqueue: fatal: Queue report unavailable\n", code=1)
    else:
        run.side_effect = FileNotFoundError(2, "No such file or directory")
    [request] = _deferred(instance, "BAD001")
    if postqueue == "exits 1":
        assert instance.send([request], mocker.Mock())["BAD001"].result is Result.FAILED
        assert instance.schedule("BAD001") is False
    else:
        for attempt in (lambda: instance.send([request], mocker.Mock()), lambda: instance.schedule("BAD001")):
            with pytest.raises(UnavailableError):
                attempt()
            assert not _marked(instance, "BAD001")
    assert not _marked(instance, "BAD001")


def test_a_send_stopped_early_takes_the_mark_off_the_requests_that_never_left(backend, tmp_path, mocker):
    """The journal fails on the first outcome while the next requests could not be sent (the socket refused
    them): those files lose their mark; the first, answered and moved by the service, is past caring."""
    instance, run = backend
    ids = ["CAB001", "CAB002", "CAB003"]
    real_send = postfix_flush._send
    mocker.patch.object(postfix_flush, "_send", side_effect=lambda path, queue_id: real_send(path, queue_id)
                        if queue_id == "CAB001" else (_ for _ in ()).throw(ConnectionRefusedError(111, "refused")))
    journal = mocker.Mock()
    journal.sent.side_effect = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        _send_through(instance, tmp_path, _deferred(instance, *ids), journal)
    assert [_marked(instance, q) for q in ids] == [True, False, False]
    run.assert_not_called()


def test_a_flush_request_left_unanswered_goes_by_postqueue_i_alone(backend, tmp_path, mocker):
    """One connection of the window closed without an answer: that message by postqueue -i, the others by the
    socket, each outcome its own."""
    instance, run = backend
    run.return_value = completed()
    ids = ["DDD001", "DDD002", "DDD003"]
    outcomes, _ = _send_through(instance, tmp_path, _deferred(instance, *ids), mocker.Mock(), drop={"DDD002"})
    assert outcomes == {q: Outcome(Result.SCHEDULED) for q in ids}
    assert [c[0][0][-2:] for c in run.call_args_list] == [["-i", "DDD002"]]


@pytest.mark.parametrize("queue_name, state, ours, expected", [
    ("deferred", QueueState.WAITING, False, True),
    ("hold", QueueState.HELD, True, True),      # qrunner's own hold
    ("hold", QueueState.HELD, False, False),    # an admin's hold
    ("active", QueueState.ACTIVE, False, False),
    ("incoming", QueueState.ARRIVING, False, False),
    ("maildrop", QueueState.ARRIVING, False, False),
])
def test_postfix_candidates_are_deferred_mail_and_qrunners_holds_only(backend, queue_name, state, ours, expected):
    instance, _ = backend
    message = Message("ABC123", 0, 1, "a@b", ("c@d",), queue_name=queue_name, state=state)
    assert (instance.unfit(message, ours) is None) is expected


def test_command_directory_names_where_postfix_commands_are(mocker, tmp_path):
    postconf = tmp_path / "postconf"
    postconf.write_text("#!/bin/sh\nprintf '%s\\n' /var/spool/postfix /usr/sbin 'deferred, defer' 1 smtp 5d MAILER-DAEMON\n")
    postconf.chmod(0o755)
    instance = postfix_mod.PostfixBackend(PostfixSettings(command_directory=str(tmp_path)))
    assert instance.command("postsuper") == str(tmp_path / "postsuper")  # the setting wins over postconf's answer
    assert postfix_mod.find_postconf(str(tmp_path / "nowhere")) is None


def test_actions_reach_syslogs_mail_facility(tmp_path, monkeypatch):
    import logging
    import socket as socket_mod

    from qrunner import log as log_mod

    address = str(tmp_path / "log.sock")
    server = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    monkeypatch.setattr(log_mod, "SYSLOG_ADDRESS", address)
    monkeypatch.setattr(log_mod, "JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    monkeypatch.delenv(log_mod.TEST_NO_SYSTEM_LOG, raising=False)
    logger = log_mod.setup_logging(0, to_system_log=True)
    logger.info("8F64916008A: action=hold sender=default")
    data = server.recv(4096).decode()
    server.close()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    priority = int(data[1:data.index(">")])
    assert priority == 2 * 8 + 6  # facility mail (2), severity info (6)
    assert "qrunner[" in data and "8F64916008A: action=hold sender=default" in data
    assert logging.getLogger("qrunner").level == logging.INFO
