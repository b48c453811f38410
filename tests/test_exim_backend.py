"""The Exim back end's choices that need no Exim to check: pacing, batching by level, hints, discovery.

Subprocess is mocked here to reach what a real Exim will not show on
demand; the real Exim runs in test_run.py, test_exim_run.py and
test_senders.py.
"""

from __future__ import annotations

import time

import pytest

from qrunner.config import Config, EximSettings
from qrunner.message import Message
from qrunner.mta import backend_for
from qrunner.mta import exim as exim_mod
from qrunner.mta.base import Outcome, Result, SendRequest


@pytest.fixture
def backend(mocker, tmp_path):
    mocker.patch.object(exim_mod, "find_exim", return_value="/usr/sbin/exim4")
    mocker.patch.object(exim_mod.EximBackend, "_options", return_value={"spool_directory": str(tmp_path),
                                                                        "split_spool_directory": "no"})
    return exim_mod.EximBackend(EximSettings(dispatch_concurrency=2, backoff_min=300, backoff_max=3600))


def test_backoff_doubles_from_min_to_max(backend):
    now = time.time()
    message = Message("1xW85O-0001T2-2A", now - 10, 100, "a@b", ("c@d",))
    assert backend.due(message, None) is None  # never dispatched: due
    waits = [backend.due(message, (count, now)) for count in range(1, 7)]
    assert [round(w.at - now) for w in waits] == [300, 600, 1200, 2400, 3600, 3600]
    assert waits[1].describe() == "qrunner's retry time (backoff after 2 deferred dispatches)"
    assert backend.due(message, (1, now - 301)) is None  # the wait is over


def test_dispatch_starts_batches_in_order_never_more_than_the_concurrency(backend, mocker):
    ids = [f"1xW85O-{i:06d}-2A" for i in range(25)]
    mocker.patch.object(backend, "_frozen", return_value=False)
    mocker.patch.object(backend, "write_routes")
    mocker.patch.object(backend, "_outcome", return_value=Outcome(Result.DELIVERED))
    started, running = [], []

    class FakeProcess:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            running.append(self)
            assert len(running) <= 2, "more exim processes at once than dispatch_concurrency"
            self.returncode = None
            self.stderr = None

        def poll(self):
            if self.returncode is None:
                self.returncode = 0
                running.remove(self)
            return self.returncode

    mocker.patch.object(exim_mod.subprocess, "Popen", FakeProcess)
    messages = [Message(i, 0, 1, "a@b", ("c@d",)) for i in ids]

    reported = []
    journal = mocker.Mock(sent=lambda request, outcome: reported.append(request.message.queue_id))
    outcomes = backend.send([SendRequest(m, None) for m in messages], journal=journal)

    assert [argv[argv.index("-Mc") + 1:] for argv in started] == [ids[0:10], ids[10:20], ids[20:25]]  # one level
    assert all(argv[:2] == ["/usr/sbin/exim4", "-qGqrunner"] for argv in started)
    assert set(outcomes.values()) == {Outcome(Result.DELIVERED)} and reported == ids


class SlowProcess:
    """A fake Exim process that takes one poll per message to end; each start is noted with what ran then."""

    def __init__(self, started, running, argv, **kwargs):
        self.argv, self.polls, self.returncode, self.stderr = argv, 0, None, None
        started.append((argv, [p.argv for p in running]))
        running.append(self)
        self.running = running

    def poll(self):
        self.polls += 1
        if self.returncode is None and self.polls > len(self.argv):
            self.returncode = 0
            self.running.remove(self)
        return self.returncode


def _send_levels(backend, mocker, levels, forced=False):
    """Send messages at the given priorities (in that order); each process's argv, with what ran beside it."""
    mocker.patch.object(backend, "_frozen", return_value=False)
    mocker.patch.object(backend, "write_routes")
    mocker.patch.object(backend, "_outcome", return_value=Outcome(Result.DELIVERED))
    mocker.patch.object(exim_mod.time, "sleep")
    started, running = [], []
    mocker.patch.object(exim_mod.subprocess, "Popen", lambda argv, **kw: SlowProcess(started, running, argv, **kw))
    requests = [SendRequest(Message(f"1xW85O-{n:06d}-2A", 0, 1, "a@b", ("c@d",)), None, priority=priority,
                            forced=forced) for n, priority in enumerate(levels)]
    backend.send(requests, journal=mocker.Mock())
    priority_of = {r.message.queue_id: r.priority for r in requests}
    return [({priority_of[i] for i in argv if i in priority_of}, [{priority_of[i] for i in other if i in priority_of}
                                                                   for other in beside]) for argv, beside in started]


