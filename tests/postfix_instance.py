"""A private Postfix instance for end-to-end tests.

The tests need a real Postfix (DESIGN.md section 6) but must never touch the
machine's own Postfix: its ``/etc/postfix`` configuration, its queue, its
log. :class:`PostfixInstance` therefore builds a complete instance of its own
under one base directory: configuration directory, queue directory, data
directory and log file, and runs it with ``postfix -c DIR``.

Why each setting is what it is (see :meth:`PostfixInstance.main_cf`):

- ``relayhost = [127.0.0.1]:PORT`` sends all non-local mail to the test's
  SMTP sink (``tests/smtp_sink.py``), and ``defer_transports = smtp`` is
  qrunner's gate mode: relay mail waits in the deferred queue with the delay
  reason "deferred transport" until something schedules it
  (``postqueue -c DIR -i ID``).
- ``master.cf`` is Debian's with every ``inet`` service removed (the
  instance listens on no TCP port at all; it never competes with the system
  Postfix for port 25) and chroot turned off (a chroot jail under a temporary
  directory would lack the files Debian's init script copies into it).
- ``maillog_file`` gives a log without syslog; ``maillog_file_prefixes``
  must allow a log outside ``/var``. The ``flush`` service runs with
  ``-v``, so that the log records each scheduling request in order (the
  order qrunner dispatched in, as Postfix saw it).
- ``queue_run_delay`` is short, so that anything due is looked at quickly;
  the backoff times are long enough that a deferred message stays in
  ``deferred`` during a test instead of flipping through ``active`` every
  second (which would make queue listings in tests racy). Pass ``settings``
  to override any of this.

How Postfix accepts the non-default configuration directory: Postfix
requires a non-default directory to be listed in the default ``main.cf``
(``alternate_config_directories`` or ``multi_instance_directories``) only
for callers it does not trust; ``unsafe()`` (``src/util/unsafe.c``) trusts
the super-user, and ``sendmail -C`` skips the check for ``geteuid() == 0``.
These helpers therefore require root, and leave ``/etc/postfix`` alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence

SYSTEM_CONFIG_DIRECTORY = "/etc/postfix"

# Directory settings copied from the system's Postfix so that the private
# instance finds the same programs and the same postfix-files.
_COPIED_SETTINGS = (
    "daemon_directory",
    "command_directory",
    "shlib_directory",
    "meta_directory",
    "sendmail_path",
    "newaliases_path",
    "mailq_path",
    "mail_owner",
    "setgid_group",
    "manpage_directory",
)


# The verbose flush daemon's line for one send_file request (src/flush/flush.c).
_FLUSH_REQUEST = re.compile(r"/flush\[\d+\]: flush_send_file_service: requesting delivery for queue_id (\w+)$", re.M)


class PostfixError(RuntimeError):
    """A Postfix command failed; the message holds its command line and output."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postfix_missing_reason() -> Optional[str]:
    """Why a private Postfix instance cannot run here, or None if it can."""
    if shutil.which("postconf") is None or not os.path.isfile(
        os.path.join(SYSTEM_CONFIG_DIRECTORY, "master.cf")
    ):
        return ("Postfix is not installed (no postconf / /etc/postfix/master.cf); "
                "run tests/setup/install-postfix.sh as root")
    if os.geteuid() != 0:
        return "the Postfix tests must run as root (a private Postfix instance needs it)"
    return None


def _strip_inet_and_chroot(master_cf: str) -> str:
    """Debian's master.cf without ``inet`` services and with chroot off.

    A service entry is a line starting in column 1; indented lines continue
    the previous entry (its ``-o`` options or a pipe's ``argv``) and are
    dropped together with it.
    """
    out: List[str] = []
    dropping = False
    for line in master_cf.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if not dropping:
                out.append(line)
            continue
        if line[0] in " \t":
            if not dropping:
                out.append(line)
            continue
        fields = line.split()
        dropping = len(fields) >= 2 and fields[1] == "inet"
        if dropping:
            continue
        if len(fields) >= 8:
            fields[4] = "n"
            line = " ".join(fields[:8]) + (" " + " ".join(fields[8:]) if fields[8:] else "")
        out.append(line)
    return "\n".join(out) + "\n"


