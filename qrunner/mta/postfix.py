"""The Postfix back end: list, hold, release and schedule through Postfix's own tools.

Every value comes from ``postconf -h`` (queue directory, hashing), never a
guess, and every command gets ``-c`` when a config directory is set, so a
``postmulti`` instance works. Listing is one ``postqueue -j``; holds and
releases are one ``postsuper -h -`` / ``-H -`` per batch; scheduling talks
to the flush service's socket directly (what ``postqueue -i`` does, without
a process per message, a few requests at a time: postfix_flush), falling
back to ``postqueue -i``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from qrunner.config import PostfixSettings, Sender
from qrunner.exceptions import ConfigError, NoPermissionError, UnavailableError
from qrunner.message import Message, QueueState
from qrunner.mta.base import (Backend, Due, Gate, HandOverJournal, Outcome, Result, SendRequest, finish_hand_over,
                              send_copying_routes)
from qrunner.mta.postfix_envelope import read_route, read_sender, read_stamp
from qrunner.mta.postfix_flush import FlushAhead, flush_request, mark_unthrottled
from qrunner.mta.postfix_queuefile import PostfixQueueFileReader, QueuePaths, hash_key, is_queue_id

log = logging.getLogger("qrunner.postfix")

GATE_REASON = "deferred transport"  # what Postfix writes for a due message whose transport is gated
POSTCONF_NAMES = ("queue_directory", "command_directory", "hash_queue_names", "hash_queue_depth",
                  "defer_transports", "maximal_queue_lifetime", "empty_address_recipient")
FORCED_EXPIRY = (3, 5)  # postsuper -e/-f: the first Postfix that can return a message to its sender on request
_decode_json = json.JSONDecoder().decode  # json.loads without its per-call checks (one line of postqueue -j each)


def find_postconf(command_directory: Optional[str]) -> Optional[str]:
    """``postconf`` in the configured command directory, else PATH, else /usr/sbin."""
    if command_directory:
        candidate = os.path.join(command_directory, "postconf")
        return candidate if os.access(candidate, os.X_OK) else None
    return shutil.which("postconf") or shutil.which("postconf", path="/usr/sbin:/usr/local/sbin")


QUEUE_STATES = {"deferred": QueueState.WAITING, "hold": QueueState.HELD, "active": QueueState.ACTIVE}


class PostfixBackend(Backend):
    """One Postfix instance (its config directory), as qrunner acts on it.

    A sender's route is fixed by re-injection: the original is held, a copy
    is submitted to the sender's loopback listener (whose ``content_filter``
    stamps the route into the copy's queue file), then the original is
    removed. Mail of the default sender is scheduled through the flush service.
    """

    id_hint = "a Postfix queue id; check it in the queue listing ('postqueue -p')"
    schedule_error = ""  # why the last flush request (schedule() or a send's) was not taken ("" when it was)

    def __init__(self, settings: PostfixSettings):
        self.settings = settings
        postconf = find_postconf(settings.command_directory)
        if postconf is None:
            where = settings.command_directory or "PATH or /usr/sbin"
            raise UnavailableError(f"Postfix is not installed: no postconf in {where}; install Postfix "
                                   "or set mta and [postfix] command_directory in the configuration.")
        self.postconf = postconf
        self.config_args = ["-c", settings.config_directory] if settings.config_directory else []
        values = self._postconf(postconf)
        self.queue_directory = values["queue_directory"]
        self.command_directory = settings.command_directory or values["command_directory"]
        self.paths = QueuePaths(self.queue_directory, values["hash_queue_names"],
                                int(values["hash_queue_depth"] or 1))
        self.defer_transports = values["defer_transports"]
        self.maximal_queue_lifetime = values["maximal_queue_lifetime"]
        self.empty_address_recipient = values["empty_address_recipient"]
        self._mail_version: Optional[str] = None  # asked only when needed (--version, on_hold_expiry)
        self.instance = f"postfix:{os.path.realpath(self.queue_directory)}"
        self._texts: Dict = {}  # one object for each str (and tuple of delay reasons) a listing repeats
        self._status: Optional[subprocess.Popen] = None  # a 'postfix status' under way (see check)

    # -- commands ----------------------------------------------------------

    def _postconf(self, postconf: str) -> Dict[str, str]:
        result = subprocess.run([postconf] + self.config_args + ["-h"] + list(POSTCONF_NAMES),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != len(POSTCONF_NAMES):
            why = result.stderr.strip().splitlines()[-1:] or ["no output"]
            where = self.settings.config_directory or "Postfix's default config directory"
            raise UnavailableError(f"postconf cannot read the configuration in {where} ({why[0]}); "
                                   "check [postfix] config_directory.")
        return dict(zip(POSTCONF_NAMES, lines))

    def command(self, name: str) -> str:
        return os.path.join(self.command_directory, name)

    def _run(self, name: str, args: Sequence[str], input_text: Optional[str] = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.command(name)] + self.config_args + list(args), input=input_text,
                                  stdin=None if input_text is not None else subprocess.DEVNULL,
                                  capture_output=True, text=True, errors="replace")
        except OSError as exc:
            raise UnavailableError(f"cannot run {self.command(name)}: {exc.strerror}; is Postfix installed whole?")

    # -- facts ---------------------------------------------------------------

    def is_message_id(self, text: str) -> bool:
        return is_queue_id(text)

    def check(self, senders: Sequence[Sender], acting: bool) -> None:
        """Routes that work, root when acting, and a running Postfix: without it postsuper half-applies a batch.

        ``postfix status`` is a shell script that takes longer than a plan
        of a few hundred messages (about 40 ms): it runs while the runner
        takes its lock, opens its records, starts the Lua worker and lists
        the queue, and :meth:`list` gives its verdict (before the listing's
        own, so a stopped Postfix is said in the same words either way).
        That holds for a command that acts too: every one lists the queue
        before it changes anything (run, flush and release plan from the
        listing), so no postsuper runs against a stopped Postfix.
        """
        self._check_routes(senders)
        if acting and os.geteuid() != 0:
            raise NoPermissionError("qrunner must run as root to hold, release and schedule Postfix mail "
                                    "(postsuper is reserved for the superuser); run it from root's timer or with sudo.")
        if os.geteuid() != 0:
            return  # only root may ask 'postfix status'; postqueue says "mail system is down" for the rest
        self._end_status()
        try:
            self._status = subprocess.Popen([self.command("postfix")] + self.config_args + ["status"],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
        except OSError as exc:
            raise UnavailableError(f"cannot run {self.command('postfix')}: {exc.strerror}; is Postfix installed whole?")

    def _status_verdict(self) -> None:
        """Wait for the ``postfix status`` that :meth:`check` started, if any; raise when Postfix is not running."""
        status, self._status = self._status, None
        if status is None:
            return
        error = status.communicate()[1].decode("utf-8", "replace")
        if status.returncode != 0:
            where = self.settings.config_directory or "the default instance"
            raise UnavailableError(f"Postfix is not running ({where}: 'postfix status' says: "
                                   f"{_last_line(error) or 'not running'}); start it with 'postfix start'.")

    def _end_status(self) -> None:
        """A status check nobody asked the verdict of (a command that never listed): reaped, not left a zombie."""
        status, self._status = self._status, None
        if status is not None:
            status.communicate()

    def close(self) -> None:
        self._end_status()

    def _check_routes(self, senders: Sequence[Sender]) -> None:
        """Every routed sender has a Postfix route whose transport is not gated and whose listener stamps it."""
        routed = [s for s in senders if not s.default]
        gated = set(self.defer_transports.replace(",", " ").split())
        for sender in routed:
            if sender.postfix is None:
                raise ConfigError(f"sender {sender.id}:{sender.name} has no [sender.postfix] route and is not "
                                  "default = true; give it a route (see contrib/postfix/) or make it the default "
                                  "sender.")
            if sender.postfix.transport in gated:
                raise ConfigError(f"sender {sender.id}:{sender.name}: its transport {sender.postfix.transport} is in "
                                  "Postfix's defer_transports, so re-injected copies would never leave; gate only "
                                  "the relay transport (contrib/postfix/main.cf.qrunner).")
        if routed:
            self._check_listeners(routed)

    def _check_listeners(self, senders: Sequence[Sender]) -> None:
        """The content_filter each sender's listener stamps (master.cf) is the route qrunner recognises copies by.

        A listener that does not put copies on hold (a master.cf from
        before qrunner 0.7) still works, at least once: a crash between its
        250 and qrunner's record can deliver the message twice. That is
        said (a warning, in every run and plan) rather than refused, so that
        an upgrade never stops mail; contrib/postfix/master.cf.qrunner has
        the lines to add.
        """
        services = self._listener_options()
        for sender in senders:
            route = sender.postfix
            options = services.get(route.listener, {})
            found = options.get("content_filter")
            self._check_hold(sender, options)
            if found is None:
                log.warning("sender %s: no master.cf service %s sets content_filter, so qrunner cannot check its "
                            "route; see contrib/postfix/master.cf.qrunner", sender.name, route.listener)
            elif not same_route(found, route.content_filter):
                raise ConfigError(f"sender {sender.id}:{sender.name}: its listener {route.listener} stamps "
                                  f"content_filter={found} (master.cf), not {route.content_filter} as its transport "
                                  "and nexthop say; make them the same: qrunner tells a copy it handed to the sender "
                                  "by that route.")

    @staticmethod
    def _check_hold(sender: Sender, options: Dict[str, str]) -> None:
        """Warn when the sender's listener lacks what makes the hand-over exactly-once (see _check_listeners)."""
        if not options:
            return
        restrictions = " ".join(v for k, v in options.items() if k.startswith("smtpd_") and k.endswith("_restrictions"))
        if not re.search(r"\bstatic:HOLD\b", restrictions):
            log.warning("sender %s: its listener %s does not put copies on hold (no -o smtpd_data_restrictions="
                        "check_client_access,static:HOLD in master.cf): a crash just after the listener accepts a "
                        "copy can deliver that message twice; add the line from contrib/postfix/master.cf.qrunner "
                        "and run 'postfix reload'", sender.name, sender.postfix.listener)
        elif not options.get("smtpd_authorized_xforward_hosts", "").strip():
            log.warning("sender %s: its listener %s holds copies but does not take XFORWARD (no -o "
                        "smtpd_authorized_xforward_hosts=127.0.0.0/8 in master.cf), so a held copy cannot name its "
                        "original: after a crash just after the listener accepts a copy, that copy stays on hold "
                        "for you to delete; add the line from contrib/postfix/master.cf.qrunner",
                        sender.name, sender.postfix.listener)

    def _listener_options(self) -> Dict[str, Dict[str, str]]:
        """master.cf inet service name -> the parameters its -o options set (``postconf -xP``)."""
        result = subprocess.run([self.postconf] + self.config_args + ["-xP"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, errors="replace")
        services: Dict[str, Dict[str, str]] = {}
        for line in result.stdout.splitlines():
            name, _, value = line.partition(" = ")
            service, _, parameter = name.rpartition("/")
            if service.endswith("/inet"):
                services.setdefault(service[:-len("/inet")], {})[parameter] = value.strip()
        return services

    def gate(self, senders: Sequence[Sender] = ()) -> Gate:
        if not self.defer_transports.strip():
            return Gate(False, "Postfix is not in gate mode (defer_transports is empty): it delivers deferred mail "
                               "on its own schedule, so qrunner's holds work but its order does not; see "
                               "contrib/postfix/main.cf.qrunner")
        return Gate(True, f"defer_transports = {self.defer_transports}")

    @property
    def ungate_hint(self) -> str:
        """The two commands that end gate mode, for this instance (``-c``): Postfix reads main.cf only when told."""
        instance = "".join(f" {arg}" for arg in self.config_args)
        return (f"remove defer_transports (postconf{instance} -X defer_transports), then run "
                f"postfix{instance} reload")

    def unfit(self, message: Message, ours: bool) -> Optional[str]:
        """Deferred mail, and qrunner's own holds; never active, incoming or an admin's hold."""
        if message.state == QueueState.WAITING or (message.held and ours):
            return None
        if message.held:
            return (f"on hold by someone else, not by qrunner; left alone (release it with "
                    f"'postsuper -H {message.queue_id}' if you mean to)")
        return f"in the {message.queue_name} queue, which qrunner never touches"

    def copy_of(self, message: Message, senders: Sequence[Sender], recorded: bool = False) -> Optional[Sender]:
        """The sender whose route the listener stamped in this queue file (``content_filter``), if any.

        Only waiting mail can be decided, so only it is looked at; and a
        message whose only delay reason is the gate's own was deferred by
        a gated transport, which no sender's transport may be
        (:meth:`check`), so its file need not be read unless qrunner's
        records name it a copy. A file that moved on since the listing
        says nothing: the records decide then.
        """
        routes = [s for s in senders if not s.default and s.postfix is not None]
        if not routes or message.state != QueueState.WAITING:
            return None
        if not recorded and message.delay_reasons and all(GATE_REASON in r for r in message.delay_reasons):
            return None
        try:
            stamped = read_route(message.queue_file())
        except (OSError, ValueError):
            return next((s for s in routes), None) if recorded else None
        return next((s for s in routes if same_route(stamped, s.postfix.content_filter)), None)

    def held_copy(self, message: Message, senders: Sequence[Sender]) -> Optional[Tuple[Sender, str]]:
        """A held message whose queue file has a sender's route stamped: that sender and the original's id.

        Only held mail is read (the listener's HOLD puts a copy there); the
        original's id is the ``log_ident`` the XFORWARD IDENT left.
        """
        routes = [s for s in senders if not s.default and s.postfix is not None]
        if not routes or not message.held:
            return None
        try:
            stamped, original = read_stamp(message.queue_file() or self.paths.path("hold", message.queue_id))
        except (OSError, ValueError):
            return None
        sender = next((s for s in routes if same_route(stamped, s.postfix.content_filter)), None)
        return (sender, original if is_queue_id(original) else "") if sender is not None else None

    def release_copies(self, queue_ids: Sequence[str]) -> Set[str]:
        """``postsuper -H`` the copies, then a flush request for each: delivered now, on their route.

        A released message keeps its file time and Postfix wakes nothing
        (DESIGN.md section 4); the flush request makes the attempt now. The
        ids postsuper released; a refused request leaves the copy to the
        queue manager's next scan of the deferred queue.
        """
        released = self.release(queue_ids)
        for queue_id in queue_ids:
            if queue_id in released and not self.schedule(queue_id):
                log.warning("%s: copy released, but the flush service refused the delivery request; Postfix "
                            "delivers it at its next queue scan", queue_id)
        return released

    def sends_from_hold(self, route: Optional[Sender]) -> bool:
        """A sender's route re-injects a copy of the held original; the default route needs it released."""
        return route is not None

    def due(self, message: Message, attempts: Optional[Tuple[int, float]] = None) -> Optional[Due]:
        """When Postfix would retry the message by itself, or None when it is due now.

        Due: its only delay reason is the gate's own (Postfix found it due
        and its transport deferred), or its next retry time (the queue
        file's mtime) has passed.
        """
        if message.delay_reasons and all(GATE_REASON in reason for reason in message.delay_reasons):
            return None
        try:
            mtime = os.stat(message.queue_file()).st_mtime
        except OSError:
            return None
        return Due(mtime, "Postfix's retry time") if mtime > time.time() else None

    def queue_lifetime(self) -> Optional[float]:
        """maximal_queue_lifetime: held mail older than this bounces on its first attempt after release."""
        return postfix_time(self.maximal_queue_lifetime)

    @property
    def mail_version(self) -> str:
        """Postfix's version as ``postconf -h mail_version`` says ("" when it says nothing)."""
        if self._mail_version is None:
            result = subprocess.run([self.postconf] + self.config_args + ["-h", "mail_version"],
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True)
            self._mail_version = result.stdout.strip()
        return self._mail_version

    def version(self) -> str:
        where = self.settings.config_directory or "the default instance"
        return f"Postfix {self.mail_version or '(version unknown)'} ({where}, queue {self.queue_directory})"

    @property
    def cannot_return(self) -> Optional[str]:  # type: ignore[override]
        """None from Postfix 3.5 on (forced expiration, ``postsuper -f``); an older Postfix has no way."""
        if _version_tuple(self.mail_version) >= FORCED_EXPIRY:
            return None
        return (f"Postfix {self.mail_version or '(version unknown)'} has no command for it (forced expiration, "
                "postsuper -f, came with Postfix 3.5)")

    def describe_route(self, sender: Sender) -> str:
        if sender.default:
            return "default: the MTA's own routing"
        if sender.postfix is None:
            return "no route"
        return f"postfix: via {sender.postfix.listener} to {sender.postfix.content_filter}"

    # -- in delivery -----------------------------------------------------------

    IN_DELIVERY = ("incoming", "active")  # the queue manager's: scheduled mail passes incoming/ on its way

    def delivering(self) -> int:
        """Messages in Postfix's incoming and active queues, counted in their directories as qshape does.

        A message qrunner schedules is in incoming/ when the flush service
        replies and in active/ while the queue manager delivers it; it
        leaves both when the attempt ends (removed, or back in deferred/).
        The count is of distinct queue ids: incoming/ is read first, so a
        file the queue manager renames into active/ between the two reads
        is seen in both and counted once, never twice (which would make
        ``max_active`` hand over one message too few). Counting files
        costs no process and no queue listing.
        """
        seen: Set[str] = set()
        for name in self.IN_DELIVERY:
            self._queue_ids_in(os.path.join(self.queue_directory, name), self._depth(name), seen)
        return len(seen)

    def _depth(self, queue_name: str) -> int:
        return self.paths.depth if queue_name.lower() in self.paths.hashed else 0

    @staticmethod
    def _queue_ids_in(directory: str, depth: int, seen: Set[str]) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        if depth == 0:
            seen.update(e.name for e in entries if is_queue_id(e.name))
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                PostfixBackend._queue_ids_in(e.path, depth - 1, seen)

    def still_delivering(self, queue_ids: Sequence[str]) -> Set[str]:
        """The ids whose queue file is still in incoming/ or active/.

        incoming/ is looked at first: a file moves from there to active/
        (a rename), so a message on its way between them is still seen.
        """
        left = set()
        for queue_id in queue_ids:
            if not is_queue_id(queue_id):
                continue
            if any(os.path.exists(self.paths.path(name, queue_id)) for name in self.IN_DELIVERY):
                left.add(queue_id)
        return left

    # -- list --------------------------------------------------------------

    def list(self) -> List[Message]:
        """One ``postqueue -j``, parsed line by line while Postfix is still printing it."""
        headers = PostfixQueueFileReader(self.paths, [self.command("postcat")] + self.config_args)
        messages = []
        try:
            proc = subprocess.Popen([self.command("postqueue")] + self.config_args + ["-j"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise UnavailableError(f"cannot run {self.command('postqueue')}: {exc.strerror}; is Postfix installed whole?")
        with proc:
            parse = self._parse_line
            append = messages.append
            for number, line in enumerate(proc.stdout, 1):
                message = parse(number, line, headers)
                if message is not None:
                    append(message)
            error = proc.stderr.read().decode("utf-8", "replace")
        self._texts = {}
        self._status_verdict()
        if proc.returncode != 0:
            raise UnavailableError(f"postqueue -j failed: {_last_line(error) or 'exit ' + str(proc.returncode)}; "
                                   "is Postfix running?")
        return messages

    def _parse_line(self, number: int, line: bytes, headers: PostfixQueueFileReader) -> Optional[Message]:
        try:
            record = _decode_json(line.decode("utf-8", "surrogatepass"))
            queue_id = record["queue_id"]
            queue_name = record["queue_name"]
        except (ValueError, KeyError, TypeError):
            if not line.strip():
                return None
            log.warning("postqueue -j line %d not understood, skipped: %.200s", number,
                        line.decode("utf-8", "replace"))
            return None
        if not is_queue_id(queue_id):
            log.warning("postqueue -j line %d: %r is not a Postfix queue id, skipped", number, queue_id)
            return None
        return self._message(record, queue_id, queue_name, headers)

    def _message(self, record: dict, queue_id: str, queue_name: str, headers: PostfixQueueFileReader) -> Message:
        key = hash_key(queue_id)
        texts = self._texts
        if len(texts) > 65536:
            texts.clear()
        text = texts.setdefault
        addresses = []
        reasons = []
        for r in record.get("recipients", ()):
            if type(r) is dict:
                address = r.get("address", "")
                if type(address) is not str:
                    address = str(address)
                addresses.append(text(address, address))
                reason = r.get("delay_reason")
                if reason is not None or "delay_reason" in r:
                    reason = str(reason) if type(reason) is not str else reason
                    reasons.append(text(reason, reason))
        try:
            arrival = int(record.get("arrival_time", 0)) + int(key[:5], 16) / 1e6
        except (TypeError, ValueError):
            arrival = 0.0
        if type(queue_name) is str:
            queue_name = text(queue_name, queue_name)
        sender = record.get("sender", "")
        sender = self._sender(sender if type(sender) is str else str(sender), queue_name, queue_id)
        reasons = tuple(reasons)
        return Message(
            queue_id=queue_id,
            arrival=arrival,
            size=int(record.get("message_size", 0)),
            sender=text(sender, sender),
            recipients=tuple(addresses),
            queue_name=queue_name,
            headers=headers,  # and the queue file (Message.queue_file)
            delay_reasons=text(reasons, reasons),  # one tuple for each set the listing repeats
            state=QUEUE_STATES.get(queue_name, QueueState.ARRIVING),
        )

    def _sender(self, shown: str, queue_name, queue_id: str) -> str:
        """The envelope sender; "" for the null sender, which postqueue -j shows as MAILER-DAEMON."""
        if shown != self.empty_address_recipient:
            return shown
        try:
            raw = read_sender(self.paths.path(queue_name, queue_id))
        except (OSError, ValueError):
            return ""  # a bounce, all but certainly; the file moved on (or a queue name Postfix would refuse)
        return "" if not raw else raw.decode("utf-8", "surrogateescape")

    # -- act ---------------------------------------------------------------

    def hold(self, queue_ids: Sequence[str]) -> Set[str]:
        """Put messages on hold in one ``postsuper -h -``; the ids postsuper confirmed."""
        return self._postsuper("-h", queue_ids, "placed on hold")

    def release(self, queue_ids: Sequence[str]) -> Set[str]:
        """Release held messages in one ``postsuper -H -``; the ids postsuper confirmed."""
        return self._postsuper("-H", queue_ids, "released from hold")

    def remove(self, queue_ids: Sequence[str]) -> Set[str]:
        """Delete originals whose copy a listener accepted, in one ``postsuper -d -``."""
        return self._postsuper("-d", queue_ids, "removed")

    def give_up(self, queue_ids: Sequence[str]) -> Set[str]:
        """Forced expiration, then a delivery request: Postfix returns each message to its sender now.

        ``postsuper -f -`` (Postfix 3.5+) marks each message expired and
        releases it if held; the queue manager returns an expired message to
        its sender at its next delivery attempt ("status=force-expired,
        returned to sender"), gate or not, and the flush request makes that
        attempt now (without it, the message's retry time would). The ids
        postsuper confirmed; a crash between the two steps leaves a message
        that still bounces at its retry time, or at the next run's request.
        """
        expired = self._postsuper("-f", queue_ids, "expired")
        for queue_id in queue_ids:
            if queue_id in expired and not self.schedule(queue_id):
                log.warning("%s: expired, but the flush service refused the delivery request; Postfix returns it "
                            "to its sender at its retry time", queue_id)
        return expired

    def _postsuper(self, flag: str, queue_ids: Sequence[str], done: str) -> Set[str]:
        ids = [q for q in queue_ids if is_queue_id(q)]
        if not ids:
            return set()
        result = self._run("postsuper", [flag, "-"], input_text="".join(q + "\n" for q in ids))
        confirmed = {m.group(1) for m in re.finditer(r"^postsuper: ([0-9A-Za-z]+): " + re.escape(done) + r"$",
                                                     result.stderr, re.M)}
        if result.returncode != 0:
            raise UnavailableError(f"postsuper {flag} failed ({_last_line(result.stderr)}); "
                                   f"{len(confirmed)} of {len(ids)} messages were changed before it stopped.")
        return confirmed

    def send(self, requests: Sequence[SendRequest], journal: HandOverJournal) -> Dict[str, Outcome]:
        """Each message in the order given: a sender's through its listener, the default sender's by flush.

        The originals of the routed messages are held first (recorded
        before, confirmed after, through ``journal``), so that nothing else
        sends them while they are copied; each original is removed right
        after its copy is recorded, so that a crash leaves at most one
        original behind, which the next run removes instead of handing it
        over again. The default sender's flush requests go a few ahead of
        their answers (:class:`~qrunner.mta.postfix_flush.FlushAhead`),
        never past a sender's copy.
        """
        ahead = FlushAhead(self._flush_path, requests, self._waiting)
        try:
            return send_copying_routes(self, requests, journal, lambda queue_id: self._scheduled(ahead, queue_id),
                                       self._hand_over)
        except BaseException:
            self._report_ahead(ahead, requests, journal)
            raise
        finally:
            for queue_id in ahead.close():
                self._unmark(queue_id)

    def _report_ahead(self, ahead: FlushAhead, requests: Sequence[SendRequest], journal: HandOverJournal) -> None:
        """A send that stops early: the requests already on their way still move their messages, so each answer
        that comes reaches the journal (one that does not is not reported: the next run's listing shows where
        that message is), and a refused one takes its mark off. The error that stopped the send stays the one
        raised."""
        waiting = ahead.requests.unanswered()
        if not waiting:
            return
        by_id = {r.message.queue_id: r for r in requests if r.route is None}
        for queue_id in waiting:
            try:
                accepted = ahead.requests.answer(queue_id)
                if not accepted:
                    self._unmark(queue_id)
                journal.sent(by_id[queue_id], Outcome(Result.SCHEDULED) if accepted
                             else Outcome(Result.FAILED, "Postfix refused to schedule it"))
            except Exception:  # noqa: BLE001 - the send has failed already; its own error is the one to report
                self._unmark(queue_id)  # a no-op once the service moved it; else flush(8) marks it itself
                return

    def _hand_over(self, request: SendRequest, journal: HandOverJournal) -> Outcome:
        """Re-inject the held original into its sender's listener, record the copy, remove the original,
        release the copy (:func:`~qrunner.mta.base.finish_hand_over`).

        Whether the listener held the copy, the queue says: its file is in
        ``hold/`` once the 250 came (cleanup wrote it before smtpd replied).
        """
        from qrunner.mta.postfix_reinject import ReinjectError, reinject  # smtplib and email: only when routing

        queue_id = request.message.queue_id
        try:
            new_id = reinject(self.paths.path("hold", queue_id), request.route.postfix.address)
        except (ReinjectError, OSError, ValueError) as error:
            return Outcome(Result.FAILED, str(error))
        try:
            held = os.path.exists(self.paths.path("hold", new_id))
        except ValueError:  # not an id Postfix writes: nothing to release by it
            held = False
        return finish_hand_over(self, request, journal, new_id, held)

    @property
    def _flush_path(self) -> str:
        return os.path.join(self.queue_directory, "public", "flush")

    def _waiting(self, queue_id: str) -> bool:
        """Still in the deferred queue (a flush request for it can move it), and marked flushed for that request
        (:func:`~qrunner.mta.postfix_flush.mark_unthrottled`)."""
        return is_queue_id(queue_id) and mark_unthrottled(self.paths.path("deferred", queue_id))

    def _unmark(self, queue_id: str) -> None:
        """Take the mark off a message whose request did not reach Postfix."""
        mark_unthrottled(self.paths.path("deferred", queue_id), False)

    def _scheduled(self, ahead: FlushAhead, queue_id: str) -> Outcome:
        """The flush service moves a deferred message to incoming/ at once (its request maybe sent a few earlier)."""
        self.schedule_error = ""
        accepted = self._unmarked_unless_taken(queue_id, lambda: self._answer_ahead(ahead, queue_id))
        if accepted is None:
            return Outcome(Result.VANISHED)
        if accepted:
            return Outcome(Result.SCHEDULED)
        return Outcome(Result.FAILED, self.schedule_error or "Postfix refused to schedule it")

    def schedule(self, queue_id: str) -> bool:
        """Ask Postfix to deliver one deferred message now (``postqueue -i``'s request).

        True when the flush service accepted the request (it also accepts an
        id that no longer exists: the caller checks the queue for that).
        When neither its socket nor ``postqueue -i`` reached the service,
        :attr:`schedule_error` says why (the send's failure names it). The
        file is marked flushed first, and the mark taken off again when the
        request failed or could not be made
        (:func:`~qrunner.mta.postfix_flush.mark_unthrottled`).
        """
        self.schedule_error = ""
        if not is_queue_id(queue_id):
            return False
        mark_unthrottled(self.paths.path("deferred", queue_id))
        return bool(self._unmarked_unless_taken(queue_id, lambda: self._request_flush(queue_id)))

    def _unmarked_unless_taken(self, queue_id: str, request: Callable[[], Optional[bool]]) -> Optional[bool]:
        """``request()``'s answer (None: nothing was asked); the mark taken off when Postfix did not take it,
        raising included."""
        accepted: Optional[bool] = False
        try:
            accepted = request()
        finally:
            if accepted is False:
                self._unmark(queue_id)
        return accepted

    def _answer_ahead(self, ahead: FlushAhead, queue_id: str) -> Optional[bool]:
        """The answer to the request on its way (None: the message is gone), else ``postqueue -i``'s."""
        try:
            return ahead.answer(queue_id)
        except OSError as exc:
            return self._by_postqueue(queue_id, exc)

    def _request_flush(self, queue_id: str) -> bool:
        """The flush service's ``send_file`` request, on its socket, else by ``postqueue -i``."""
        try:
            return flush_request(self._flush_path, queue_id)
        except OSError as exc:
            return self._by_postqueue(queue_id, exc)

    def _by_postqueue(self, queue_id: str, exc: OSError) -> bool:
        """``postqueue -i``, when the flush socket did not serve; :attr:`schedule_error` says why both failed."""
        self.schedule_error = ""
        log.debug("%s: flush socket unusable (%s); using postqueue -i", queue_id, exc)
        problem = exc.strerror or str(exc)
        result = self._run("postqueue", ["-i", queue_id])
        if result.returncode != 0:
            why = _last_line(result.stderr) or f"exit {result.returncode}"
            self.schedule_error = (f"Postfix's flush service did not take the delivery request ({self._flush_path}: "
                                   f"{problem}; postqueue -i: {why}); is the flush service in master.cf, and Postfix "
                                   "running?")
        return result.returncode == 0


def same_route(stamped: str, configured: str) -> bool:
    """Two content_filter values name the same route: the transport exactly, the next hop without case."""
    transport, _, nexthop = stamped.strip().partition(":")
    want_transport, _, want_nexthop = configured.partition(":")
    return transport == want_transport and nexthop.lower() == want_nexthop.lower()


def _version_tuple(version: str) -> Tuple[int, ...]:
    """ "3.7.11" -> (3, 7, 11); what is not a version, (0,)."""
    parts = re.match(r"(\d+)(?:\.(\d+))?", version or "")
    return tuple(int(p) for p in parts.groups() if p is not None) if parts else (0,)


def postfix_time(value: str) -> Optional[float]:
    """A Postfix time value ("5d", "3600s", "2h"; a bare number is in days) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", value or "")
    if not match:
        return None
    return int(match.group(1)) * units[match.group(2) or "d"]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
