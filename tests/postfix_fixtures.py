"""pytest fixtures for tests that need a real Postfix and an SMTP sink.

``tests/conftest.py`` loads them for every test module with
``pytest_plugins = ["postfix_fixtures"]``.

- ``postfix_available`` (session): skips the test with the reason when no
  private Postfix can run here (Postfix not installed, not root). With
  ``QRUNNER_REQUIRE_MTA=1`` in the environment (CI, ``make test`` after the
  installer ran) it fails instead, so that a broken setup cannot pass as
  "all skipped".
- ``smtp_sink``: the SMTP sink the instance relays to, emptied (and its
  refusal lists reset) for each test.
- ``postfix``: a started :class:`PostfixInstance`. Starting one costs about
  2.5 s (``postfix start`` creates the queue directories), so one instance
  serves a whole test module; before each test its queues are emptied and
  its main.cf restored if a test changed it, which keeps tests independent.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

try:  # tests/ is on sys.path (conftest.py's pytest_plugins = ["postfix_fixtures"])
    from postfix_instance import PostfixInstance, make_instance, postfix_missing_reason
    from mta_available import skip_or_fail
    from smtp_sink import SmtpSink
except ImportError:  # pragma: no cover - loaded as tests.postfix_fixtures
    from tests.postfix_instance import PostfixInstance, make_instance, postfix_missing_reason
    from tests.mta_available import skip_or_fail
    from tests.smtp_sink import SmtpSink

@pytest.fixture(scope="session")
def postfix_available() -> None:
    """Skip (or, under QRUNNER_REQUIRE_MTA=1, fail) when Postfix cannot run here."""
    skip_or_fail(postfix_missing_reason())


@pytest.fixture(scope="module")
def _module_smtp_sink(postfix_available) -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def smtp_sink(_module_smtp_sink: SmtpSink) -> Iterator[SmtpSink]:
    """The SMTP sink that the ``postfix`` instance relays to, empty."""
    _module_smtp_sink.clear()
    yield _module_smtp_sink
    _module_smtp_sink.clear()


@pytest.fixture(scope="module")
def _module_postfix(_module_smtp_sink: SmtpSink) -> Iterator[PostfixInstance]:
    instance = make_instance(_module_smtp_sink.port)
    try:
        instance.start()
    except Exception as exc:
        instance.cleanup()
        pytest.fail("could not start a private Postfix instance: %s" % exc, pytrace=False)
    yield instance
    instance.cleanup()


@pytest.fixture
def postfix(_module_postfix: PostfixInstance, smtp_sink: SmtpSink) -> Iterator[PostfixInstance]:
    """A running private Postfix instance with empty queues, gate mode on."""
    instance = _module_postfix
    main_cf = os.path.join(instance.config_directory, "main.cf")
    with open(main_cf, "rb") as f:
        pristine = f.read()
    pristine_settings = dict(instance.settings)
    if not instance.is_running():
        instance.start()
    instance.delete_all()
    yield instance
    with open(main_cf, "rb") as f:
        changed = f.read() != pristine
    if changed:
        with open(main_cf, "wb") as f:
            f.write(pristine)
        instance.settings = pristine_settings
    if not instance.is_running():
        instance.start()
    elif changed:
        instance.reload()
    instance.delete_all()