def test_a_batch_never_mixes_levels_and_no_lower_level_starts_while_a_higher_one_delivers(backend, mocker):
    starts = _send_levels(backend, mocker, [90] * 12 + [50] * 12 + [10] * 3)

    assert [levels for levels, _ in starts] == [{90}, {90}, {50}, {50}, {10}]
    for levels, beside in starts:
        assert all(other == levels for other in beside), "a lower level started beside a higher one"


def test_overlap_priorities_lets_the_next_level_start_in_a_free_process(backend, mocker):
    backend.settings = EximSettings(dispatch_concurrency=2, overlap_priorities=True)
    starts = _send_levels(backend, mocker, [90] * 12 + [50] * 12)

    assert [levels for levels, _ in starts] == [{90}, {90}, {50}, {50}]  # still one level a batch
    assert any({90} in beside for levels, beside in starts if levels == {50})


def test_a_forced_send_is_a_queue_run_for_each_message_alone(backend, mocker):
    mocker.patch.object(backend, "_frozen", return_value=False)
    mocker.patch.object(backend, "write_routes")
    mocker.patch.object(backend, "_outcome", return_value=Outcome(Result.DELIVERED))
    argvs = []
    mocker.patch.object(exim_mod.subprocess, "Popen",
                        lambda argv, **kw: argvs.append(argv) or mocker.Mock(returncode=0, stderr=None,
                                                                              poll=lambda: 0))
    ids = ["1xW85O-000001-2A", "1xW85O-000002-2A"]
    backend.send([SendRequest(Message(i, 0, 1, "a@b", ("c@d",)), None, forced=True) for i in ids],
                 journal=mocker.Mock())
    # -qf: past Exim's retry times, never a frozen message (-M would deliver it); the same id as start and stop
    assert [argv[1:] for argv in argvs] == [["-qfGqrunner", i, i] for i in ids]


RETRY_DUMP = """\
  T:127.0.0.1:127.0.0.1:40879 111 65 Connection refused
01-Dec-2026 11:48:56  01-Dec-2026 11:48:56  01-Dec-2026 12:03:56 
  R:bob@example.net:<alice@qrunner-test.localdomain> -44 12865 H=127.0.0.1 [127.0.0.1]: SMTP error from remote
01-Dec-2026 11:47:57  01-Dec-2026 11:47:57  01-Dec-2026 12:02:57 
  T:mx.example:192.0.2.7:1xW85O-000003-2A -46 0 SMTP error from remote mail server after end of data
01-Dec-2026 11:40:00  01-Dec-2026 11:40:00  01-Dec-2026 11:55:00 *
"""
WAIT_DUMP = ("127.0.0.1 1xW85O-000001-2A 1xW85O-000002-2A \n127.0.0.1:0 1xW85O-000004-2A \n"
             "mx.example 1xW85O-000005-2A \n")


def test_exims_hints_say_which_record_holds_a_message_back():
    """Formats as exim_dumpdb -z prints them on 4.96 (retry: two lines a record; wait-<transport>: a line a host)."""
    from qrunner.mta import exim_hints

    records = exim_hints.parse_retry_dump(RETRY_DUMP)
    assert [r.key for r in records] == ["T:127.0.0.1:127.0.0.1:40879", "T:mx.example:192.0.2.7:1xW85O-000003-2A"]
    assert records[0].error == "Connection refused" and records[0].next_try == 1796126636.0  # 12:03:56 UTC
    hints = exim_hints.RetryHints(records, exim_hints.parse_wait_dump(WAIT_DUMP))
    before = records[1].next_try - 60
    assert hints.holding("1xW85O-000004-2A", before).key == "T:127.0.0.1:127.0.0.1:40879"  # continued record
    assert hints.holding("1xW85O-000003-2A", before).host == "mx.example:192.0.2.7"  # its own record at that host
    assert hints.holding("1xW85O-000005-2A", before) is None  # its host has no record: -Mc tries it
    assert hints.holding("1xW85O-000006-2A", before) is None  # Exim ties no host to it
    assert hints.holding("1xW85O-000001-2A", records[0].next_try) is None  # the retry time has come


def test_auto_finds_exim_when_postfix_is_missing(mocker, tmp_path):
    from qrunner.mta import postfix as postfix_mod

    mocker.patch.object(postfix_mod, "find_postconf", return_value=None)
    mocker.patch.object(exim_mod, "find_exim", return_value="/usr/sbin/exim4")
    mocker.patch.object(exim_mod.EximBackend, "_options", return_value={"spool_directory": str(tmp_path),
                                                                        "split_spool_directory": "no"})
    assert isinstance(backend_for(Config(mta="auto")), exim_mod.EximBackend)
    mocker.patch.object(exim_mod, "find_exim", return_value=None)
    with pytest.raises(Exception) as error:
        backend_for(Config(mta="auto"))
    assert getattr(error.value, "exit_code", None) == 69
