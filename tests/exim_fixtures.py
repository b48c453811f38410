"""pytest fixtures for tests that need a real Exim and an SMTP sink.

``tests/conftest.py`` loads them for every test module with
``pytest_plugins = [..., "exim_fixtures"]``.

- ``exim_available`` (session): skips the test with the reason when no
  private Exim can run here (``tests/setup/install-exim.sh`` has not
  unpacked it, not root). With ``QRUNNER_REQUIRE_MTA=1`` in the
  environment (CI, ``make test`` as root) it fails instead, so that a
  broken setup cannot pass as "all skipped".
- ``exim_sink``: the SMTP sink the instance relays to, emptied (and its
  refusal lists and delay reset) for each test. A sink of its own, apart
  from the Postfix fixtures' ``smtp_sink``, so that a module may use both.
- ``exim``: a private :class:`EximInstance` with empty queues and its
  pristine configuration. Creating one only writes a configuration file
  and checks it with ``exim -bV`` (no daemon: see tests/exim_instance.py),
  but one instance still serves a whole module; before each test its
  queues are emptied and its configuration restored if a test changed it.
"""

from __future__ import annotations

from typing import Iterator

import pytest

try:  # tests/ is on sys.path (conftest.py's pytest_plugins)
    from exim_instance import EximInstance, exim_missing_reason, make_instance
    from mta_available import skip_or_fail
    from smtp_sink import SmtpSink
except ImportError:  # pragma: no cover - loaded as tests.exim_fixtures
    from tests.exim_instance import EximInstance, exim_missing_reason, make_instance
    from tests.mta_available import skip_or_fail
    from tests.smtp_sink import SmtpSink

@pytest.fixture(scope="session")
def exim_available() -> None:
    """Skip (or, under QRUNNER_REQUIRE_MTA=1, fail) when Exim cannot run here."""
    skip_or_fail(exim_missing_reason())


@pytest.fixture(scope="module")
def _module_exim_sink(exim_available) -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def exim_sink(_module_exim_sink: SmtpSink) -> Iterator[SmtpSink]:
    """The SMTP sink that the ``exim`` instance relays to, empty."""
    _module_exim_sink.clear()
    yield _module_exim_sink
    _module_exim_sink.clear()


@pytest.fixture(scope="module")
def _module_exim(_module_exim_sink: SmtpSink) -> Iterator[EximInstance]:
    instance = make_instance(_module_exim_sink.port)
    try:
        instance.start()
    except Exception as exc:
        instance.cleanup()
        pytest.fail("could not set up a private Exim instance: %s" % exc, pytrace=False)
    yield instance
    instance.cleanup()


@pytest.fixture
def exim(_module_exim: EximInstance, exim_sink: SmtpSink) -> Iterator[EximInstance]:
    """A private Exim instance with empty queues, gate on, pristine configuration."""
    instance = _module_exim
    pristine = (dict(instance.settings), instance.extra_routers, instance.extra_transports)
    instance.delete_all()
    yield instance
    # Let a slow delivery a test started finish before the queues are emptied.
    exim_sink.data_delay = 0
    instance.stop()
    if (dict(instance.settings), instance.extra_routers, instance.extra_transports) != pristine:
        instance.settings, instance.extra_routers, instance.extra_transports = (
            pristine[0], pristine[1], pristine[2])
        instance.write_config()
    instance.delete_all()
