"""The plan (pure), the state records and their crash recovery, and the Postfix back end's error paths.

These run without an MTA: the plan is pure, the state is SQLite, and the
back end's error paths are reached by mocking subprocess (the real Postfix
runs in tests/test_postfix_run.py).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import threading

import pytest

from qrunner.config import PostfixSettings, Sender
from qrunner.exceptions import LockHeldError, UnavailableError
from qrunner.message import Message
from qrunner.mta import postfix as postfix_mod
from qrunner.plan import dispatch_order, make_plan, report_order
from qrunner.policy import Decision, Verdict
from qrunner.state import RunLock, State

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
    ours = {("KEEP1", 1), ("REL1", 2), ("RELW1", 3)}
    items = [decision("KEEP1", 1, send=False), decision("REL1", 2, priority=10), decision("RELW1", 3),
             decision("NEW1", 4, send=False), decision("SEND1", 5, priority=90), decision("WAIT1", 6)]
    plan = make_plan(items, ours, {"WAIT1": 9999.0, "RELW1": 8888.0})
    assert [d.queue_id for d in plan.keep] == ["KEEP1"]
    assert [d.queue_id for d in plan.hold] == ["NEW1"]
    assert [d.queue_id for d in plan.release] == ["REL1", "RELW1"]
    assert [d.queue_id for d in plan.send] == ["SEND1", "REL1"]
    assert [(d.queue_id, t) for d, t in plan.wait] == [("RELW1", 8888.0), ("WAIT1", 9999.0)]


def test_a_record_is_never_matched_to_a_reused_queue_id(tmp_path):
    state = State(str(tmp_path), "postfix:/q")
    state.record_holding([("ABC123", 1000, "a", "why")])
    state.mark_held([("ABC123", 1000)])
    # Postfix reused the short id for a later message; the old one is gone.
    notes = state.reconcile({("ABC123", 2000): "hold"})
    assert state.holds() == {}
    assert any("no longer in the queue" in n for n in notes)


def test_records_of_two_instances_never_mix(tmp_path):
    one, two = State(str(tmp_path), "postfix:/q1"), State(str(tmp_path), "postfix:/q2")
    one.record_holding([("ABC123", 1000, "a", "why")])
    assert two.holds() == {}
    two.reconcile({})
    assert list(one.holds()) == [("ABC123", 1000)]


@pytest.mark.parametrize("interrupted, where, kept", [
    ("holding", "hold", True),        # crash after postsuper -h, before marking: it is our hold
    ("holding", "deferred", False),   # crash before postsuper -h: no hold was made
    ("releasing", "hold", True),      # crash before postsuper -H: still our hold
    ("releasing", "deferred", False),  # crash after postsuper -H: released
    ("held", "deferred", False),      # someone else released it
    ("held", None, False),            # delivered or deleted
])
def test_reconcile_settles_every_interrupted_step(tmp_path, interrupted, where, kept):
    state = State(str(tmp_path), "postfix:/q")
    state.record_holding([("ABC123", 1000, "a", "why")])
    if interrupted == "held":
        state.mark_held([("ABC123", 1000)])
    if interrupted == "releasing":
        state.mark_releasing([("ABC123", 1000)])
    state.reconcile({("ABC123", 1000): where} if where else {})
    holds = state.holds()
    assert (("ABC123", 1000) in holds) == kept
    if kept:
        assert holds[("ABC123", 1000)].state == "held"


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


def test_schedule_speaks_the_flush_protocol(backend, tmp_path):
    instance, run = backend
    os.makedirs(tmp_path / "public")
    path = str(tmp_path / "public" / "flush")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    seen = []

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"protocol\0queue_flush_protocol\0\0")
            data = b""
            while not data.endswith(b"\0\0"):
                data += conn.recv(100)
            seen.append(data)
            conn.sendall(b"status\0" + b"0\0\0")

    thread = threading.Thread(target=serve)
    thread.start()
    assert instance.schedule("ABC123") is True
    thread.join(5)
    server.close()
    assert seen == [b"request\0send_file\0queue_id\0ABC123\0\0"]
    run.assert_not_called()


def test_a_message_gone_since_the_listing_is_vanished_not_an_error(backend, tmp_path):
    instance, run = backend  # an empty queue directory: the deferred file is not there
    message = Message("ABC123", 0, 1, "a@b", ("c@d",), queue_name="deferred")
    assert instance.dispatch([message]) == {"ABC123": "vanished"}
    run.assert_not_called()  # nothing was asked of Postfix for it


@pytest.mark.parametrize("queue_name, held, ours, expected", [
    ("deferred", False, False, True),
    ("hold", True, True, True),      # qrunner's own hold
    ("hold", True, False, False),    # an admin's hold
    ("active", False, False, False),
    ("incoming", False, False, False),
    ("maildrop", False, False, False),
])
def test_postfix_candidates_are_deferred_mail_and_qrunners_holds_only(backend, queue_name, held, ours, expected):
    instance, _ = backend
    message = Message("ABC123", 0, 1, "a@b", ("c@d",), queue_name=queue_name, held=held)
    assert instance.is_candidate(message, ours) is expected


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
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(log_mod.sys.stderr, "isatty", lambda: False, raising=False)
    logger = log_mod.setup_logging(0, use_syslog=True)
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
