"""The Exim back end: qrunner works on a named queue that Exim's own queue runners never process.

Gate mode puts outbound relay mail into the named queue (default
``qrunner``) with an ACL ``queue =`` modifier (contrib/exim/). Listing reads
the spool's ``-H`` files directly (one directory scan, no process per
message); skip is freeze (``-Mf``), release is thaw (``-Mt``), send is
``exim -qG<queue> -Mc ID...``. Exim's traps, measured (DESIGN.md section 5):
without the right ``-qG`` Exim delivers nothing and still exits 0, and
``-M`` delivers even a frozen message; so every action is confirmed from
the spool, and a message someone else froze is never named on a command
line that would send it.

Retry times: no queue runner ever starts a delivery from the named queue,
but ``-Mc`` respects Exim's retry hints for hosts: a message whose relay
failed is not tried there again before the host's retry time (Debian's
rule: 15 minutes), and :meth:`EximBackend.due` reads those hints
(``exim_hints.py``) so that the plan shows the wait instead of sending in
vain. ``-Mc`` ignores an address's retry data (a 4xx to RCPT), so qrunner
adds its own backoff (``backoff_min`` doubling to ``backoff_max``); the
later of the two wins. The admin's ``flush --ignore-policy`` is a forced
queue run for each named message (``-qfG<queue> ID ID``), past the retry
times and still never delivering frozen mail. A message older than
``max_queue_time`` is handed back to Exim's default queue, where Exim's
retry rules time it out.

Order: the batches of one priority level start only when every batch of
the level above has ended (unless ``overlap_priorities``), and a batch
never mixes levels, so the relay sees the levels in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from qrunner.atomic import replace_file
from qrunner.config import EximSettings, Sender
from qrunner.exceptions import ConfigError, FileWriteError, NoPermissionError, UnavailableError
from qrunner.message import Message, QueueState
from qrunner.mta.base import Backend, Due, Gate, HandOverJournal, Outcome, Result, SendRequest
from qrunner.mta import exim_gate, exim_hints, exim_spool

log = logging.getLogger("qrunner.exim")

BATCH = 10  # message ids per `exim -Mc` process
ROUTES_FILE = "exim-routes"  # message id -> transport, read by contrib/exim's router (see routes_path)
ROUTES_DIRECTORY_SUFFIX = "-exim"  # the routes file's own directory, beside state_dir
COMMAND_BATCH = 200  # ids per -MG / -Mg call
# -Mf / -Mt: ids per exim process (about 23 KB of command line), and exim processes at once. Exim rewrites each
# message's -H file with two fsyncs (the file, then the spool directory), so a freeze costs the disk's fsync
# latency, not CPU: two processes on disjoint ids take about half the time of one (measured: 2,000 freezes 1.68 s
# in one process at a time, 0.75 s in two, 0.91 s in four).
FREEZE_BATCH = 1000
FREEZE_PROCESSES = 2


def routes_path(state_dir: str) -> str:
    """Where the routes file is: ``STATE_DIR-exim/exim-routes`` (``/var/lib/qrunner-exim/exim-routes``).

    Exim's delivery user reads it, so its directory must let that user
    through (0711); the state directory, with the database and the lock,
    is 0700 and out of that user's reach. So the file has a directory of
    its own beside the state directory, not inside it. Releases before
    this one kept it in the state directory itself (``old_routes_path``):
    see :meth:`EximBackend._move_routes_file`.
    """
    return os.path.join(os.path.normpath(state_dir) + ROUTES_DIRECTORY_SUFFIX, ROUTES_FILE)


def old_routes_path(state_dir: str) -> str:
    """Where releases before the routes file's own directory kept it: ``STATE_DIR/exim-routes``."""
    return os.path.join(state_dir, ROUTES_FILE)


def find_exim(binary: Optional[str]) -> Optional[str]:
    """The Exim binary: the configured one, else exim4 or exim on PATH or in /usr/sbin."""
    if binary:
        return binary if os.access(binary, os.X_OK) else None
    for name in ("exim4", "exim"):
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    return None


def find_dumpdb(binary: str) -> Optional[str]:
    """``exim_dumpdb``, the reader of Exim's hints: beside the Exim binary, else on PATH or in /usr/sbin."""
    beside = os.path.join(os.path.dirname(binary), "exim_dumpdb")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("exim_dumpdb") or shutil.which("exim_dumpdb", path="/usr/sbin:/usr/local/sbin")


@dataclass
class _Batch:
    """One Exim process: up to BATCH messages of one level (``-Mc``), or one forced message (``-qf``)."""

    requests: List[SendRequest]
    priority: int
    forced: bool
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0

    @property
    def ids(self) -> List[str]:
        return [r.message.queue_id for r in self.requests]


