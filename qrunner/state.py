"""qrunner's own records, in SQLite under ``state_dir``, and the run lock.

What is here: the holds qrunner made (who, when, for which senders, why);
the copies it handed to a sender's route (Postfix re-injection), so that an
original is never handed over twice; for an MTA that keeps no retry
schedule for gated mail (Exim's named queue), how often qrunner dispatched
a message that is still queued; each run's summary and the order in which
it scheduled messages. What is not here: anything the MTA already knows.
The queue is the truth; these records say which of its holds are qrunner's.

Crash safety follows Postfix's rule that every step may be repeated: a hold
is recorded (``holding``) before the MTA is asked and marked ``held`` after;
a release is marked ``releasing`` before and the record deleted after.
:func:`settle` (the reconcile stage) turns any record a crash left half-way
into what the queue shows, so no hold qrunner made can look like an admin's.

Records are keyed by instance and :class:`~qrunner.decision.MessageKey`:
``instance`` names the MTA instance (Postfix: its queue directory, so two
``postmulti`` instances never mix), the key's arrival second tells a
message from a later one that reuses its short queue id.

The schema has a version (SQLite's ``user_version``) and migrations, so a
state directory of an earlier release is upgraded in place by the first run
that writes; history older than ``history_days`` is pruned by every such run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from qrunner.decision import MessageKey
from qrunner.exceptions import ConfigError, LockHeldError, NoPermissionError, StateError
from qrunner.message import QueueState, frozen_record

log = logging.getLogger("qrunner.state")

DB_NAME = "qrunner.sqlite"
LOCK_NAME = "qrunner.lock"

# Each migration takes the schema from the version before it to its own.
# Version 1 is the schema of the releases before versioning (user_version 0):
# its CREATE ... IF NOT EXISTS statements leave such a database as it is and
# create what an even older one lacks.
MIGRATIONS: Tuple[Tuple[int, str, str], ...] = (
    (1, "the schema of the first releases", """
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
"""),
    (2, "copies are recognised by the route stamped in their queue file, not by an arrival window", """
CREATE TABLE copies (
    instance  TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    original  TEXT NOT NULL,
    original_arrival INTEGER NOT NULL,
    sender    TEXT NOT NULL,
    recorded  REAL NOT NULL,
    PRIMARY KEY (instance, queue_id, original, original_arrival)
);
INSERT OR IGNORE INTO copies SELECT instance, queue_id, original, original_arrival, sender, accepted FROM routed;
DROP TABLE routed;
CREATE INDEX runs_by_start ON runs (instance, started);
"""),
    (3, "status shows each hold's envelope sender; the release summary counts what it moved", """
ALTER TABLE holds ADD COLUMN envelope_sender TEXT;
ALTER TABLE runs ADD COLUMN moved INTEGER DEFAULT 0;
"""),
    (4, "metrics: each run's exit code and whether it completed its plan; cumulative counters", """
ALTER TABLE runs ADD COLUMN exit_code INTEGER;
ALTER TABLE runs ADD COLUMN succeeded INTEGER;
CREATE TABLE counters (
    instance  TEXT NOT NULL,
    name      TEXT NOT NULL,
    sender    TEXT NOT NULL,
    value     INTEGER NOT NULL,
    PRIMARY KEY (instance, name, sender)
);
"""),
    (5, "selectors: the priority the policy gave a hold; who ran each command, and how", """
ALTER TABLE holds ADD COLUMN priority INTEGER;
ALTER TABLE runs ADD COLUMN invoked_by TEXT;
ALTER TABLE runs ADD COLUMN command_line TEXT;
"""),
    (6, "explain shows a message's history: each action a command took on it, with the run that took it", """
