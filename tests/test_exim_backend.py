"""The Exim back end's choices that need no Exim to check: pacing, batching, discovery.

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
    mocker.patch.object(exim_mod.EximBackend, "_option", side_effect=lambda name, boolean=False:
                        "no" if boolean else str(tmp_path))
    return exim_mod.EximBackend(EximSettings(dispatch_concurrency=2, backoff_min=300, backoff_max=3600))


def test_backoff_doubles_from_min_to_max(backend):
    now = time.time()
    message = Message("1xW85O-0001T2-2A", now - 10, 100, "a@b", ("c@d",))
    assert backend.due(message, None) is None  # never dispatched: due
    waits = [backend.due(message, (count, now)) - now for count in range(1, 7)]
    assert [round(w) for w in waits] == [300, 600, 1200, 2400, 3600, 3600]
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

    assert [argv[argv.index("-Mc") + 1:] for argv in started] == [ids[0:10], ids[10:20], ids[20:25]]
    assert all(argv[:2] == ["/usr/sbin/exim4", "-qGqrunner"] for argv in started)
    assert set(outcomes.values()) == {Outcome(Result.DELIVERED)} and reported == ids


def test_auto_finds_exim_when_postfix_is_missing(mocker, tmp_path):
    from qrunner.mta import postfix as postfix_mod

    mocker.patch.object(postfix_mod, "find_postconf", return_value=None)
    mocker.patch.object(exim_mod, "find_exim", return_value="/usr/sbin/exim4")
    mocker.patch.object(exim_mod.EximBackend, "_option", side_effect=lambda name, boolean=False:
                        "no" if boolean else str(tmp_path))
    assert isinstance(backend_for(Config(mta="auto")), exim_mod.EximBackend)
    mocker.patch.object(exim_mod, "find_exim", return_value=None)
    with pytest.raises(Exception) as error:
        backend_for(Config(mta="auto"))
    assert getattr(error.value, "exit_code", None) == 69
