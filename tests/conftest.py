"""Shared test setup: the Postfix and Exim fixtures for every module, and no silent skips in CI."""

import os

import pytest

import safe_tmp

pytest_plugins = ["postfix_fixtures", "exim_fixtures", "figures"]

# Every qrunner the tests start would write its lines to this host's mail log; tests/test_system_log.py
# turns it back on inside namespaces with loggers of their own.
os.environ["QRUNNER_TEST_NO_SYSTEM_LOG"] = "1"

# As root, qrunner refuses a configuration or script under /tmp (strict modes, qrunner/trust.py): tmp_path goes
# under a root-owned 0755 directory instead (pytest's documented temporary root), rather than relaxing the check.
if os.geteuid() == 0 and "PYTEST_DEBUG_TEMPROOT" not in os.environ:
    os.environ["PYTEST_DEBUG_TEMPROOT"] = safe_tmp.root()


REAL_MTA_FIXTURES = {"postfix_available", "exim_available"}


def pytest_collection_modifyitems(config, items):
    """Mark what needs a real MTA, and the memory back end's end-to-end runs (``-m memory``: the coverage gate).

    A memory run is a shared case parametrized with ``mta="memory"`` or a test using the ``memory`` fixture;
    a reliability case (``@pytest.mark.reliability``: faults, hostile input, load) is not one, even over the
    memory back end: those are many subprocess runs each, slow under coverage, and the gate is met without them.
    """
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if REAL_MTA_FIXTURES & set(item.fixturenames) or params.get("mta") in ("postfix", "exim"):
            item.add_marker(pytest.mark.real_mta)
        elif item.get_closest_marker("reliability"):
            continue  # a fault, hostile-input or load case: run once, in the main pass, not under coverage
        elif params.get("mta") == "memory" or "memory" in item.fixturenames:
            item.add_marker(pytest.mark.memory)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Under QRUNNER_REQUIRE_MTA=1 (CI, make test as root) a skipped test fails the run."""
    if os.environ.get("QRUNNER_REQUIRE_MTA") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"QRUNNER_REQUIRE_MTA=1: {skipped} tests were skipped; every test must run here.",
                            red=True)
        session.exitstatus = 1