CREATE TABLE history (
    instance  TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    arrival   INTEGER NOT NULL,
    at        REAL NOT NULL,
    run_id    INTEGER NOT NULL,
    action    TEXT NOT NULL,
    sender    TEXT NOT NULL DEFAULT '',
    priority  INTEGER,
    reason    TEXT NOT NULL DEFAULT '',
    new_queue_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX history_by_message ON history (instance, queue_id);
CREATE INDEX history_by_copy ON history (instance, new_queue_id) WHERE new_queue_id != '';
"""),
    (7, "exactly-once hand-over: a copy its listener holds is released only once its original is gone", """
ALTER TABLE copies ADD COLUMN released INTEGER NOT NULL DEFAULT 1;
"""),
    (8, "every run's prune finds the old history by its time and a run's history by the run, not by reading it all", """
CREATE INDEX history_by_time ON history (instance, at);
CREATE INDEX history_by_run ON history (run_id);
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


@frozen_record
class Hold:
    """One hold qrunner made."""

    queue_id: str
    arrival: int
    state: str
    held_at: float
    senders: str
    reason: str
    envelope_sender: Optional[str] = None  # None: held by a release that did not record it
    priority: Optional[int] = None  # the policy's priority when it held it; None: recorded before 0.5's schema

    @property
    def key(self) -> MessageKey:
        return MessageKey(self.queue_id, self.arrival)


@frozen_record
class Event:
    """One action a command took on one message, as the executor logged it: what ``explain`` shows later.

    ``action`` is the log's ``action=`` word (hold, release, send, route,
    delete, handback, move, vanished); ``reason`` what the line said why
    (or how a send failed); ``new_queue_id`` the copy's id of a route.
    """

    key: MessageKey
    action: str
    sender: str = ""
    priority: Optional[int] = None
    reason: str = ""
    new_queue_id: str = ""


@frozen_record
class HistoryEntry:
    """A recorded :class:`Event` with when and by which run it happened.

    ``run_id`` and ``command`` name the run (``run``, ``flush``,
    ``release``) that acted, so whatever the runs table learns about a
    command (who ran it) belongs to each of its entries too; ``command`` is
    None when that run's record was pruned.
    """

    at: float
    run_id: int
    command: Optional[str]
    event: Event
    invoked_by: Optional[str] = None  # who ran that command (None: not recorded, or its run pruned)


@frozen_record
class Copy:
    """A copy a sender's route accepted for an original (Postfix re-injection)."""

    queue_id: str
    original: MessageKey
    sender: str
    released: bool = True  # False: the listener put it on hold, and qrunner has not released it yet


@dataclass
class Records:
    """Everything the state database says about one MTA instance, read once per run."""

    holds: Dict[MessageKey, Hold] = field(default_factory=dict)
    copies: List[Copy] = field(default_factory=list)
    attempts: Dict[MessageKey, Tuple[int, float]] = field(default_factory=dict)

    def copies_by_id(self) -> Dict[str, Copy]:
        return {c.queue_id: c for c in self.copies}

    def handed(self) -> Dict[MessageKey, Copy]:
        """Each original whose copy a sender's route accepted -> that copy."""
        return {c.original: c for c in self.copies}


@dataclass
class Settlement:
    """What reconciling the records with the queue changes, and a log line for each change."""

    mark_held: List[MessageKey] = field(default_factory=list)
    forget: List[MessageKey] = field(default_factory=list)
    drop_copies: List[Copy] = field(default_factory=list)
    released_copies: List[Copy] = field(default_factory=list)
    drop_attempts: List[MessageKey] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def settle(records: Records, queue: Mapping[MessageKey, str]) -> Settlement:
    """Reconcile: settle every record against the queue (key -> :class:`QueueState`).

    A hold record whose message is on hold is qrunner's hold (``held``),
    whatever step a crash interrupted. A hold record whose message is
    elsewhere or gone is no hold any more. A copy's record lives while the
    copy or its original is queued: the original of a hand-over a crash
    interrupted must be removed, not handed over again. Pure: the caller
    applies the result (:meth:`State.apply`) or, in a dry run, only looks.
    """
    result = Settlement()
    for key, hold in records.holds.items():
        where = queue.get(key)
        if where == QueueState.HELD:
            if hold.state != "held":
                result.mark_held.append(key)
                result.notes.append(f"{key.queue_id}: record of an interrupted {hold.state} settled: message is on hold")
            continue
        result.forget.append(key)
        if hold.state == "held":
            what = f"now {where}" if where else "no longer in the queue"
            result.notes.append(f"{key.queue_id}: qrunner's hold record dropped: message {what} "
                                "(released, delivered or deleted by someone else)")
        else:
            result.notes.append(f"{key.queue_id}: record of an interrupted {hold.state} settled: message not on hold")
    present = {key.queue_id: where for key, where in queue.items()} if records.copies else {}
    result.drop_copies = [c for c in records.copies if c.queue_id not in present and c.original not in queue]
    # A release a crash interrupted after Postfix moved the copy: the queue says it is released.
    result.released_copies = [c for c in records.copies if not c.released and c.queue_id in present
                              and present[c.queue_id] != QueueState.HELD]
    result.drop_attempts = [key for key in records.attempts if key not in queue]
    return result


def settled(records: Records, settlement: Settlement) -> Records:
    """The records as they are once ``settlement`` is applied (what a dry run plans with)."""
    forget = set(settlement.forget)
    holds = {k: h for k, h in records.holds.items() if k not in forget}
    for key in settlement.mark_held:
        holds[key] = dataclasses.replace(holds[key], state="held")
    dropped = set(settlement.drop_copies)
    released = set(settlement.released_copies)
    drop_attempts = set(settlement.drop_attempts)
    attempts = {k: v for k, v in records.attempts.items() if k not in drop_attempts}
    return Records(holds, [dataclasses.replace(c, released=True) if c in released else c
                           for c in records.copies if c not in dropped], attempts)


@dataclass(frozen=True)
class LastRun:
    """A command's last completed run, for the metrics: how long, how it ended, when it last succeeded."""

    command: str
    seconds: float
    exit_code: int
    finished: float
    last_success: Optional[float]
    errors: int


@dataclass
class RunSummary:
    """What one run did, for the summary log line and ``qrunner status``."""

    command: str
    started: float
    listed: int = 0
    sent: int = 0
    held: int = 0
    released: int = 0
    moved: int = 0  # handed back to the MTA's default queue
    expired: int = 0  # past max_hold_age: sent or returned to the sender without the policy (not stored)
    errors: int = 0
    finished: Optional[float] = None
    failed: int = 0  # messages qrunner could not act on (not stored; counted in the exit code)
    unfinished: int = 0  # hand-overs whose original or copy the MTA would not change (not stored; exit 1)
    outcome: str = ""
    exit_code: int = 0
    succeeded: bool = True  # completed its plan: exit 0, or 1 for policy errors only
    invoked_by: str = ""  # who ran it: the user (under sudo, the user who ran sudo), see qrunner.runner.invoker
    command_line: str = ""  # the arguments it was given, for status --history and explain
    run_id: Optional[int] = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started


def _ensure_dir(state_dir: str) -> None:
    try:
        # The database and the lock are 0600 in it; a back end that must let its MTA
        # read a file here (Exim's routes file) opens the directory up itself.
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
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


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, one migration per transaction."""
    version = _version(db)
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{path}: the state database has schema version {version}, newer than this qrunner "
                          f"knows ({SCHEMA_VERSION}); run the qrunner release that wrote it, or a newer one.")
    for number, _why, script in MIGRATIONS:
        if number <= version:
            continue
        # executescript commits what came before it; BEGIN ... COMMIT keeps each migration whole.
        db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")


def _rolled_back_copy(path: str) -> sqlite3.Connection:
    """The database as its last commit left it, when a killed run left a hot journal beside it.

    A read-only connection cannot roll a hot journal back (SQLite says
    "attempt to write a readonly database"), and plan, status and dry runs
    must not write: so the database and its journal are copied into a
    private directory, SQLite rolls the copy back there, and the result is
    read from memory. The real files wait for the next run that writes,
    which rolls them back itself.
    """
    with tempfile.TemporaryDirectory(prefix="qrunner-state-") as scratch:
        copy_path = os.path.join(scratch, "state.sqlite")
        shutil.copyfile(path, copy_path)
        try:
            shutil.copyfile(path + "-journal", copy_path + "-journal")
        except FileNotFoundError:
            pass  # a run that writes rolled it back (or committed) meanwhile: the file alone is consistent
        rolled = sqlite3.connect(copy_path)
        rolled.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the first read rolls the copy back
        memory = sqlite3.connect(":memory:")
        rolled.backup(memory)
        rolled.close()
    return memory


def _decoded(raw: bytes) -> str:
    """Text from the database: UTF-8, and a byte that is not (a file someone else wrote) kept as a surrogate
    escape rather than a traceback on every command that reads the records."""
    return raw.decode("utf-8", "surrogateescape")


# The columns that name a message: a record whose id there is not UTF-8 can be neither an MTA's id nor deleted by
# key (a str with surrogate escapes cannot be bound), so a writing run removes it, said in the log.
_ID_COLUMNS = (("holds", "queue_id"), ("attempts", "queue_id"), ("copies", "queue_id"), ("copies", "original"))


def _drop_undecodable_ids(db: sqlite3.Connection, path: str) -> None:
    for table, column in _ID_COLUMNS:
        # only ids with a byte outside printable ASCII are candidates: no MTA's id has one
        rows = db.execute(f"SELECT rowid, CAST({column} AS BLOB) FROM {table} WHERE {column} GLOB '*[^ -~]*'")
        for rowid, raw in rows.fetchall():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                with db:
                    db.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
                log.warning("%s: a record in %s whose message id is not UTF-8 (%r) was removed: no MTA writes "
                            "such an id", path, table, raw)


class State:
    """The state database of one MTA instance."""

    def __init__(self, state_dir: str, instance: str, readonly: bool = False):
        self.instance = instance
        self.path = os.path.join(state_dir, DB_NAME)
        if readonly:
            self.db = self._open_readonly(state_dir, self.path)
            return
        _ensure_dir(state_dir)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            os.chmod(self.path, 0o600)  # holds and reasons are the admin's business only
            migrate(self.db, self.path)
            self.db.text_factory = _decoded
            _drop_undecodable_ids(self.db, self.path)
        except sqlite3.Error as exc:
            if "locked" in str(exc):
                raise StateError(f"{self.path}: the state database is locked by another program ({exc}); "
                                 "nothing was changed: end the other session that holds it locked.",
                                 locked=True) from None
            raise ConfigError(f"{self.path}: cannot use the state database ({exc}); check 'state_dir'.")

    @staticmethod
    def _open_readonly(state_dir: str, path: str) -> sqlite3.Connection:
        """The records as they are, for plan, status and dry runs: never written, never created.

        A database of an earlier schema is read through an upgraded copy in
        memory, so a look between an upgrade and the first run sees what
        that run will see. A state directory this user may not read is an
        error (77), not an empty record: "no holds" must never be said when
        it is not known.
        """
        try:
            os.stat(path)
        except FileNotFoundError:
            if os.path.isdir(state_dir) and not os.access(state_dir, os.R_OK | os.X_OK):
                raise NoPermissionError(f"{state_dir}: cannot read qrunner's state directory; run as root.")
            db = sqlite3.connect(":memory:")
            migrate(db, path)
            return db
        except PermissionError:
            raise NoPermissionError(f"{state_dir}: cannot read qrunner's state directory; run as root.")
        if not os.access(path, os.R_OK):
            raise NoPermissionError(f"{path}: cannot read qrunner's state database; run as root.")
        try:
            try:
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
                _version(db)
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc) or not os.path.exists(path + "-journal"):
                    raise
                db = _rolled_back_copy(path)
            if _version(db) < SCHEMA_VERSION:
                copy = sqlite3.connect(":memory:")
                db.backup(copy)
                db.close()
                db = copy
                migrate(db, path)
            elif _version(db) > SCHEMA_VERSION:
                migrate(db, path)  # refuses, naming both versions
            db.execute("SELECT count(*) FROM holds").fetchone()
        except sqlite3.Error as exc:
            if "locked" in str(exc):
                raise StateError(f"{path}: the state database is locked by another program ({exc}); "
                                 "end the other session that holds it locked, then look again.",
                                 locked=True) from None
            raise ConfigError(f"{path}: cannot read the state database ({exc}); check 'state_dir'.")
        db.text_factory = _decoded
        return db

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction, committed whole or rolled back; a disk that is full or read-only, or a database an
        admin's ``sqlite3`` session keeps locked past the busy timeout, ends the command with one sentence.

        Every change to the queue is recorded before it is made, so a
        record that cannot be written stops the run before its change,
        and one that cannot be marked done leaves the record the next run
        settles: nothing is lost, and the message says so.
        """
        try:
            with self.db:
                yield
        except sqlite3.Error as exc:
            try:
                self.db.rollback()  # a COMMIT that failed leaves the transaction open before Python 3.10
            except sqlite3.Error:
                pass
            raise StateError(f"{self.path}: cannot write the state database ({exc}); the run stopped before "
                             "its next change to the queue and the next run settles what it left: "
                             + ("end the other session that holds it locked." if "locked" in str(exc) else
                                "free space in 'state_dir' or make it writable."),
                             locked="locked" in str(exc)) from None

    # -- reading -------------------------------------------------------------

    def load(self) -> Records:
        """Every record of this instance, once per run."""
        return Records(self.holds(), self._copies(), self._attempts())

    def holds(self) -> Dict[MessageKey, Hold]:
        rows = self.db.execute(
            "SELECT queue_id, arrival, state, held_at, senders, reason, envelope_sender, priority FROM holds "
            "WHERE instance = ? "
            "ORDER BY held_at, queue_id", (self.instance,))
        # One str for each text the holds repeat (state, who decided, the envelope sender, a reason): SQLite
        # gives a new one per row, and a queue of 100,000 holds would keep each (about 200 bytes a hold).
        texts: Dict[str, str] = {}
        one = texts.setdefault
        holds = {}
        for queue_id, arrival, state, held_at, senders, reason, envelope_sender, priority in rows:
            hold = Hold(queue_id, arrival, one(state, state), held_at, one(senders, senders), one(reason, reason),
                        one(envelope_sender, envelope_sender) if envelope_sender is not None else None, priority)
            holds[MessageKey(queue_id, arrival)] = hold
        return holds

    def _copies(self) -> List[Copy]:
        rows = self.db.execute("SELECT queue_id, original, original_arrival, sender, released FROM copies "
                               "WHERE instance = ?", (self.instance,))
        return [Copy(r[0], MessageKey(r[1], r[2]), r[3], bool(r[4])) for r in rows]

    def _attempts(self) -> Dict[MessageKey, Tuple[int, float]]:
        rows = self.db.execute("SELECT queue_id, arrival, count, last FROM attempts WHERE instance = ?",
                               (self.instance,))
        return {MessageKey(r[0], r[1]): (r[2], r[3]) for r in rows}

    # -- holds -------------------------------------------------------------

    def record_holding(self, holds: Iterable[Tuple[MessageKey, str, str, str, int]]) -> None:
        """Before the MTA is asked to hold: (key, senders, reason, envelope sender, priority) per message.

        A message already on record (one of qrunner's holds being handed
        over) keeps its state and since when it is held; only who, why and
        the priority change.
        """
        now = time.time()
        with self._writing():
            self.db.executemany(
                "INSERT INTO holds (instance, queue_id, arrival, state, held_at, senders, reason, envelope_sender, "
                "priority) VALUES (?, ?, ?, 'holding', ?, ?, ?, ?, ?) "
                "ON CONFLICT (instance, queue_id, arrival) DO UPDATE SET senders = excluded.senders, "
                "reason = excluded.reason, priority = excluded.priority",
                ((self.instance, key.queue_id, key.arrival, now, senders, reason, sender, priority)
                 for key, senders, reason, sender, priority in holds))

    def mark_held(self, keys: Iterable[MessageKey]) -> None:
        self._set_state(keys, "held")

    def update_reason(self, holds: Iterable[Tuple[MessageKey, str, str, str, int]]) -> None:
        """A message still held: the latest run's senders, reason and priority (key, senders, reason, envelope
        sender, priority).

        The envelope sender fills in what a hold recorded before qrunner kept it lacks.
        """
        with self._writing():
            self.db.executemany(
                "UPDATE holds SET senders = ?, reason = ?, envelope_sender = coalesce(envelope_sender, ?), "
                "priority = ? WHERE instance = ? AND queue_id = ? AND arrival = ?",
                ((senders, reason, sender, priority, self.instance, key.queue_id, key.arrival)
                 for key, senders, reason, sender, priority in holds))

    def mark_releasing(self, keys: Iterable[MessageKey]) -> None:
        self._set_state(keys, "releasing")

    def forget(self, keys: Iterable[MessageKey]) -> None:
        with self._writing():
            self.db.executemany("DELETE FROM holds WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                ((self.instance, key.queue_id, key.arrival) for key in keys))

    def _set_state(self, keys: Iterable[MessageKey], state: str) -> None:
        with self._writing():
            self.db.executemany("UPDATE holds SET state = ? WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                ((state, self.instance, key.queue_id, key.arrival) for key in keys))

    def apply(self, settlement: Settlement) -> None:
        """Write what :func:`settle` found (nothing at all when it found nothing to change)."""
        if settlement.mark_held:
            self.mark_held(settlement.mark_held)
        if settlement.forget:
            self.forget(settlement.forget)
        if settlement.released_copies:
            self.mark_copies_released(c.queue_id for c in settlement.released_copies)
        if not (settlement.drop_copies or settlement.drop_attempts):
            return
        with self._writing():
            self.db.executemany(
                "DELETE FROM copies WHERE instance = ? AND queue_id = ? AND original = ? AND original_arrival = ?",
                ((self.instance, c.queue_id, c.original.queue_id, c.original.arrival) for c in settlement.drop_copies))
            self.db.executemany("DELETE FROM attempts WHERE instance = ? AND queue_id = ? AND arrival = ?",
                                ((self.instance, k.queue_id, k.arrival) for k in settlement.drop_attempts))

    # -- copies handed to a sender's route -------------------------------------

    def record_copy(self, queue_id: str, original: MessageKey, sender: str, held: bool = False) -> None:
        """A copy the sender's route accepted: the original must go, never be handed over again.

        ``held``: the listener put the copy on hold as it accepted it; it
        is released (:meth:`mark_copies_released`) once the original is gone.
        """
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO copies (instance, queue_id, original, original_arrival, sender, "
                            "recorded, released) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (self.instance, queue_id, original.queue_id, original.arrival, sender, time.time(),
                             0 if held else 1))

    def forget_copies(self, queue_ids: Iterable[str]) -> None:
        """Copies removed from the listener's hold: their originals are decided again, never removed for them."""
        with self._writing():
            self.db.executemany("DELETE FROM copies WHERE instance = ? AND queue_id = ?",
                                ((self.instance, queue_id) for queue_id in queue_ids))

    def mark_copies_released(self, queue_ids: Iterable[str]) -> None:
        """Copies qrunner released from the listener's hold: a later hold of one is the admin's."""
        with self._writing():
            self.db.executemany("UPDATE copies SET released = 1 WHERE instance = ? AND queue_id = ?",
                                ((self.instance, queue_id) for queue_id in queue_ids))

    # -- dispatch attempts (qrunner's own retry pacing) ----------------------

    def note_attempts(self, keys: Iterable[MessageKey]) -> None:
        """A dispatch that left the message queued: one more attempt, now."""
        now = time.time()
        with self._writing():
            self.db.executemany(
                "INSERT INTO attempts (instance, queue_id, arrival, count, last) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (instance, queue_id, arrival) DO UPDATE SET count = count + 1, last = excluded.last",
                ((self.instance, key.queue_id, key.arrival, now) for key in keys))

    # -- runs --------------------------------------------------------------

    def start_run(self, summary: RunSummary) -> int:
        with self._writing():
            cursor = self.db.execute(
                "INSERT INTO runs (instance, command, started, invoked_by, command_line) VALUES (?, ?, ?, ?, ?)",
                (self.instance, summary.command, summary.started, summary.invoked_by, summary.command_line))
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, summary: RunSummary) -> None:
        with self._writing():
            self.db.execute(
                "UPDATE runs SET finished = ?, listed = ?, sent = ?, held = ?, released = ?, moved = ?, errors = ?, "
                "outcome = ?, exit_code = ?, succeeded = ? WHERE id = ?",
                (summary.finished, summary.listed, summary.sent, summary.held, summary.released, summary.moved,
                 summary.errors, summary.outcome, summary.exit_code, int(summary.succeeded), run_id))

    def record_dispatches(self, run_id: int, rows: Sequence[Tuple[int, MessageKey, int, str, str]]) -> None:
        """The order a run scheduled messages: (seq, key, priority, sender, result)."""
        with self._writing():
            self.db.executemany(
                "INSERT INTO dispatches (run_id, seq, queue_id, arrival, priority, sender, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((run_id, seq, key.queue_id, key.arrival, priority, sender, result)
                 for seq, key, priority, sender, result in rows))

    def prune(self, history_days: float) -> int:
        """Forget runs (and their dispatch order) and message history older than ``history_days``.

        The history of a message qrunner still holds is kept however old,
        and so is the record of each run it names: "held when, why, by
        which run" must not vanish while the hold lasts. Returns how many
        runs went.
        """
        cutoff = time.time() - history_days * 86400
        with self._writing():
            old = "SELECT id FROM runs WHERE instance = ? AND started < ?"
            self.db.execute(f"DELETE FROM dispatches WHERE run_id IN ({old})", (self.instance, cutoff))
            self.db.execute(
                "DELETE FROM history WHERE instance = ? AND at < ? AND NOT EXISTS (SELECT 1 FROM holds h WHERE "
                "h.instance = history.instance AND h.queue_id = history.queue_id AND h.arrival = history.arrival)",
                (self.instance, cutoff))
            return self.db.execute("DELETE FROM runs WHERE instance = ? AND started < ? AND NOT EXISTS "
                                   "(SELECT 1 FROM history h WHERE h.run_id = runs.id AND h.instance = runs.instance)",
                                   (self.instance, cutoff)).rowcount

    # -- history (what explain shows) ------------------------------------------

    def record_history(self, run_id: int, events: Sequence[Event]) -> None:
        """The actions of one step of a run, in one transaction (not one per message)."""
        if not events:
            return
        now = time.time()
        with self._writing():
            self.db.executemany(
                "INSERT INTO history (instance, queue_id, arrival, at, run_id, action, sender, priority, reason, "
                "new_queue_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((self.instance, e.key.queue_id, e.key.arrival, now, run_id, e.action, e.sender, e.priority,
                  e.reason, e.new_queue_id) for e in events))

    def history(self, queue_id: str) -> List[HistoryEntry]:
        """Everything recorded about ``queue_id``, oldest first: its own actions under any arrival (Postfix
        reuses ids: the caller tells them apart by ``event.key``), and routes that made a copy under this id."""
        rows = self.db.execute(
            "SELECT h.at, h.run_id, r.command, r.invoked_by, h.queue_id, h.arrival, h.action, h.sender, h.priority, "
            "h.reason, h.new_queue_id FROM history h LEFT JOIN runs r ON r.id = h.run_id "
            "WHERE h.instance = ? AND (h.queue_id = ? OR h.new_queue_id = ?) ORDER BY h.at, h.rowid",
            (self.instance, queue_id, queue_id))
        return [HistoryEntry(r[0], r[1], r[2], Event(MessageKey(r[4], r[5]), *r[6:]), r[3]) for r in rows]

    def hold(self, key: MessageKey) -> Optional[Hold]:
        """qrunner's hold record of one message, if it has one."""
        row = self.db.execute(
            "SELECT queue_id, arrival, state, held_at, senders, reason, envelope_sender FROM holds WHERE instance = ? "
            "AND queue_id = ? AND arrival = ?", (self.instance, key.queue_id, key.arrival)).fetchone()
        return Hold(*row) if row else None

    def add_counts(self, counts: Mapping[Tuple[str, str], int]) -> None:
        """Add to the cumulative counters ((name, sender) -> how many more), which outlive every run."""
        with self._writing():
            self.db.executemany(
                "INSERT INTO counters (instance, name, sender, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (instance, name, sender) DO UPDATE SET value = value + excluded.value",
                ((self.instance, name, sender, value) for (name, sender), value in counts.items() if value))

    def totals(self) -> Dict[Tuple[str, str], int]:
        rows = self.db.execute("SELECT name, sender, value FROM counters WHERE instance = ?", (self.instance,))
        return {(r[0], r[1]): r[2] for r in rows}

    def last_runs(self) -> List[LastRun]:
        """Each command's last completed run, with when that command last completed its plan."""
        rows = self.db.execute(
            "SELECT r.command, r.finished - r.started, coalesce(r.exit_code, 0), r.finished, r.errors, "
            "(SELECT max(s.finished) FROM runs s WHERE s.instance = r.instance AND s.command = r.command "
            " AND s.finished IS NOT NULL AND coalesce(s.succeeded, s.outcome = 'ok') = 1) "
            "FROM runs r WHERE r.instance = ? AND r.id = (SELECT max(id) FROM runs l WHERE l.instance = r.instance "
            "AND l.command = r.command AND l.finished IS NOT NULL) ORDER BY r.command", (self.instance,))
        return [LastRun(r[0], r[1], r[2], r[3], r[5], r[4] or 0) for r in rows]

    _RUN_COLUMNS = ("command, started, listed, sent, held, released, moved, errors, finished, outcome, "
                    "invoked_by, command_line, id")

    @staticmethod
    def _summary(row) -> RunSummary:
        command, started, listed, sent, held, released, moved, errors, finished, outcome, who, line, run_id = row
        return RunSummary(command=command, started=started, listed=listed, sent=sent, held=held,
                          released=released, moved=moved or 0, errors=errors, finished=finished, outcome=outcome,
                          invoked_by=who or "", command_line=line or "", run_id=run_id)

    def last_run(self, command: Optional[str] = None) -> Optional[RunSummary]:
        """The last completed command (of ``command``'s kind, if given)."""
        kind = "" if command is None else "AND command = ? "
        row = self.db.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE instance = ? AND finished IS NOT NULL {kind}ORDER BY id DESC "
            "LIMIT 1", (self.instance,) + (() if command is None else (command,))).fetchone()
        return None if row is None else self._summary(row)

    def recent_runs(self, limit: int) -> List[RunSummary]:
        """The last ``limit`` commands that changed the queue (a run still going or cut short too), newest first."""
        rows = self.db.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE instance = ? ORDER BY id DESC LIMIT ?",
                               (self.instance, limit))
        return [self._summary(row) for row in rows]

    def runs(self, ids: Iterable[int]) -> Dict[int, RunSummary]:
        """The runs with these ids that history still keeps (for a message's history)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = self.db.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE instance = ? AND id IN ({marks})",
                               (self.instance, *wanted))
        return {row[-1]: self._summary(row) for row in rows}
