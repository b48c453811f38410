"""The Exim back end: qrunner works on a named queue that Exim's own queue runners never process.

Gate mode puts outbound relay mail into the named queue (default
``qrunner``) with an ACL ``queue =`` modifier (contrib/exim/). Listing reads
the spool's ``-H`` files directly (one directory scan, no process per
message); skip is freeze (``-Mf``), release is thaw (``-Mt``), send is
``exim -qG<queue> -M ID...``. Exim's traps, measured (DESIGN.md section 5):
without the right ``-qG`` Exim delivers nothing and still exits 0, and
``-M`` delivers even a frozen message; so every action is confirmed from
the spool, and a message someone else froze is never named on a command
line that would send it.

Gated mail has no retry schedule but qrunner's: a message dispatched that is
still queued afterwards waits (``backoff_min`` doubling to ``backoff_max``)
before it is dispatched again, and a message older than ``max_queue_time`` is
handed back to Exim's default queue, where Exim's retry rules time it out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

from qrunner.config import EximSettings
from qrunner.exceptions import ConfigError, NoPermissionError, UnavailableError
from qrunner.message import Message
from qrunner.mta.base import Backend
from qrunner.mta import exim_spool

log = logging.getLogger("qrunner.exim")

BATCH = 10  # message ids per `exim -M` process
ROUTES_FILE = "exim-routes"  # in state_dir: message id -> transport, read by contrib/exim's router
COMMAND_BATCH = 200  # ids per -Mf / -Mt / -MG call


def find_exim(binary: Optional[str]) -> Optional[str]:
    """The Exim binary: the configured one, else exim4 or exim on PATH or in /usr/sbin."""
    if binary:
        return binary if os.access(binary, os.X_OK) else None
    for name in ("exim4", "exim"):
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
    return None


class EximBackend(Backend):
    """One Exim (binary and configuration) and the named queue qrunner works on."""

    name = "exim"

    def __init__(self, settings: EximSettings, state_dir: str = ""):
        self.settings = settings
        self.routes_file = os.path.join(state_dir, ROUTES_FILE) if state_dir else ""
        binary = find_exim(settings.binary)
        if binary is None:
            where = settings.binary or "PATH or /usr/sbin (exim4, exim)"
            raise UnavailableError(f"Exim is not installed: no Exim binary at {where}; install Exim or set "
                                   "[exim] binary in the configuration.")
        self.binary = binary
        self.config_args = ["-C", settings.config] if settings.config else []
        self.queue = settings.queue
        self.queue_args = [f"-qG{self.queue}"] if self.queue else []
        self.spool_directory = settings.spool_directory or self._option("spool_directory")
        self.split = self._option("split_spool_directory", boolean=True) == "yes"
        self.instance = f"exim:{os.path.realpath(self.spool_directory)}:{self.queue}"

    # -- commands ----------------------------------------------------------

    def _exim(self, args: Sequence[str], timeout: Optional[float] = 600) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.binary] + self.config_args + list(args), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, errors="replace", timeout=timeout)
        except OSError as exc:
            raise UnavailableError(f"cannot run {self.binary}: {exc.strerror}; check [exim] binary.")

    def _option(self, name: str, boolean: bool = False) -> str:
        """An option's value as ``exim -bP`` prints it; booleans as "yes"/"no"."""
        result = self._exim(["-bP", name], timeout=60)
        line = result.stdout.strip()
        if result.returncode != 0 or not line:
            raise UnavailableError(f"Exim cannot read its configuration ({_last_line(result.stderr) or 'no output'}); "
                                   "check [exim] binary and config.")
        if boolean:
            return "no" if line.startswith("no_") else "yes"
        return line.partition("=")[2].strip()

    def _each_batch(self, flag: str, ids: Sequence[str], extra: Sequence[str] = ()) -> None:
        for start in range(0, len(ids), COMMAND_BATCH):
            chunk = list(ids[start:start + COMMAND_BATCH])
            self._exim(self.queue_args + [flag] + list(extra) + chunk)

    # -- readiness ---------------------------------------------------------

    def check_running(self) -> None:
        """Exim needs no daemon to list or deliver; it needs a binary and a configuration that loads."""
        if not os.path.isdir(self._input_directory()):
            if not os.path.isdir(self.spool_directory):
                raise UnavailableError(f"Exim's spool directory {self.spool_directory} does not exist; "
                                       "check [exim] spool_directory.")

    def check_can_act(self) -> None:
        if os.geteuid() != 0:
            raise NoPermissionError("qrunner must run as root to freeze, thaw and deliver Exim mail "
                                    "(-Mf, -Mt, -M are for admin users); run it from root's timer or with sudo.")
        self.check_running()
        if self.routes_file and not os.path.exists(self.routes_file):
            self.write_routes({})

    def is_message_id(self, text: str) -> bool:
        return exim_spool.is_message_id(text)

    # -- list --------------------------------------------------------------

    def _input_directory(self) -> str:
        parts = [self.spool_directory] + ([self.queue] if self.queue else []) + ["input"]
        return os.path.join(*parts)

    def list_messages(self) -> List[Message]:
        """The named queue's messages, from the -H files; locked (being delivered) ones marked."""
        messages = []
        mvh = tuple([self.binary] + self.config_args + self.queue_args)
        for message_id, header_path in exim_spool.list_spool(self.spool_directory, self.queue, self.split):
            data_path = header_path[:-2] + "-D"
            try:
                spool = exim_spool.read_header_file(header_path, read_headers=False)
            except (OSError, ValueError) as exc:
                log.debug("%s: -H file not readable (%s); skipped this run", message_id, exc)
                continue
            size = exim_spool.message_size(spool, data_path)
            if size is None:
                continue  # gone since the directory scan
            locked = exim_spool.is_locked(data_path)
            messages.append(Message(
                queue_id=message_id,
                arrival=spool.arrival,
                size=size,
                sender=spool.sender,
                recipients=spool.pending_recipients,
                queue_name="locked" if locked else (self.queue or "default"),
                filename=data_path,
                headers=exim_spool.EximSpoolHeaders(header_path, message_id, mvh),
                held=spool.frozen,
            ))
        return messages

    def is_candidate(self, message: Message, ours: bool) -> bool:
        """Messages of the named queue not being delivered right now; frozen ones only if qrunner froze them."""
        if message.queue_name == "locked":
            return False
        return not message.held or ours

    def why_not_candidate(self, message: Message) -> str:
        if message.queue_name == "locked":
            return "being delivered by Exim right now; left alone"
        return (f"frozen by someone else, not by qrunner; left alone (thaw it with "
                f"'exim {' '.join(self.queue_args)} -Mt {message.queue_id}' if you mean to)")

    def next_retry(self, message: Message, attempt: Optional[Tuple[int, float]]) -> Optional[float]:
        """qrunner's own backoff for a message it dispatched that is still queued."""
        if attempt is None:
            return None
        count, last = attempt
        wait = min(self.settings.backoff_min * (2 ** max(count - 1, 0)), self.settings.backoff_max)
        due = last + wait
        return due if due > time.time() else None

    def is_expired(self, message: Message) -> bool:
        """Older than max_queue_time, not being delivered: Exim's own rules should decide its fate now.

        Waiting mail then meets Exim's retry rules, and mail frozen by Exim
        (a delivery error) or an admin meets timeout_frozen_after and
        ignore_bounce_errors_after, which never act in a named queue. The
        caller never hands back a hold of qrunner's own: those stay, warned about.
        """
        return message.queue_name != "locked" and time.time() - message.arrival > self.settings.max_queue_time

    def hold_age_limit(self) -> Optional[float]:
        return float(self.settings.max_queue_time)

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

    def release(self, queue_ids: Sequence[str], to_default_queue: bool = False) -> Set[str]:
        """Thaw (``-Mt``); with ``to_default_queue`` also move them to Exim's default queue."""
        thawed = self._confirmed("-Mt", queue_ids, "is no longer frozen")
        if to_default_queue and thawed:
            self.move_to_default_queue(sorted(thawed))
        return thawed

    def _confirmed(self, flag: str, queue_ids: Sequence[str], done: str) -> Set[str]:
        ids = [q for q in queue_ids if exim_spool.is_message_id(q)]
        confirmed: Set[str] = set()
        for start in range(0, len(ids), COMMAND_BATCH):
            result = self._exim(self.queue_args + [flag] + ids[start:start + COMMAND_BATCH])
            confirmed.update(re.findall(r"^Message (\S+) " + re.escape(done) + r"$", result.stdout, re.M))
        return confirmed & set(ids)

    def move_to_default_queue(self, queue_ids: Sequence[str]) -> Set[str]:
        """``-qG<queue> -MG '' ID...``: back to the queue Exim's own runners process."""
        ids = [q for q in queue_ids if exim_spool.is_message_id(q)]
        if not ids or not self.queue:
            return set()
        self._each_batch("-MG", ids, extra=[""])
        return {q for q in ids if self._frozen(q) is None}

    def hand_back(self, queue_ids: Sequence[str]) -> Set[str]:
        """Move to the default queue as they are (nothing thawed), for Exim's retry and freeze rules."""
        return self.move_to_default_queue(queue_ids)

    def write_routes(self, routes: Dict[str, str]) -> None:
        """The router's lookup file, message id -> transport, replaced atomically.

        It must always exist: with the file missing, Exim's lookup fails to
        the paniclog and routes every message the default way. Messages of
        the default sender are not listed and route as usual.
        """
        if not self.routes_file:
            return
        directory = os.path.dirname(self.routes_file)
        try:
            os.makedirs(directory, mode=0o711, exist_ok=True)
            os.chmod(directory, os.stat(directory).st_mode | 0o011)  # Exim's delivery user must reach the file
            temporary = f"{self.routes_file}.{os.getpid()}.tmp"
            with open(temporary, "w") as out:
                for message_id, transport in sorted(routes.items()):
                    out.write(f"{message_id}: {transport}\n")
            os.chmod(temporary, 0o644)
            os.replace(temporary, self.routes_file)
        except OSError as exc:
            raise ConfigError(f"{self.routes_file}: cannot write Exim's routes file ({exc.strerror}); "
                              "check 'state_dir'.")
        if routes:
            self._check_reachable(directory)

    def check_routes(self, senders) -> None:
        """With routed senders, Exim's delivery user must be able to read the routes file: checked before acting."""
        if self.routes_file and any(not s.default and s.exim for s in senders):
            # state_dir itself is made 0711 when the file is written; what lies above it is the admin's.
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
                                  "put state_dir where others may pass (like /var/lib/qrunner).")
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def dispatch(self, messages: Sequence[Message], routes=None) -> Dict[str, str]:
        """``exim -qG<queue> -M ID...`` in dispatch order, at most ``dispatch_concurrency`` at once.

        Batches are started in order, so a message is handed to Exim only
        after every higher-priority message was. A message frozen (by anyone)
        since the listing is not named. The outcome comes from the spool
        afterwards: gone means delivered (or bounced by Exim), still there
        means deferred.
        """
        outcomes: Dict[str, str] = {}
        self.write_routes({queue_id: sender.exim.transport for queue_id, sender in (routes or {}).items()})
        ready = []
        for message in messages:
            frozen = self._frozen(message.queue_id)
            if frozen is None:
                outcomes[message.queue_id] = "vanished"
            elif frozen:
                outcomes[message.queue_id] = "failed: frozen since it was listed; not sent"
            else:
                ready.append(message.queue_id)
        batches = [ready[i:i + BATCH] for i in range(0, len(ready), BATCH)]
        started = time.time()
        running: List[Tuple[subprocess.Popen, List[str]]] = []
        problems: Dict[str, str] = {}
        for batch in batches:
            while len(running) >= self.settings.dispatch_concurrency:
                running = self._reap(running, problems, block=True)
            # -Mc, not -M: Exim checks under its own lock that the message is not frozen, so
            # a message someone freezes after this check is never delivered by qrunner.
            proc = subprocess.Popen([self.binary] + self.config_args + self.queue_args + ["-Mc"] + batch,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            running.append((proc, batch))
        while running:
            running = self._reap(running, problems, block=True)
        for queue_id in ready:
            outcomes[queue_id] = self._outcome(queue_id, started, problems)
        return outcomes

    def _reap(self, running, problems: Dict[str, str], block: bool):
        """Wait for one -Mc process to end; remember what a failing one said."""
        while True:
            still = []
            for proc, batch in running:
                if proc.poll() is None:
                    still.append((proc, batch))
                    continue
                error = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
                if proc.stderr:
                    proc.stderr.close()
                if proc.returncode != 0:
                    for queue_id in batch:
                        problems[queue_id] = f"exim -Mc exited {proc.returncode}: {_last_line(error) or 'no message'}"
            if len(still) < len(running) or not block:
                return still
            time.sleep(0.01)

    def _outcome(self, queue_id: str, started: float, problems: Dict[str, str]) -> str:
        paths = exim_spool.find_spool_paths(self.spool_directory, self.queue, queue_id, self.split)
        if paths is None:
            return "delivered"
        try:
            spool = exim_spool.read_header_file(paths.header, read_headers=False)
        except (OSError, ValueError):
            return "delivered"
        if queue_id in problems:
            return f"failed: {problems[queue_id]}"
        if spool.frozen:
            if (spool.frozen_at or 0) >= int(started):
                # Frozen by this delivery (a bounce that cannot be delivered, a delivery error):
                # only Exim's own rules (ignore_bounce_errors_after, timeout_frozen_after) can end
                # that, and they never act in a named queue.
                self.move_to_default_queue([queue_id])
                return "failed: frozen by Exim during delivery; moved, still frozen, to Exim's default queue"
            return "failed: frozen by someone else since it was listed; not sent"
        return "deferred"


def _wait_for_one(running: List[subprocess.Popen]) -> List[subprocess.Popen]:
    """Block until at least one process ends; the ones still running."""
    while True:
        still = [p for p in running if p.poll() is None]
        if len(still) < len(running):
            return still
        time.sleep(0.01)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