def _verbose_flush(master_cf: str) -> str:
    """master.cf with ``-v`` on the ``flush`` service, so the log shows every scheduling request.

    Verbose, Postfix's flush daemon logs ``flush_send_file_service:
    requesting delivery for queue_id ID`` (flush.c) for each ``send_file``
    request, before it moves the file to ``incoming/`` and replies: what
    ``postqueue -i`` and qrunner ask for, one request per connection, in
    the order the service's processes take them (qrunner keeps a few on
    their way at once, of one priority; see
    :meth:`PostfixInstance.flush_requests`). The
    flush daemon does nothing else in these tests, so the extra lines are
    a few per request.
    """
    out: List[str] = []
    for line in master_cf.splitlines():
        fields = line.split()
        if line[:1] not in ("", " ", "\t", "#") and fields[:2] == ["flush", "unix"] and "-v" not in fields[8:]:
            line += " -v"
        out.append(line)
    return "\n".join(out) + "\n"


class PostfixInstance:
    """A private Postfix instance under ``base_dir``, relaying to ``relay_port``.

    Nothing runs until :meth:`start`; :meth:`stop` stops it. Every command
    uses this instance's configuration directory (``-c``/``-C``), so the
    system's Postfix, running or not, is never involved.
    """

    def __init__(self, base_dir: str, relay_port: int,
                 settings: Optional[Dict[str, str]] = None,
                 hostname: str = "qrunner-test.localdomain"):
        self.base_dir = os.path.abspath(base_dir)
        self.relay_port = relay_port
        self.hostname = hostname
        self.config_directory = os.path.join(self.base_dir, "etc")
        self.queue_directory = os.path.join(self.base_dir, "queue")
        self.data_directory = os.path.join(self.base_dir, "data")
        self.maillog_file = os.path.join(self.base_dir, "log", "maillog")
        self.settings = dict(settings or {})
        self._written = False

    # -- configuration ---------------------------------------------------

    def main_cf(self) -> Dict[str, str]:
        """The main.cf settings of this instance (see the module docstring)."""
        system = _postconf_values(_COPIED_SETTINGS)
        cf: Dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_directory,
            "data_directory": self.data_directory,
            "maillog_file": self.maillog_file,
            "maillog_file_prefixes": self.base_dir,
            "syslog_name": "postfix-qrunner-test",
            "myhostname": self.hostname,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "[127.0.0.1]:%d" % self.relay_port,
            "defer_transports": "smtp",
            "smtputf8_enable": "yes",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "300s",
            "maximal_backoff_time": "600s",
            "smtp_connect_timeout": "5s",
            "delay_warning_time": "0",
            "append_dot_mydomain": "no",
            "mailbox_size_limit": "0",
            "message_size_limit": "0",
        }
        cf.update(system)
        cf.update(self.settings)
        return cf

    def write_config(self) -> None:
        """Create the directories and write main.cf and master.cf."""
        os.makedirs(self.base_dir, exist_ok=True)
        # Postfix's daemons run as the postfix user and look up paths below
        # base_dir (the log, the data directory): keep it traversable.
        os.chmod(self.base_dir, 0o755)
        for d in (self.config_directory, self.queue_directory,
                  os.path.dirname(self.maillog_file)):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        with open(os.path.join(SYSTEM_CONFIG_DIRECTORY, "master.cf")) as f:
            master = _verbose_flush(_strip_inet_and_chroot(f.read()))
        with open(os.path.join(self.config_directory, "master.cf"), "w") as f:
            f.write(master)
        with open(os.path.join(self.config_directory, "main.cf"), "w") as f:
            f.write("# private Postfix instance for qrunner's tests\n")
            for name, value in self.main_cf().items():
                f.write("%s = %s\n" % (name, value))
        self._written = True

    def set(self, **settings: str) -> None:
        """Change main.cf settings (``postconf -e``) and reload if running."""
        self.settings.update(settings)
        args = ["%s=%s" % kv for kv in settings.items()]
        self._run(["postconf", "-c", self.config_directory, "-e"] + args)
        if self.is_running():
            self.reload()

    def reload(self) -> None:
        """``postfix reload``: make the running instance read main.cf again."""
        self._run(["postfix", "-c", self.config_directory, "reload"])

    # -- extra master.cf services (added by tests that need a listener) ----

    def add_master_service(self, service: str, service_type: str, command: str,
                           options: Optional[Dict[str, str]] = None,
                           private: str = "n", unpriv: str = "-", chroot: str = "n",
                           wakeup: str = "-", maxproc: str = "-") -> None:
        """Append (or replace) one master.cf service entry, reloading if running.

        An entry with the same service name and type is replaced, so a test
        may call this again with other options; every other entry is kept.
        ``options`` become ``-o name=value`` lines (an empty value is
        written as ``name=``, which is how master.cf empties a setting).
        Postfix's master reads master.cf again on ``postfix reload`` and
        opens (or closes) the inet listeners it names.
        """
        path = os.path.join(self.config_directory, "master.cf")
        if not self._written:
            self.write_config()
        with open(path) as f:
            kept = _drop_master_entry(f.read(), service, service_type)
        lines = ["%s %s %s %s %s %s %s %s" % (service, service_type, private, unpriv,
                                               chroot, wakeup, maxproc, command)]
        for name, value in (options or {}).items():
            lines.append("  -o %s=%s" % (name, value))
        with open(path, "w") as f:
            f.write(kept.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        if self.is_running():
            self.reload()

    def append_master_cf(self, text: str) -> None:
        """Append master.cf lines as given (e.g. a contrib/ file), reloading if running."""
        if not self._written:
            self.write_config()
        path = os.path.join(self.config_directory, "master.cf")
        with open(path, "a") as f:
            f.write("\n" + text.rstrip("\n") + "\n")
        if self.is_running():
            self.reload()

    def add_smtpd_listener(self, port: int, options: Optional[Dict[str, str]] = None) -> None:
        """A plain loopback smtpd on 127.0.0.1:``port``, for submitting test mail over SMTP.

        Mail submitted here is routed as usual (relayhost, gated by
        ``defer_transports``), so a test can give it SMTP-only envelope
        parameters (RET, ENVID, NOTIFY, ORCPT, BODY, SMTPUTF8) that
        ``sendmail`` cannot all express. Clients in ``mynetworks`` may relay.
        """
        opts = {"smtpd_recipient_restrictions": "permit_mynetworks,reject",
                "smtpd_relay_restrictions": ""}
        opts.update(options or {})
        self.add_master_service("127.0.0.1:%d" % port, "inet", "smtpd", opts)

    def add_reinjection_listener(self, port: int, transport: str, nexthop: str,
                                 options: Optional[Dict[str, str]] = None) -> None:
        """A sender's re-injection listener and transport, as contrib/postfix/master.cf.qrunner has them.

        The loopback smtpd on 127.0.0.1:``port`` stamps every message with
        ``content_filter=TRANSPORT:NEXTHOP`` and skips what already happened
        when the message first arrived (DESIGN.md section 5b);
        ``TRANSPORT`` is an smtp clone that is not in ``defer_transports``,
        so the copy leaves at once, gate or not. ``options`` override or
        add listener options (e.g. a recipient restriction that refuses).
        """
        opts = reinjection_listener_options(transport, nexthop)
        opts.update(options or {})
        self.add_master_service(transport, "unix", "smtp", None, private="-", unpriv="-")
        self.add_master_service("127.0.0.1:%d" % port, "inet", "smtpd", opts)

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Write the configuration if needed, create the queue, start master."""
        if not self._written:
            self.write_config()
        # "postfix start" runs postfix-script's checks and, when the queue
        # directories are missing, creates them with Postfix's owners and
        # modes (post-install create-missing): most of its 2.5 s.
        self._run(["postfix", "-c", self.config_directory, "start"])
        deadline = time.monotonic() + 15
        while not self._services_ready():
            if time.monotonic() > deadline:
                raise PostfixError("private Postfix did not come up; log:\n" + self.log_text())
            time.sleep(0.05)

    def _services_ready(self) -> bool:
        return self.is_running() and os.path.exists(
            os.path.join(self.queue_directory, "public", "pickup"))

    def stop(self) -> None:
        """Stop master and wait until it is gone (no error if not running)."""
        if not self.is_running():
            return
        subprocess.run(["postfix", "-c", self.config_directory, "stop"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while self.is_running():
            if time.monotonic() > deadline:
                subprocess.run(["postfix", "-c", self.config_directory, "abort"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                break
            time.sleep(0.05)

    def is_running(self) -> bool:
        """True when this instance's master process runs."""
        if not os.path.isdir(self.queue_directory):
            return False
        r = subprocess.run(["postfix", "-c", self.config_directory, "status"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return r.returncode == 0

    def cleanup(self) -> None:
        """Stop the instance and delete its base directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "PostfixInstance":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail ----------------------------------------------------------------

    def submit(self, sender: str, recipients: Sequence[str], message: bytes,
               timeout: float = 20.0, sendmail_options: Sequence[str] = ()) -> str:
        """Submit ``message`` (raw bytes) with ``sendmail``; return its queue id.

        Postfix's sendmail does not print the queue id, so it is taken from
        the ``pickup`` log line (``ID: uid=0 from=<sender>``) that appears
        after the submission: that works for mail that stays in the queue
        and for mail delivered at once. Submissions from one test are
        sequential, so the first new pickup line is this message's.
        ``sendmail_options`` go before the recipients (e.g. ``["-N",
        "success", "-R", "hdrs", "-V", "envid"]`` for DSN, ``["-B",
        "8BITMIME"]``).
        """
        offset = self._log_size()
        argv = [self._command("sendmail"), "-C", self.config_directory, "-i",
                "-f", sender] + list(sendmail_options) + ["--"] + list(recipients)
        r = subprocess.run(argv, input=message, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            raise PostfixError("%s failed (exit %d): %s" % (
                " ".join(argv), r.returncode, r.stderr.decode("utf-8", "replace")))
        pattern = re.compile(
            r"/pickup\[\d+\]: ([0-9A-Za-z]+): uid=\d+ from=<%s>" % re.escape(sender))
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self._log_from(offset))
            if m:
                return m.group(1)
            if time.monotonic() > deadline:
                raise PostfixError(
                    "submitted message from <%s> was not picked up within %.0f s; log:\n%s"
                    % (sender, timeout, self.log_text()[-4000:]))
            time.sleep(0.02)

    def queue(self) -> List[dict]:
        """The queue as ``postqueue -j`` lists it, one dict per message."""
        r = self._run(["postqueue", "-c", self.config_directory, "-j"])
        out = []
        for line in r.stdout.splitlines():
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out

    def queue_names(self) -> Dict[str, str]:
        """queue_id -> queue_name for every queued message."""
        return {m["queue_id"]: m["queue_name"] for m in self.queue()}

    def wait_for_queue(self, queue_ids: Iterable[str], queue_name: str,
                       timeout: float = 20.0) -> List[dict]:
        """Wait until every id is listed in ``queue_name``; return their entries."""
        wanted = list(queue_ids)
        deadline = time.monotonic() + timeout
        while True:
            entries = {m["queue_id"]: m for m in self.queue()}
            if all(entries.get(i, {}).get("queue_name") == queue_name for i in wanted):
                return [entries[i] for i in wanted]
            if time.monotonic() > deadline:
                where = {i: entries.get(i, {}).get("queue_name", "not queued") for i in wanted}
                raise PostfixError("messages not all in %s after %.0f s: %s; log tail:\n%s"
                                   % (queue_name, timeout, where, self.log_text()[-3000:]))
            time.sleep(0.05)

    def wait_deferred(self, queue_ids: Iterable[str], timeout: float = 20.0) -> List[dict]:
        """Wait until every id sits in the deferred queue (gate mode: at once)."""
        return self.wait_for_queue(queue_ids, "deferred", timeout)

    def wait_gone(self, queue_ids: Iterable[str], timeout: float = 20.0) -> None:
        """Wait until none of the ids is queued any more (delivered or bounced)."""
        wanted = set(queue_ids)
        deadline = time.monotonic() + timeout
        while True:
            left = wanted & {m["queue_id"] for m in self.queue()}
            if not left:
                return
            if time.monotonic() > deadline:
                raise PostfixError("still queued after %.0f s: %s" % (timeout, sorted(left)))
            time.sleep(0.05)

    def hold(self, queue_ids: Iterable[str]) -> str:
        """``postsuper -h -``: put the ids on hold; returns postsuper's stderr."""
        return self._postsuper("-h", queue_ids)

    def release(self, queue_ids: Iterable[str]) -> str:
        """``postsuper -H -``: release the ids from hold; returns its stderr."""
        return self._postsuper("-H", queue_ids)

    def delete(self, queue_ids: Iterable[str]) -> str:
        """``postsuper -d -``: delete the ids; returns its stderr."""
        return self._postsuper("-d", queue_ids)

    def delete_all(self) -> None:
        """Empty every queue of this instance (``postsuper -d ALL``)."""
        self._run(["postsuper", "-c", self.config_directory, "-d", "ALL"])

    def schedule(self, queue_id: str) -> None:
        """``postqueue -i ID``: deliver one deferred message now, gate or not."""
        self._run(["postqueue", "-c", self.config_directory, "-i", queue_id])

    def flush_all_gated(self) -> None:
        """Schedule every deferred message, one ``postqueue -i`` each."""
        for m in self.queue():
            if m["queue_name"] == "deferred":
                self.schedule(m["queue_id"])

    def postcat_headers(self, queue_id: str) -> List[bytes]:
        """The header lines ``postcat -c DIR -hq ID`` prints, without line ends."""
        r = self._run(["postcat", "-c", self.config_directory, "-hq", queue_id])
        lines = r.stdout.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return lines

    def flush_requests(self) -> List[str]:
        """Queue ids the flush service was asked to deliver, in the order it took the requests, from the log.

        One entry per ``send_file`` request (``postqueue -i ID``, or
        qrunner on the flush socket), logged by the verbose flush daemon
        (see :func:`_verbose_flush`) as it takes the request: of the few
        requests qrunner has on their way at once (one priority), in the
        order the service's processes took them. Scheduling order, not
        delivery order: the queue manager delivers concurrently (DESIGN.md
        section 4).
        """
        return _FLUSH_REQUEST.findall(self.log_text())

    def postconf(self, name: str) -> str:
        """One setting of this instance as ``postconf -h`` prints it."""
        r = self._run(["postconf", "-c", self.config_directory, "-h", name])
        return r.stdout.decode().strip()

    def log_text(self) -> str:
        """The instance's maillog so far ("" if there is none yet)."""
        try:
            with open(self.maillog_file, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- helpers ---------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.maillog_file)
        except OSError:
            return 0

    def _log_from(self, offset: int) -> str:
        try:
            with open(self.maillog_file, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _command(self, name: str) -> str:
        directory = self.main_cf().get("command_directory") or "/usr/sbin"
        path = os.path.join(directory, name)
        return path if os.path.exists(path) else name

    def _postsuper(self, flag: str, queue_ids: Iterable[str]) -> str:
        data = "".join(i + "\n" for i in queue_ids).encode()
        r = self._run(["postsuper", "-c", self.config_directory, flag, "-"], input=data)
        return r.stderr.decode("utf-8", "replace")

    def _run(self, argv: List[str], input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, input=input, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0:
            raise PostfixError("%s failed (exit %d): %s%s" % (
                " ".join(argv), r.returncode, r.stderr.decode("utf-8", "replace"),
                r.stdout.decode("utf-8", "replace")))
        return r


def reinjection_listener_options(transport: str, nexthop: str, hold: bool = True) -> Dict[str, str]:
    """The ``-o`` options of a re-injection listener (contrib/postfix/master.cf.qrunner says why).

    ``hold``: the listener puts each copy on hold as it accepts it (the
    exactly-once hand-over); False gives an older listener without it.
    """
    return {
        "content_filter": "%s:%s" % (transport, nexthop),
        "receive_override_options": ("no_unknown_recipient_checks,no_header_body_checks,"
                                     "no_milters,no_address_mappings"),
        "mynetworks": "127.0.0.0/8",
        "smtpd_client_restrictions": "",
        "smtpd_helo_restrictions": "",
        "smtpd_sender_restrictions": "",
        "smtpd_relay_restrictions": "",
        "smtpd_recipient_restrictions": "permit_mynetworks,reject",
        "smtpd_data_restrictions": "check_client_access,static:HOLD" if hold else "",
        "smtpd_end_of_data_restrictions": "",
        "smtpd_discard_ehlo_keywords": "",
        "smtpd_discard_ehlo_keyword_address_maps": "",
        "smtpd_recipient_limit": "100000",
        "smtpd_tls_security_level": "none",
        "smtpd_sasl_auth_enable": "no",
        "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
    }


def _drop_master_entry(master_cf: str, service: str, service_type: str) -> str:
    """master.cf text without the entry (and its indented lines) for service/type."""
    out: List[str] = []
    dropping = False
    for line in master_cf.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)  # comments and blank lines are kept, and end nothing
            continue
        if line[0] not in " \t":
            dropping = line.split()[:2] == [service, service_type]
        if not dropping:
            out.append(line)
    return "\n".join(out) + "\n"


def _postconf_values(names: Sequence[str]) -> Dict[str, str]:
    """The system Postfix's values of ``names`` (those it knows)."""
    r = subprocess.run(["postconf", "-c", SYSTEM_CONFIG_DIRECTORY] + list(names),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    values = {}
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name in names and value.strip():
            values[name] = value.strip()
    return values


def make_instance(relay_port: int, settings: Optional[Dict[str, str]] = None) -> PostfixInstance:
    """A PostfixInstance in a fresh short directory under /tmp.

    Short, because Postfix's UNIX sockets live under the queue directory and
    socket paths are limited to about 100 bytes; under /tmp rather than
    pytest's 0700 tmp_path, because Postfix's daemons run as the postfix
    user.
    """
    base = tempfile.mkdtemp(prefix="qr-pf-", dir="/tmp")
    return PostfixInstance(base, relay_port, settings=settings)