class EximBackend(Backend):
    """One Exim (binary and configuration) and the named queue qrunner works on.

    A sender's route is chosen at delivery: the routes file names the
    transport of each routed message, and contrib/exim's router reads it.
    """
    ungate_hint = ("remove contrib/exim's gate and router (Debian's split configuration: conf.d/main/05_qrunner_gate, "
                   "conf.d/acl/35_qrunner_gate and conf.d/router/05_qrunner_route, then update-exim4.conf; any "
                   "other: the exim-gate.conf lines in your configuration), then restart Exim")


    def __init__(self, settings: EximSettings, state_dir: str = ""):
        self.settings = settings
        self.state_dir = state_dir
        self.routes_file = routes_path(state_dir) if state_dir else ""
        self.old_routes_file = old_routes_path(state_dir) if state_dir else ""
        binary = find_exim(settings.binary)
        if binary is None:
            where = settings.binary or "PATH or /usr/sbin (exim4, exim)"
            raise UnavailableError(f"Exim is not installed: no Exim binary at {where}; install Exim or set "
                                   "[exim] binary in the configuration.")
        self.binary = binary
        self.config_args = ["-C", settings.config] if settings.config else []
        self.queue = settings.queue
        self.has_named_queue = bool(self.queue)
        self.queue_args = [f"-qG{self.queue}"] if self.queue else []
        listing = " ".join([self.binary] + self.config_args + ["-bp"] + self.queue_args)
        self.id_hint = f"an Exim message id; check it in qrunner's queue listing ('{listing}')"
        options = self._options((() if settings.spool_directory else ("spool_directory",)) +
                                ("split_spool_directory",))
        self.spool_directory = settings.spool_directory or options["spool_directory"]
        self.split = options["split_spool_directory"] == "yes"
        self.instance = f"exim:{os.path.realpath(self.spool_directory)}:{self.queue}"
        self._hints: Optional[exim_hints.RetryHints] = None  # read once a run, when a due time is first asked
        self._damaged: Dict[str, str] = {}  # message id -> why its -H file cannot be read (this listing)

    # -- commands ----------------------------------------------------------

    def _exim(self, args: Sequence[str], timeout: Optional[float] = 600) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.binary] + self.config_args + list(args), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, errors="replace", timeout=timeout)
        except OSError as exc:
            raise UnavailableError(f"cannot run {self.binary}: {exc.strerror}; check [exim] binary.")

    def _options(self, names: Sequence[str]) -> Dict[str, str]:
        """Main options' values as one ``exim -bP`` prints them (``name = value``); booleans as "yes"/"no".

        One process for all of them: each ``exim -bP`` reads Exim's whole
        configuration, and every command asks before it can list the queue
        (spool_directory and split_spool_directory: 8.7 ms as two processes,
        4.2 ms as one; median of 25, measured).
        """
        result = self._exim(["-bP", *names], timeout=60)
        values = {}
        for line in result.stdout.splitlines():
            name, equals, value = line.strip().partition("=")
            name = name.strip()
            if equals:
                values[name] = value.strip()
            elif name.startswith("no_"):
                values[name[len("no_"):]] = "no"
            elif name:
                values[name] = "yes"
        if result.returncode != 0 or any(name not in values for name in names):
            raise UnavailableError(f"Exim cannot read its configuration ({_last_line(result.stderr) or 'no output'}); "
                                   "check [exim] binary and config.")
        return values

    def _gone_after(self, flag: str, ids: Sequence[str], extra: Sequence[str] = ()) -> Set[str]:
        """``flag`` over ``ids`` in batches; the ids no longer in qrunner's queue afterwards (moved, returned).

        Exim prints nothing for these on success, so the spool tells. An exim
        that failed (the binary, the spool) and left a message there without
        naming it is an error, as in :meth:`_confirmed`: the run must stop and
        say so, not take the message for one being delivered.
        """
        gone: Set[str] = set()
        for start in range(0, len(ids), COMMAND_BATCH):
            chunk = list(ids[start:start + COMMAND_BATCH])
            result = self._exim(self.queue_args + [flag] + list(extra) + chunk)
            gone.update(q for q in chunk if self._frozen(q) is None)
            if result.returncode != 0:
                left = [q for q in chunk if q not in gone]
                named = self._say_refused(flag, left, result.stdout + "\n" + result.stderr)
                if any(q not in named for q in left):
                    raise UnavailableError(f"exim {flag} failed ({_last_line(result.stderr) or 'no output'}); "
                                           f"{len(gone)} of {len(ids)} messages were changed before it stopped.")
        return gone

    # -- facts ---------------------------------------------------------------

    def check(self, senders: Sequence[Sender], acting: bool) -> None:
        """A spool to read, a route for every routed sender that Exim's delivery user can read, root when acting.

        Exim needs no daemon to list or deliver. An acting run makes sure
        the routes file exists: with it missing, Exim's lookup fails to the
        paniclog and routes every message the default way.
        """
        for sender in senders:
            if not sender.default and sender.exim is None:
                raise ConfigError(f"sender {sender.id}:{sender.name} has no [sender.exim] route and is not "
                                  "default = true; give it a route (see contrib/exim/) or make it the default sender.")
        self._check_routes_reachable(senders)
        if acting and os.geteuid() != 0:
            raise NoPermissionError("qrunner must run as root to freeze, thaw and deliver Exim mail "
                                    "(-Mf, -Mt, -M are for admin users); run it from root's timer or with sudo.")
        if not os.path.isdir(self._input_directory()) and not os.path.isdir(self.spool_directory):
            raise UnavailableError(f"Exim's spool directory {self.spool_directory} does not exist; "
                                   "check [exim] spool_directory.")
        if self.routes_file:
            self._move_routes_file(acting)
        if acting and self.routes_file and not os.path.exists(self.routes_file):
            self.write_routes({})

    def _move_routes_file(self, acting: bool) -> None:
        """The upgrade step: the routes file moves from the state directory into a directory of its own.

        Exim must never find the file missing where its router looks (it
        would log to the paniclog and route the message the default way),
        and the router names one path, which the admin changes when they
        update contrib's router. So: the new file is written first (from
        the old one); while a router still names the old path the old file
        is kept, and every write of the routes replaces both (write_routes),
        and each command warns; once no router names it, the old file is
        removed and the state directory closed to 0700. One ``exim -bP
        config`` per command, only while the old file exists.
        """
        if not os.path.exists(self.old_routes_file):
            if acting:
                self._close_state_dir()
            return
        try:
            with open(self.old_routes_file, "rb") as old:
                content = old.read()
            if acting and not os.path.exists(self.routes_file):
                self._write_routes_text(content)
        except OSError as exc:
            raise ConfigError(f"{self.old_routes_file}: cannot move Exim's routes file to {self.routes_file} "
                              f"({exc.strerror}); check 'state_dir'.")
        text = self._exim(["-bP", "config"], timeout=60)
        if text.returncode != 0 or self.old_routes_file in text.stdout:
            if acting:
                self._open_state_dir()
            log.warning("Exim's configuration still reads qrunner's routes file at its old path %s (or qrunner "
                        "cannot tell: exim -bP config failed); qrunner now writes %s and keeps the old file up to "
                        "date until no router names it: put the new path in qrunner's routers "
                        "(contrib/exim/conf.d/router/05_qrunner_route or exim-gate.conf), then update-exim4.conf "
                        "and restart Exim", self.old_routes_file, self.routes_file)
            return
        if acting:
            os.unlink(self.old_routes_file)
            self._close_state_dir()
            log.info("Exim's routes file moved from %s to %s; the state directory %s is 0700 again",
                     self.old_routes_file, self.routes_file, self.state_dir)

    def _open_state_dir(self) -> None:
        """While a router still reads the old routes file, Exim's delivery user must pass the state directory.

        As the release before did (0711: through, not list; the database
        and the lock stay 0600). The systemd unit now makes it 0700 at each
        start, so each acting run of the transition opens it again.
        """
        mode = os.stat(self.state_dir).st_mode
        if mode & 0o011 != 0o011:
            os.chmod(self.state_dir, mode | 0o011)

    def _close_state_dir(self) -> None:
        """The state directory 0700 (a release before this one opened it to 0711 for the routes file)."""
        try:
            if os.stat(self.state_dir).st_mode & 0o077:
                os.chmod(self.state_dir, 0o700)
        except FileNotFoundError:
            pass

    def is_message_id(self, text: str) -> bool:
        return exim_spool.is_message_id(text)

    def unfit(self, message: Message, ours: bool) -> Optional[str]:
        """Messages of the named queue not being delivered right now; frozen ones only if qrunner froze them."""
        damaged = self._damaged.get(message.queue_id)
        if damaged is not None:
            return f"its spool file cannot be read ({damaged}); left alone"
        if message.state == QueueState.ACTIVE:
            return "being delivered by Exim right now; left alone"
        if message.held and not ours:
            return (f"frozen by someone else, not by qrunner; left alone (thaw it with "
                    f"'exim {' '.join(self.queue_args)} -Mt {message.queue_id}' if you mean to)")
        return None

    def due(self, message: Message, attempts: Optional[Tuple[int, float]]) -> Optional[Due]:
        """The later of qrunner's backoff and Exim's retry time for the message's hosts; None when both passed.

        ``-Mc`` does not try a host before its retry time, so sending sooner
        only logs another "retry time not reached"; qrunner's backoff paces
        what Exim's host hints do not cover (an address's 4xx).
        """
        now = time.time()
        waits = [d for d in (self._backoff(attempts, now), self._exim_retry(message, now)) if d is not None]
        return max(waits, key=lambda d: d.at) if waits else None

    def _backoff(self, attempts: Optional[Tuple[int, float]], now: float) -> Optional[Due]:
        """qrunner's own backoff for a message it dispatched that is still queued."""
        if attempts is None:
            return None
        count, last = attempts
        wait = min(self.settings.backoff_min * (2 ** max(count - 1, 0)), self.settings.backoff_max)
        dispatches = "dispatch" if count == 1 else "dispatches"
        return Due(last + wait, "qrunner's retry time", f"backoff after {count} deferred {dispatches}") \
            if last + wait > now else None

    def _exim_retry(self, message: Message, now: float) -> Optional[Due]:
        """Exim's retry time for every host the message waits for, from its hints (one read a run)."""
        if self._hints is None:
            dumpdb = find_dumpdb(self.binary)
            if dumpdb is None:
                log.debug("no exim_dumpdb beside %s: Exim's retry times are not shown", self.binary)
            self._hints = exim_hints.read_hints(dumpdb, self.spool_directory, now)
        record = self._hints.holding(message.queue_id, now)
        if record is None:
            return None
        return Due(record.next_try, "Exim's retry time", f"retry record {record.key}: {record.error}")

    def expired(self, message: Message) -> Optional[str]:
        """Older than max_queue_time, not being delivered: Exim's own rules should decide its fate now.

        Waiting mail then meets Exim's retry rules, and mail frozen by Exim
        (a delivery error) or an admin meets timeout_frozen_after and
        ignore_bounce_errors_after, which never act in a named queue. The
        plan never hands back a hold of qrunner's own: those stay, warned about.
        """
        if not self.queue or message.state == QueueState.ACTIVE:
            return None  # in Exim's default queue its own rules act already
        if time.time() - message.arrival <= self.settings.max_queue_time:
            return None
        return "older than max_queue_time: handed to the MTA's own retry and freeze rules"

    def queue_lifetime(self) -> Optional[float]:
        return float(self.settings.max_queue_time)

    def version(self) -> str:
        first = (self._exim(["-bV"], timeout=60).stdout.strip().splitlines() or ["Exim (version unknown)"])[0]
        return f"{first.replace('Exim version', 'Exim')} ({self.binary}, queue {self.queue or 'default'})"

    def describe_route(self, sender: Sender) -> str:
        if sender.default:
            return "default: the MTA's own routing"
        return f"exim: transport {sender.exim.transport}" if sender.exim else "no route"

    def gate(self, senders: Sequence[Sender] = ()) -> Gate:
        """Is contrib/exim's gate (and, for routed senders, its router) in Exim's configuration?

        Two ``exim -bP`` calls, whatever the queue holds: the ACL options as
        Exim uses them, then the configuration text for the ACLs and
        routers they name (qrunner/mta/exim_gate.py says why two).
        """
        try:
            options = self._exim(["-bP"] + list(exim_gate.OPTIONS), timeout=60)
            text = self._exim(["-bP", "config"], timeout=60)
        except subprocess.TimeoutExpired:
            return Gate(None, "exim -bP did not answer within 60 seconds")
        if options.returncode != 0:
            return Gate(None, "Exim cannot show its configuration "
                              f"({_last_line(options.stderr) or 'exim -bP printed nothing'})")
        routed = [s.name for s in senders if not s.default and s.exim is not None]
        return exim_gate.judge(exim_gate.read(options.stdout, text.stdout if text.returncode == 0 else ""),
                               self.queue, self.routes_file, routed,
                               self.old_routes_file if os.path.exists(self.old_routes_file) else "")

    # -- list --------------------------------------------------------------

    def _input_directory(self) -> str:
        parts = [self.spool_directory] + ([self.queue] if self.queue else []) + ["input"]
        return os.path.join(*parts)

    def list(self) -> List[Message]:
        """The named queue's messages, from the -H files in one pass (exim_spool.list_queue); locked (being
        delivered) ones marked."""
        messages = []
        self._damaged = {}
        mvh = tuple([self.binary] + self.config_args + self.queue_args)
        queue_name = self.queue or "default"
        texts: Dict[str, str] = {}  # one str for each sender and recipient the listing repeats
        shared = texts.setdefault
        add = messages.append
        waiting, held, active = QueueState.WAITING, QueueState.HELD, QueueState.ACTIVE
        headers = exim_spool.EximSpoolReader(self._input_directory(), mvh)
        seen = headers.add
        for entry in exim_spool.list_queue(self.spool_directory, self.queue):
            if type(entry) is exim_spool.DamagedEntry:
                damaged = self._damaged_message(entry.message_id, entry.header_path, entry.data_path, entry.error)
                if damaged is not None:
                    add(damaged)
                continue
            if len(texts) > 65536:
                texts.clear()  # a queue of distinct addresses: the table must not outgrow what it saves
            seen(entry)
            add(Message(
                queue_id=entry.message_id,
                arrival=entry.arrival,
                size=entry.size,
                sender=shared(entry.sender, entry.sender),
                recipients=tuple([shared(r, r) for r in entry.recipients]),
                queue_name=queue_name,
                headers=headers,  # and the -D file (Message.queue_file)
                state=active if entry.locked else held if entry.frozen else waiting,
            ))
        return messages

    def _damaged_message(self, message_id: str, header_path: str, data_path: str, exc: Exception
                         ) -> Optional[Message]:
        """A message whose ``-H`` file cannot be read, listed so that it is left alone and its records kept.

        Exim cannot deliver it either (``exim -bp`` shows "spool format
        error"); qrunner says so once, names the file and the fix, and never
        acts on it: :meth:`unfit` leaves it alone. It stays in the listing so
        that a hold qrunner made keeps its record (a message missing from the
        listing would count as gone). Its key comes from the id, which
        encodes the arrival second; it counts as frozen when its file says
        ``-frozen``. None when the message is gone since the scan.
        """
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            with open(header_path, "rb") as f:
                frozen = b"\n-frozen " in f.read(1 << 20)
            size = os.stat(data_path).st_size if os.path.exists(data_path) else 0
        except FileNotFoundError:
            return None
        except OSError:
            frozen, size = False, 0
        self._damaged[message_id] = why
        remove = " ".join([self.binary] + self.config_args + self.queue_args + ["-Mrm", message_id])
        log.warning("%s: Exim's spool file %s cannot be read (%s); the message is left alone in the queue "
                    "(Exim cannot deliver it either): repair the file, or remove the message with '%s'",
                    message_id, header_path, why, remove)
        return Message(queue_id=message_id, arrival=float(exim_spool.arrival_second(message_id)), size=size,
                       sender="", recipients=(), queue_name=self.queue or "default", filename=data_path,
                       state=QueueState.HELD if frozen else QueueState.WAITING)

    # -- in delivery -----------------------------------------------------------

    @property
    def hand_over_batch(self) -> int:
        """One round of dispatch: every process busy with a full batch."""
        return BATCH * self.settings.dispatch_concurrency

    def delivering(self) -> int:
        """Messages an Exim process is delivering now, in qrunner's queue and Exim's default queue.

        Exim holds a lock on a message's ``-D`` file while it delivers it
        (what the listing reads as active); Exim's own queue runners work
        on the default queue, so theirs count too.
        """
        queues = [self.queue, ""] if self.queue else [""]
        return sum(1 for queue in queues
                   for _message_id, header in exim_spool.list_spool(self.spool_directory, queue, self.split)
                   if exim_spool.is_locked(header[:-2] + "-D"))

    def still_delivering(self, queue_ids: Sequence[str]) -> Set[str]:
        """The ids an Exim process still holds the lock of; gone or unlocked means the attempt has ended.

        ``send`` returns when its ``-Mc`` processes have ended, so this is
        empty then unless a delivery of the message was started meanwhile
        outside qrunner, which strict priority waits for too.
        """
        left = set()
        for queue_id in queue_ids:
            paths = exim_spool.find_spool_paths(self.spool_directory, self.queue, queue_id, self.split) \
                if exim_spool.is_message_id(queue_id) else None
            if paths is not None and exim_spool.is_locked(paths.data):
                left.add(queue_id)
        return left

    # -- act ---------------------------------------------------------------

    def _frozen(self, message_id: str) -> Optional[bool]:
        """Frozen now? None when the message is no longer in qrunner's queue."""
        paths = exim_spool.find_spool_paths(self.spool_directory, self.queue, message_id, self.split)
        if paths is None:
            return None
        try:
            return exim_spool.read_header_file(paths.header, read_headers=False).frozen
        except (OSError, ValueError):
            return None

    def hold(self, queue_ids: Sequence[str]) -> Set[str]:
        """Freeze (``-Mf``); the ids Exim says it froze now.

        "is now frozen", not "frozen afterwards": a message an admin froze
        in the meantime ("is already frozen") stays the admin's.
        """
        return self._confirmed("-Mf", queue_ids, "is now frozen")

    def release(self, queue_ids: Sequence[str]) -> Set[str]:
        """Thaw (``-Mt``); the ids Exim says it thawed."""
        return self._confirmed("-Mt", queue_ids, "is no longer frozen")

    def _confirmed(self, flag: str, queue_ids: Sequence[str], done: str) -> Set[str]:
        """The ids Exim confirmed; an exim that failed on a message still in the spool is an error, as postsuper's.

        Exim exits 1 for a message that is gone too (delivered meanwhile):
        that one is not an error. One still there and still not as asked
        (not frozen after ``-Mf``, frozen after ``-Mt``) is: the command
        failed, and the run must stop and say so, not call it vanished.
        """
        ids = [q for q in queue_ids if exim_spool.is_message_id(q)]  # an id never starts with "-": no option
        confirmed: Set[str] = set()
        failed = ""
        for chunk, result in self._in_parallel(flag, ids, stop=lambda: bool(failed)):
            now = set(re.findall(r"^Message (\S+) " + re.escape(done) + r"$", result.stdout, re.M))
            confirmed.update(now)
            refused = self._say_refused(flag, [q for q in chunk if q not in now], result.stdout + "\n" + result.stderr)
            if result.returncode != 0 and not failed:
                # Exim refusing a message by name (a spool format error) is that message's, said above; a batch
                # left unchanged with no word for it is Exim failing (the binary, the spool), said as the run's.
                unchanged = [q for q in chunk if q not in confirmed and q not in refused
                             and self._frozen(q) is (flag == "-Mt")]
                if unchanged:
                    failed = _last_line(result.stderr) or "no output"
        if failed:
            raise UnavailableError(f"exim {flag} failed ({failed}); {len(confirmed & set(ids))} of {len(ids)} "
                                   "messages were changed before it stopped.")
        return confirmed & set(ids)

    def _in_parallel(self, flag: str, ids: Sequence[str], stop: Callable[[], bool]
                     ) -> Iterator[Tuple[List[str], subprocess.CompletedProcess]]:
        """``exim -qG<queue> FLAG ID...`` over ``ids``, FREEZE_PROCESSES processes at once; each chunk and its
        result, in order, until ``stop()`` says the caller saw a failure.

        No chunk starts once ``stop()`` is true, and the ones already under
        way (at most FREEZE_PROCESSES - 1 beside the failed one) are still
        waited for and yielded, so that what they changed is counted and
        confirmed. Exim locks each message while it changes it, and the
        chunks name disjoint ids.
        """
        per = max(1, min(FREEZE_BATCH, -(-len(ids) // FREEZE_PROCESSES)))
        chunks = collections.deque(list(ids[start:start + per]) for start in range(0, len(ids), per))
        with concurrent.futures.ThreadPoolExecutor(FREEZE_PROCESSES) as pool:
            running: Deque[Tuple[List[str], concurrent.futures.Future]] = collections.deque()
            while chunks or running:
                while chunks and len(running) < FREEZE_PROCESSES and not stop():
                    chunk = chunks.popleft()
                    running.append((chunk, pool.submit(self._exim, self.queue_args + [flag] + chunk)))
                if not running:
                    return
                chunk, future = running.popleft()
                yield chunk, future.result()

    def _say_refused(self, flag: str, ids: Sequence[str], output: str) -> Set[str]:
        """Exim's own words for each message it did not act on, when it names the message (e.g. a spool
        format error): the executor only knows that the step was not confirmed. The ids Exim named."""
        named: Set[str] = set()
        for queue_id in ids:
            said = [line.strip() for line in output.splitlines() if queue_id in line]
            if said:
                named.add(queue_id)
                log.warning("%s: exim %s did not act on it: %s", queue_id, flag, "; ".join(said)[:500])
        return named

    def hand_back(self, queue_ids: Sequence[str]) -> Set[str]:
        """``-qG<queue> -MG '' ID...``: as they are (nothing thawed), to the queue Exim's own runners process."""
        ids = [q for q in queue_ids if exim_spool.is_message_id(q)]
        if not ids or not self.queue:
            return set()
        return self._gone_after("-MG", ids, extra=[""])

    cannot_return = None  # exim -Mg

    def give_up(self, queue_ids: Sequence[str]) -> Set[str]:
        """``exim -qG<queue> -Mg ID...``: Exim gives up on each and returns it to its sender.

        Frozen ones too (qrunner's holds need no thaw first); a message being
        delivered is left as it is. Exim says nothing and exits 0 whatever
        happened, so the spool tells: a message there before and gone after
        was given up on. Exim logs "cancelled by root" and queues the bounce
        (``<= <> R=ID``); from a named queue the bounce lands there too, for
        the next run to send.
        """
        ids = [q for q in queue_ids if exim_spool.is_message_id(q) and self._frozen(q) is not None]
        if not ids:
            return set()
        return self._gone_after("-Mg", ids)

    def write_routes(self, routes: Dict[str, str]) -> None:
        """The router's lookup file, message id -> transport, replaced atomically.

        It must always exist: with the file missing, Exim's lookup fails to
        the paniclog and routes every message the default way. Messages of
        the default sender are not listed and route as usual.
        """
        if not self.routes_file:
            return
        text = "".join(f"{message_id}: {transport}\n" for message_id, transport in sorted(routes.items()))
        path = self.routes_file
        try:
            self._write_routes_text(text.encode("ascii"))
            if os.path.exists(self.old_routes_file):  # a router may still read it: see _move_routes_file
                path = self.old_routes_file
                replace_file(path, text.encode("ascii"), 0o644)
        except OSError as exc:  # as the state database on a full or read-only disk: 74, and the next run writes it
            raise FileWriteError(f"{path}: cannot write Exim's routes file ({exc.strerror or exc}); nothing more "
                                 "was handed to Exim and the next run writes it again: free space on the disk "
                                 f"under {os.path.dirname(path)} or make it writable.") from None
        if routes:
            self._check_reachable(os.path.dirname(self.routes_file))

    def _write_routes_text(self, text: bytes) -> None:
        """The routes file replaced atomically, 0644, in its own directory, which Exim's delivery user may pass."""
        directory = os.path.dirname(self.routes_file)
        os.makedirs(directory, mode=0o711, exist_ok=True)
        mode = os.stat(directory).st_mode
        if mode & 0o011 != 0o011:
            os.chmod(directory, mode | 0o011)  # Exim's delivery user must reach the file (an umask may have cut it)
        replace_file(self.routes_file, text, 0o644)

    def remove(self, queue_ids: Sequence[str]) -> Set[str]:
        """Exim routes at delivery and never copies a message: there is no original to remove."""
        return set()

    def _check_routes_reachable(self, senders: Sequence[Sender]) -> None:
        """With routed senders, Exim's delivery user must be able to read the routes file: checked before acting."""
        if self.routes_file and any(not s.default and s.exim for s in senders):
            # The routes file's directory is made 0711 when the file is written; what lies above it is the admin's.
            directory = os.path.dirname(os.path.dirname(self.routes_file))
            while not os.path.isdir(directory):
                directory = os.path.dirname(directory)
            self._check_reachable(directory)

    def _check_reachable(self, directory: str) -> None:
        """Every directory above the routes file must let Exim's delivery user through.

        Otherwise the router's lookup fails and Exim routes the message the
        default way: refuse before any message goes.
        """
        path = os.path.realpath(directory)
        while True:
            if not os.stat(path).st_mode & 0o001:
                raise ConfigError(f"{path} is not searchable by other users, so Exim's delivery user cannot read "
                                  f"{self.routes_file} and would route every message the default way; "
                                  "put state_dir where others may pass (like /var/lib/qrunner, whose routes "
                                  "file is /var/lib/qrunner-exim/exim-routes).")
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def send(self, requests: Sequence[SendRequest], journal: HandOverJournal) -> Dict[str, Outcome]:
        """Deliver in the order given, at most ``dispatch_concurrency`` Exim processes at once.

        ``exim -qG<queue> -Mc ID...``, up to 10 messages of one priority
        level a process (Exim delivers them one after another); a level's
        batches start only when every batch of the level above has ended,
        unless ``overlap_priorities``: otherwise a batch of the level below
        would reach the relay while the level above is still delivering.
        ``-Mc``, not ``-M``: Exim checks under its own lock that the message
        is not frozen, so a message someone freezes after the check here is
        never delivered by qrunner. A forced request (``flush
        --ignore-policy``) is a queue run for that one message,
        ``-qfG<queue> ID ID``: past Exim's retry times, and like ``-Mc`` it
        skips frozen mail. Each outcome is read from the spool when its
        process ends and reported at once: gone means delivered (or bounced
        by Exim), still there means deferred.
        """
        outcomes: Dict[str, Outcome] = {}

        def report(request: SendRequest, outcome: Outcome) -> None:
            outcomes[request.message.queue_id] = outcome
            journal.sent(request, outcome)

        self.write_routes({r.message.queue_id: r.route.exim.transport for r in requests if r.route is not None})
        running: List[_Batch] = []
        level = None
        for batch in _batches(requests):
            if batch.priority != level and not self.settings.overlap_priorities:
                while running:  # the level above ends before this one starts
                    running = self._reap(running, report)
            level = batch.priority
            while len(running) >= self.settings.dispatch_concurrency:
                running = self._reap(running, report)
            batch.requests = [r for r in batch.requests if self._still_waiting(r, report)]
            if batch.requests:
                try:
                    running.append(self._start(batch))
                except UnavailableError:
                    while running:  # what the batches already started did, reported before the run stops
                        running = self._reap(running, report)
                    raise
        while running:
            running = self._reap(running, report)
        return outcomes

    def _still_waiting(self, request: SendRequest, report: Callable[[SendRequest, Outcome], None]) -> bool:
        """Not frozen (by anyone) and still queued just before its batch starts; else its outcome is reported."""
        frozen = self._frozen(request.message.queue_id)
        if frozen is None:
            report(request, Outcome(Result.VANISHED))
        elif frozen:
            report(request, Outcome(Result.FAILED, "frozen since it was listed; not sent"))
        return frozen is False

    def _start(self, batch: _Batch) -> _Batch:
        if batch.forced:
            [queue_id] = batch.ids  # a start id and a stop id: the queue run starts that one message only
            argv = [f"-qfG{self.queue}" if self.queue else "-qf", queue_id, queue_id]
        else:
            argv = self.queue_args + ["-Mc"] + batch.ids
        batch.started = time.time()
        try:
            batch.proc = subprocess.Popen([self.binary] + self.config_args + argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:  # the binary gone or not executable since the run started: as in _exim
            raise UnavailableError(f"cannot run {self.binary}: {exc.strerror}; check [exim] binary.")
        return batch

    def _reap(self, running: List[_Batch], report: Callable[[SendRequest, Outcome], None]) -> List[_Batch]:
        """Wait for at least one Exim process to end and report its messages; the batches still running."""
        while True:
            ended = [batch for batch in running if batch.proc.poll() is not None]
            for batch in ended:
                self._finished(batch, report)
            if ended:
                return [batch for batch in running if batch.proc.returncode is None]
            time.sleep(0.01)

    def _finished(self, batch: _Batch, report: Callable[[SendRequest, Outcome], None]) -> None:
        """Each message's outcome, from the spool; what a failing process said, for all of its batch."""
        proc = batch.proc
        error = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        problem = ""
        if proc.returncode != 0:
            problem = f"exim {'-qf' if batch.forced else '-Mc'} exited {proc.returncode}: " \
                      f"{_last_line(error) or 'no message'}"
        for request in batch.requests:
            report(request, self._outcome(request.message.queue_id, batch.started, problem))

    def _outcome(self, queue_id: str, started: float, problem: str) -> Outcome:
        paths = exim_spool.find_spool_paths(self.spool_directory, self.queue, queue_id, self.split)
        if paths is None:
            return Outcome(Result.DELIVERED)
        try:
            spool = exim_spool.read_header_file(paths.header, read_headers=False)
        except (OSError, ValueError):
            return Outcome(Result.DELIVERED)
        if problem:
            return Outcome(Result.FAILED, problem)
        if spool.frozen:
            if (spool.frozen_at or 0) >= int(started) and _frozen_by_delivery(paths.msglog):
                # Frozen by this delivery (a bounce that cannot be delivered, a delivery error):
                # only Exim's own rules (ignore_bounce_errors_after, timeout_frozen_after) can end
                # that, and they never act in a named queue.
                try:
                    self.hand_back([queue_id])
                except UnavailableError as error:  # said for this message; the other batches' outcomes still come
                    return Outcome(Result.FAILED, f"frozen by Exim during delivery; not moved to Exim's default "
                                                  f"queue: {error.message}")
                return Outcome(Result.FAILED, "frozen by Exim during delivery; moved, still frozen, to Exim's "
                                              "default queue")
            return Outcome(Result.FAILED, "frozen by someone else since it was listed; not sent")
        return Outcome(Result.DEFERRED)


def _batches(ready: Sequence[SendRequest]) -> List[_Batch]:
    """Consecutive requests of one level, up to BATCH a process; a forced request alone (a queue run for one id)."""
    batches = []
    for (priority, forced), group in itertools.groupby(ready, key=lambda r: (r.priority, r.forced)):
        group = list(group)
        size = 1 if forced else BATCH
        batches.extend(_Batch(group[i:i + size], priority, forced) for i in range(0, len(group), size))
    return batches


def _frozen_by_delivery(msglog: str) -> bool:
    """Did a delivery freeze it? Exim's delivery ends the message log with "*** Frozen (why)"; ``-Mf`` writes none.

    Without a message log (``message_logs = false``) the freeze time alone
    has to say, as before: a freeze during the dispatch counts as Exim's.
    """
    try:
        with open(msglog, "rb") as log_file:
            log_file.seek(max(0, os.path.getsize(msglog) - 4096))
            lines = [line for line in log_file.read().splitlines() if line.strip()]
    except OSError:
        return True
    return bool(lines) and lines[-1].startswith(b"*** Frozen")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
