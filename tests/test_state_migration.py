"""The state database upgrades in place, and its history does not grow forever.

A state directory written by the release before schema versions (0.1, its
schema copied below as it shipped) must keep every hold, with its reason,
through the first run of this release; runs older than ``history_days`` go.
Over the memory back end, so it runs on any machine.
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from memory_harness import MemoryHarness
from qrunner_e2e import SKIP_ALL, Qrunner

from qrunner.state import SCHEMA_VERSION

pytestmark = pytest.mark.memory

RELEASE_0_1_SCHEMA = """
CREATE TABLE IF NOT EXISTS holds (
    instance  TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    arrival   INTEGER NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('holding', 'held', 'releasing')),
    held_at   REAL NOT NULL,
    senders   TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (instance, queue_id, arrival)
);
CREATE TABLE IF NOT EXISTS attempts (
    instance  TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    arrival   INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    last      REAL NOT NULL,
    PRIMARY KEY (instance, queue_id, arrival)
);
CREATE TABLE IF NOT EXISTS routed (
    instance  TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    original  TEXT NOT NULL,
    original_arrival INTEGER NOT NULL,
    sender    TEXT NOT NULL,
    started   REAL NOT NULL,
    accepted  REAL NOT NULL,
    PRIMARY KEY (instance, queue_id, accepted)
);
CREATE TABLE IF NOT EXISTS runs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    instance  TEXT NOT NULL,
    command   TEXT NOT NULL,
    started   REAL NOT NULL,
    finished  REAL,
    listed    INTEGER DEFAULT 0,
    sent      INTEGER DEFAULT 0,
    held      INTEGER DEFAULT 0,
    released  INTEGER DEFAULT 0,
    errors    INTEGER DEFAULT 0,
    outcome   TEXT
);
CREATE TABLE IF NOT EXISTS dispatches (
    run_id    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    queue_id  TEXT NOT NULL,
    arrival   INTEGER NOT NULL,
    priority  INTEGER NOT NULL,
    sender    TEXT NOT NULL,
    result    TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""


def release_0_1_state(state_dir: str, instance: str, holds, routed=()) -> None:
    """A state database exactly as qrunner 0.1 left it: holds, a routed copy, a run."""
    os.makedirs(state_dir, exist_ok=True)
    with sqlite3.connect(os.path.join(state_dir, "qrunner.sqlite")) as db:
        db.executescript(RELEASE_0_1_SCHEMA)
        db.executemany("INSERT INTO holds VALUES (?, ?, ?, 'held', ?, ?, ?)",
                       [(instance, queue_id, arrival, time.time() - 600, senders, reason)
                        for queue_id, arrival, senders, reason in holds])
        db.executemany("INSERT INTO routed VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(instance,) + tuple(row) for row in routed])
        db.execute("INSERT INTO runs (instance, command, started, finished, listed, held, outcome) "
                   "VALUES (?, 'run', ?, ?, 2, 2, 'ok')", (instance, time.time() - 600, time.time() - 599))


def test_holds_of_the_previous_release_survive_the_upgrade_with_their_reasons(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    ids = [mta.queue_message(f"held by 0.1, #{i}") for i in range(2)]
    for queue_id in ids:
        mta.admin_hold(queue_id)  # the MTA shows them held, as 0.1 left them
    instance = f"memory:{os.path.realpath(mta.directory)}"
    holds = [(queue_id, mta.arrival(queue_id), "default", f"reason {n} from 0.1") for n, queue_id in enumerate(ids)]
    mta.set(routes_down=["isp"])  # the copy's relay is down: it waits on its route
    copy = mta.queue.submit("alice@qrunner-test.localdomain", ["bob@example.net"], b"Subject: copy\n\nx\n",
                            route="isp")  # a copy 0.1 handed to sender isp, still queued on its route
    release_0_1_state(qr.state_dir, instance, holds, routed=[(copy, "M00000042", 1000, "isp", 1.0, 2.0)])

    look = qr("status")  # read-only, before any run has upgraded the file
    assert look.code == 0, look.stderr
    assert all(queue_id in look.stdout for queue_id in ids) and "reason 1 from 0.1" in look.stdout
    upgrade = qr("release", "M00000077")  # a command that writes: the file is upgraded on disk ...
    assert upgrade.code == 1 and "not held by qrunner" in upgrade.stderr, upgrade.stderr
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    upgraded = qr("status").stdout  # ... and read from disk as it is now
    for queue_id, _, _, reason in holds:
        [row] = [line for line in upgraded.splitlines() if line.startswith(queue_id)]
        assert row.split()[3:] == ["?", "default", "?"] + reason.split()  # "?": 0.1 kept no envelope sender, no priority
        assert row.split()[1] == time.strftime("%Y-%m-%d", time.localtime(time.time() - 600))

    run = qr("run")

    assert run.code == 0, run.stderr
    assert "alice@qrunner-test.localdomain" in qr("status").stdout  # the run filled in the envelope sender
    assert "action=hold" not in run.stderr and "dropped" not in run.stderr  # still qrunner's holds
    assert copy not in run.stderr and "listed=2" in run.stderr  # the copy is never decided again
    status = qr("status").stdout
    for queue_id, _, _, _ in holds:
        [row] = [line for line in status.splitlines() if line.startswith(queue_id)]
        assert row.endswith("not now")  # the run refreshed the reason; the hold itself survived
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT queue_id, original, sender FROM copies").fetchall() == [(copy, "M00000042", "isp")]


def test_history_older_than_history_days_is_pruned(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, SKIP_ALL, extra_config="history_days = 7")
    assert qr("run").code == 0
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        db.execute("UPDATE runs SET started = ?", (time.time() - 8 * 86400,))
        db.execute("INSERT INTO dispatches VALUES ((SELECT max(id) FROM runs), 1, 'M00000001', 1, 50, 'd', 'x')")
    mta.queue_message("recent")

    assert qr("run").code == 0

    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 1  # only the run just now
        assert db.execute("SELECT count(*) FROM dispatches").fetchone()[0] == 0


def test_a_state_database_of_a_newer_release_is_refused(tmp_path):
    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    assert qr("run").code == 0
    with sqlite3.connect(os.path.join(qr.state_dir, "qrunner.sqlite")) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    for command in (["run"], ["status"], ["plan"]):
        result = qr(*command)
        assert result.code == 78 and "newer than this qrunner knows" in result.stderr, result.stderr


# A writer killed in the middle of a big transaction: SQLite has written the journal and some of the
# database's pages (its cache was full), then the process died. The journal is hot.
KILLED_MID_TRANSACTION = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 1")
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE holds SET reason = 'never committed'")
db.execute("CREATE TABLE spill (pad)")
db.executemany("INSERT INTO spill VALUES (?)", [("x" * 500,)] * 2000)
os._exit(0)
"""


def test_a_run_killed_in_a_commit_leaves_status_plan_and_dry_run_readable(tmp_path):
    """issue 14 finding (a): a hot journal made every read-only look exit 78 until the next run that writes."""
    import subprocess
    import sys

    mta = MemoryHarness(str(tmp_path / "queue"))
    qr = Qrunner(tmp_path, mta, SKIP_ALL)
    held = mta.queue_message("held")
    assert qr("run").code == 0
    database = os.path.join(qr.state_dir, "qrunner.sqlite")
    subprocess.run([sys.executable, "-c", KILLED_MID_TRANSACTION, database], check=True)
    assert os.path.getsize(database + "-journal") > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # what status, plan and dry runs met
        sqlite3.connect(f"file:{database}?mode=ro", uri=True).execute("SELECT reason FROM holds").fetchall()

    status = qr("status")
    plan = qr("plan")
    dry = qr("run", "--dry-run")

    assert status.code == 0 and held in status.stdout and "not now" in status.stdout, status
    assert "never committed" not in status.stdout  # the last commit, not the dead writer's half
    assert plan.code == 0 and dry.code == 0, (plan, dry)
    assert os.path.exists(database + "-journal")  # the looks wrote nothing: the real files wait for ...
    assert qr("run").code == 0  # ... the next run that writes, which rolls them back itself
    assert "never committed" not in qr("status").stdout and not os.path.exists(database + "-journal")
