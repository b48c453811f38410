"""qrunner's own records, in SQLite under ``state_dir``.

What is here: the holds qrunner made (who, when, for which senders, why),
the order in which each run scheduled messages, each run's summary, and,
for an MTA that keeps no retry schedule for gated mail (Exim's named
queue), how often qrunner dispatched a message that is still queued.
What is not here: anything the MTA already knows. The queue is the truth;
these records only say which of its holds are qrunner's.

Crash safety follows Postfix's rule that every step may be repeated: a
hold is recorded (``holding``) before ``postsuper -h`` runs and marked
``held`` after; a release is marked ``releasing`` before ``postsuper -H``
runs and the record deleted after. :meth:`State.reconcile` settles any
record a crash left half-way against what the queue shows, so no hold
qrunner made can ever look like an admin's.

Records are keyed by (instance, queue id, arrival time): ``instance`` names
the MTA instance (for Postfix its queue directory, so two ``postmulti``
instances never mix), and the arrival time tells a message from a later one
that reuses its short queue id.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from qrunner.exceptions import ConfigError, LockHeldError, NoPermissionError

SCHEMA = """
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

DB_NAME = "qrunner.sqlite"
LOCK_NAME = "qrunner.lock"


@dataclass(frozen=True)
class Hold:
    """One hold qrunner made."""

    queue_id: str
    arrival: int
    state: str
    held_at: float
    senders: str
    reason: str

    @property
    def key(self) -> Tuple[str, int]:
        return (self.queue_id, self.arrival)


@dataclass
class RunSummary:
    """What one run did, for the summary log line and ``qrunner status``."""

    command: str
    started: float
    listed: int = 0
    sent: int = 0
    held: int = 0
    released: int = 0
    errors: int = 0
    finished: Optional[float] = None
    failed: int = 0  # messages qrunner could not act on (not stored; counted in the exit code)
    outcome: str = ""

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started


def _ensure_dir(state_dir: str) -> None:
    try:
        # 0711: others may pass (Exim's delivery user reads exim-routes here) but not list;
        # the database and the lock are 0600.
        os.makedirs(state_dir, mode=0o711, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{state_dir}: cannot create the state directory ({exc.strerror}); "
                          "set 'state_dir' to a directory qrunner may write.")


class RunLock:
    """One run at a time: an flock on ``state_dir/qrunner.lock`` holding our PID."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, LOCK_NAME)
        self.state_dir = state_dir
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        _ensure_dir(self.state_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the lock file ({exc.strerror}); "
                              "check 'state_dir' and that qrunner runs as root.")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(f"another qrunner run (PID {holder}) holds the lock {self.path}; "
                                "try again when it has finished.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


class State:
    """The state database of one MTA instance."""

    def __init__(self, state_dir: str, instance: str, readonly: bool = False):
        self.instance = instance
        path = os.path.join(state_dir, DB_NAME)
        if readonly:
            self.db = self._open_readonly(state_dir, path)
            return
        _ensure_dir(state_dir)
        try:
            self.db = sqlite3.connect(path, timeout=30)
            self.db.executescript(SCHEMA)
            os.chmod(path, 0o600)  # holds and reasons are the admin's business only
        except sqlite3.Error as exc:
            raise ConfigError(f"{path}: cannot use the state database ({exc}); check 'state_dir'.")

    @staticmethod
    def _open_readonly(state_dir: str, path: str) -> sqlite3.Connection:
        """The records as they are, for plan, status and dry runs: never written, never created.

        A state directory this user may not read is an error (77), not an
        empty record: "no holds" must never be said when it is not known.
        """
        try:
            os.stat(path)
        except FileNotFoundError:
            if os.path.isdir(state_dir) and not os.access(state_dir, os.R_OK | os.X_OK):
                raise NoPermissionError(f"{state_dir}: cannot read qrunner's state directory; run as root.")
            db = sqlite3.connect(":memory:")
            db.executescript(SCHEMA)
            return db
        except PermissionError:
            raise NoPermissionError(f"{state_dir}: cannot read qrunner's state directory; run as root.")
        if not os.access(path, os.R_OK):
            raise NoPermissionError(f"{path}: cannot read qrunner's state database; run as root.")
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            db.execute("SELECT count(*) FROM holds").fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"{path}: cannot read the state database ({exc}); check 'state_dir'.")
        return db

    def close(self) -> None:
        self.db.close()

    # -- holds -------------------------------------------------------------

    def holds(self) -> Dict[Tuple[str, int], Hold]:
        rows = self.db.execute(
            "SELECT queue_id, arrival, state, held_at, senders, reason FROM holds WHERE instance = ? "
            "ORDER BY held_at, queue_id", (self.instance,))
        return {(r[0], r[1]): Hold(*r) for r in rows}

    def record_holding(self, holds: Iterable[Tuple[str, int, str, str]]) -> None:
        """Before ``postsuper -h``: (queue id, arrival, senders, reason) per message."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT INTO holds (instance, queue_id, arrival, state, held_at, senders, reason) "
                "VALUES (?, ?, ?, 'holding', ?, ?, ?) "
                "ON CONFLICT (instance, queue_id, arrival) DO UPDATE SET senders = excluded.senders, "
                "reason = excluded.reason",
                [(self.instance, qid, arrival, now, senders, reason) for qid, arrival, senders, reason in holds])

    def mark_held(self, keys: Iterable[Tuple[str, int]]) -> None:
        self._set_state(keys, "held")

    def update_reason(self, keys_reasons: Iterable[Tuple[str, int, str, str]]) -> None:
        """A message still held: the latest run's senders and reason."""
        with self.db:
            self.db.executemany(
                "UPDATE holds SET senders = ?, reason = ? WHERE instance = ? AND queue_id = ? AND arrival = ?",
                [(senders, reason, self.instance, qid, arrival) for qid, arrival, senders, reason in keys_reasons])

    def mark_releasing(self, keys: Iterable[Tuple[str, int]]) -> None:
        self._set_state(keys, "releasing")

    def forget(self, keys: Iterable[Tuple[str, int]]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM holds WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                [(self.instance, qid, arrival) for qid, arrival in keys])

    def _set_state(self, keys: Iterable[Tuple[str, int]], state: str) -> None:
        with self.db:
            self.db.executemany("UPDATE holds SET state = ? WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                [(state, self.instance, qid, arrival) for qid, arrival in keys])

    def reconcile(self, queue: Dict[Tuple[str, int], str]) -> List[str]:
        """Settle every record against the queue (queue id, arrival) -> queue name.

        A record whose message is on hold is qrunner's hold (``held``),
        whatever step a crash interrupted. A record whose message is
        elsewhere or gone is no hold any more and is dropped. Returns log
        lines for what changed.
        """
        notes = []
        held, gone = [], []
        for key, hold in self.holds().items():
            where = queue.get(key)
            if where == "hold":
                if hold.state != "held":
                    held.append(key)
                    notes.append(f"{key[0]}: record of an interrupted {hold.state} settled: message is on hold")
            else:
                gone.append(key)
                if hold.state == "held":
                    what = f"now in the {where} queue" if where else "no longer in the queue"
                    notes.append(f"{key[0]}: qrunner's hold record dropped: message {what} "
                                 "(released, delivered or deleted by someone else)")
                else:
                    notes.append(f"{key[0]}: record of an interrupted {hold.state} settled: message not on hold")
        self.mark_held(held)
        self.forget(gone)
        with self.db:
            present = {qid for qid, _ in queue}
            # A copy's record lives while the copy or its original is queued: the original
            # of a hand-over a crash interrupted must be deleted, not handed over again.
            self.db.executemany(
                "DELETE FROM routed WHERE instance = ? AND queue_id = ? AND original = ?",
                [(self.instance, qid, original) for qid, original, arrival in self._routed_rows()
                 if qid not in present and (original, arrival) not in queue])
            stale = [k for k in self.attempts() if k not in queue]
            self.db.executemany("DELETE FROM attempts WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                [(self.instance, qid, arrival) for qid, arrival in stale])
        return notes

    # -- copies handed to a sender (Postfix re-injection) ----------------------

    def record_routed(self, queue_id: str, original: Tuple[str, int], sender: str, started: float,
                      accepted: float) -> None:
        """A copy the sender's listener accepted: never to be decided or handed over again."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO routed VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (self.instance, queue_id, original[0], original[1], sender, started, accepted))

    def _routed_rows(self) -> List[Tuple[str, str, int]]:
        try:
            return self.db.execute("SELECT queue_id, original, original_arrival FROM routed WHERE instance = ?",
                                   (self.instance,)).fetchall()
        except sqlite3.OperationalError:  # a database from before this table, opened read-only
            return []

    def routed(self) -> Dict[str, Tuple[float, float]]:
        """queue id of each routed copy -> the window in which it arrived (started, accepted)."""
        try:
            rows = self.db.execute("SELECT queue_id, started, accepted FROM routed WHERE instance = ?",
                                   (self.instance,)).fetchall()
        except sqlite3.OperationalError:
            return {}
        return {r[0]: (r[1], r[2]) for r in rows}

    def handed_over(self) -> Dict[Tuple[str, int], Tuple[str, str]]:
        """(original id, arrival) of each hand-over -> (the copy's queue id, sender)."""
        try:
            rows = self.db.execute("SELECT original, original_arrival, queue_id, sender FROM routed "
                                   "WHERE instance = ?", (self.instance,)).fetchall()
        except sqlite3.OperationalError:
            return {}
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    # -- dispatch attempts (qrunner's own retry pacing) ----------------------

    def attempts(self) -> Dict[Tuple[str, int], Tuple[int, float]]:
        """(queue id, arrival) -> (attempts so far, time of the last one)."""
        try:
            rows = self.db.execute("SELECT queue_id, arrival, count, last FROM attempts WHERE instance = ?",
                                   (self.instance,)).fetchall()
        except sqlite3.OperationalError:  # a database from before this table, opened read-only
            return {}
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    def note_attempts(self, keys: Iterable[Tuple[str, int]]) -> None:
        """A dispatch that left the message queued: one more attempt, now."""
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT INTO attempts (instance, queue_id, arrival, count, last) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (instance, queue_id, arrival) DO UPDATE SET count = count + 1, last = excluded.last",
                [(self.instance, qid, arrival, now) for qid, arrival in keys])

    # -- runs --------------------------------------------------------------

    def start_run(self, summary: RunSummary) -> int:
        with self.db:
            cursor = self.db.execute("INSERT INTO runs (instance, command, started) VALUES (?, ?, ?)",
                                     (self.instance, summary.command, summary.started))
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, summary: RunSummary) -> None:
        with self.db:
            self.db.execute(
                "UPDATE runs SET finished = ?, listed = ?, sent = ?, held = ?, released = ?, errors = ?, "
                "outcome = ? WHERE id = ?",
                (summary.finished, summary.listed, summary.sent, summary.held, summary.released,
                 summary.errors, summary.outcome, run_id))

    def record_dispatches(self, run_id: int, rows: Sequence[Tuple[int, str, int, int, str, str]]) -> None:
        """The order a run scheduled messages: (seq, queue id, arrival, priority, sender, result)."""
        with self.db:
            self.db.executemany(
                "INSERT INTO dispatches (run_id, seq, queue_id, arrival, priority, sender, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", [(run_id,) + tuple(r) for r in rows])

    def last_run(self) -> Optional[Tuple[int, RunSummary]]:
        row = self.db.execute(
            "SELECT id, command, started, listed, sent, held, released, errors, finished, outcome FROM runs "
            "WHERE instance = ? AND finished IS NOT NULL ORDER BY id DESC LIMIT 1", (self.instance,)).fetchone()
        if row is None:
            return None
        command, started, listed, sent, held, released, errors, finished, outcome = row[1:]
        return row[0], RunSummary(command=command, started=started, listed=listed, sent=sent, held=held,
                                  released=released, errors=errors, finished=finished, outcome=outcome)
