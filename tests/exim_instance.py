"""A private Exim instance for end-to-end tests.

The tests need a real Exim (DESIGN.md sections 5 and 6) on a machine that
also runs Postfix, and Debian's exim4 and postfix packages conflict. So
``tests/setup/install-exim.sh`` unpacks Debian's Exim into
:data:`PREFIX` without installing it, and :class:`EximInstance` gives each
test run its own configuration file, spool, logs and mailbox under one base
directory. Every command is ``<PREFIX>/usr/sbin/exim4 -C <config> ...`` as
root; nothing under ``/etc/exim4`` or ``/var/spool/exim4`` is used.

No daemon. Exim needs none for what the tests (and qrunner) do: a
submission on the command line (``exim -f S -- R``, ``-bs``, ``-bS``)
writes the spool itself and, for mail not queued by the gate, forks its own
delivery; ``exim -M`` delivers named messages itself; ``-Mf``/``-Mt``/
``-MG`` edit the spool. A daemon would only add queue runners, which never
touch a named queue anyway, and a listening port. So :meth:`start` writes
the configuration and checks it with ``exim -bV`` (which exits 1 and names
the file and line of a broken configuration on stderr), and
:meth:`is_running` means "the binary and the configuration work": the same
thing qrunner can check before it acts.

The configuration (see :meth:`EximInstance.config_text`), and why:

- ``exim_path`` is the private binary: every re-exec (a delivery process
  started after a submission) runs ``exim_path``, which would otherwise be
  the missing ``/usr/sbin/exim4``. ``spool_directory``, ``log_file_path``
  and ``keep_environment =`` keep everything inside the base directory and
  silence the environment warning.
- ``deliver_drop_privilege``: the private binary is not setuid root (the
  installer removes the bit), so a delivery process forked after a
  submission (which Exim receives as the Exim user) cannot regain root;
  with this option it does not try, and delivers as ``Debian-exim``, which
  is all the SMTP and mailbox transports here need.
- The gate, as qrunner's README tells admins to configure it:
  ``acl_not_smtp_start`` (command-line submission) and
  ``acl_smtp_predata`` (``-bs``/``-bS`` input, and SMTP) set
  ``queue = qrunner`` for mail with a non-local recipient, and
  ``queue =`` (the default queue) for every other message: Exim 4.96
  never resets the queue name between the messages of one SMTP session
  or batch, so a gate that only ever sets it would gate every later
  message of the session too. ``queue =`` alone does not stop the
  immediate delivery; ``control = queue`` does, and is allowed in
  ``acl_smtp_predata`` and ``acl_not_smtp`` but not in
  ``acl_not_smtp_start`` (an error there, which Exim ignores silently:
  the message is then delivered at once). So ``acl_not_smtp`` adds it for
  mail in the ``qrunner`` queue.
- Mail for other domains goes to ``127.0.0.1::<relay_port>`` (the test's
  SMTP sink) by a ``manualroute`` router with ``self = send`` (127.0.0.1
  is this host) over an ``smtp`` transport with ``allow_localhost`` and no
  TLS. Local domains go to one mailbox file (bounces land there).
- ``acl_not_smtp`` and ``acl_smtp_data`` remove the header
  ``X-Qrunner-Test-Remove``, so that tests get a header flagged ``*``
  (deleted) in the ``-H`` file.
- ``dsn_advertise_hosts = *``, so that ``-bs`` input may use DSN
  parameters (NOTIFY, ORCPT, RET, ENVID).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

PREFIX = os.environ.get("QRUNNER_TEST_EXIM_PREFIX", "/opt/qrunner-test-exim")
BINARY = os.path.join(PREFIX, "usr", "sbin", "exim4")
EXIPICK = os.path.join(PREFIX, "usr", "sbin", "exipick")
EXIM_DUMPDB = os.path.join(PREFIX, "usr", "sbin", "exim_dumpdb")
EXIM_USER = "Debian-exim"
QUEUE_NAME = "qrunner"
REMOVED_HEADER = "X-Qrunner-Test-Remove"

# One queue entry of "exim -bp": age, size, id, <sender>, optional
# "(login)" for an untrusted -f, optional frozen marker.
_BP_ENTRY = re.compile(
    r"^\s*\d+[mhd]\s+(?P<size>\S+)\s+(?P<id>[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4})"
    r"(?: <(?P<sender>.*?)>(?= |$))?(?: \([^)]*\))?(?P<frozen> \*\*\* frozen \*\*\*)?\s*$")
_BP_RCPT = re.compile(r"^        (?P<flag>[D ]) (?P<address>.*)$")
_RECEIVED = re.compile(r"^\S+ \S+ (?:\[\d+\] )?(?P<id>[0-9A-Za-z-]{16,23}) <= ")
_SMTP_ID = re.compile(rb"^250 OK id=(\S+)", re.M)
# One message of "exipick -i --show-vars A,B": "ID A='value' B='value'".
_EXIPICK_VAR = re.compile(r"(\w+)='([^']*)'")


class EximError(RuntimeError):
    """An Exim command failed; the message holds its command line and output."""


def kernel_locks() -> Set[Tuple[int, int, int]]:
    """(major, minor, inode) of every file a process holds a lock on, from ``/proc/locks``.

    The kernel's own lock table, so that "Exim is working on this message"
    is read from the kernel rather than from qrunner's lock probe. A line
    looks like ``1: POSIX  ADVISORY  WRITE 4242 fe:00:2163621 0 18`` (Exim's
    lock on the first bytes of a ``-D`` file); the device is ``major:minor``
    in hex. A ``->`` line is a process waiting for that lock, not holding it.
    """
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or fields[1] == "->":
                continue
            major, minor, inode = fields[5].split(":")
            held.add((int(major, 16), int(minor, 16), int(inode)))
    return held


def _file_key(path: str) -> Optional[Tuple[int, int, int]]:
    """The (major, minor, inode) /proc/locks names ``path`` by; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def exim_missing_reason() -> Optional[str]:
    """Why a private Exim cannot run here, or None if it can."""
    if not os.access(BINARY, os.X_OK):
        return ("the private Exim is not installed (no %s); run tests/setup/install-exim.sh as root"
                % BINARY)
    if os.geteuid() != 0:
        return "the Exim tests must run as root (the private Exim is run with -C as root)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return "the user %s is missing; run tests/setup/install-exim.sh as root" % EXIM_USER
    r = subprocess.run([BINARY, "-C", "/dev/null", "-bV"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    if r.returncode != 0:
        return "%s does not run: %s" % (BINARY, r.stderr.decode("utf-8", "replace").strip()[:300])
    return None


class EximInstance:
    """A private Exim under ``base_dir`` whose relay mail goes to ``relay_port``.

    ``settings`` override or add main-section options (name -> value; a
    value of None removes the option, as an admin deletes its line);
    ``extra_routers`` / ``extra_transports`` are configuration text put
    first in those sections (a test of per-sender routing can add a router
    ahead of the relay).
    """

    def __init__(self, base_dir: str, relay_port: int,
                 settings: Optional[Dict[str, str]] = None,
                 hostname: str = "qrunner-test.localdomain",
                 extra_routers: str = "", extra_transports: str = ""):
        self.base_dir = os.path.abspath(base_dir)
        self.relay_port = relay_port
        self.hostname = hostname
        self.binary = BINARY
        self.config_path = os.path.join(self.base_dir, "exim.conf")
        self.spool_directory = os.path.join(self.base_dir, "spool")
        self.log_directory = os.path.join(self.base_dir, "log")
        self.mailbox = os.path.join(self.base_dir, "mail", "mailbox")
        self.queue_name = QUEUE_NAME
        self.settings = dict(settings or {})
        self.extra_routers = extra_routers
        self.extra_transports = extra_transports
        self._written = False

    # -- configuration ---------------------------------------------------

    @property
    def argv(self) -> List[str]:
        """The command that runs this instance's Exim: binary and ``-C``."""
        return [self.binary, "-C", self.config_path]

    @property
    def mainlog(self) -> str:
        return os.path.join(self.log_directory, "mainlog")

    @property
    def split_spool_directory(self) -> bool:
        value = self.main_settings().get("split_spool_directory", "false").strip().lower()
        return value in ("true", "yes", "1")

    def main_settings(self) -> Dict[str, str]:
        """The main-section options of this instance (see the module docstring)."""
        main: Dict[str, str] = {
            "exim_path": self.binary,
            "spool_directory": self.spool_directory,
            "log_file_path": os.path.join(self.log_directory, "%slog"),
            "exim_user": EXIM_USER,
            "exim_group": EXIM_USER,
            "keep_environment": "",
            "primary_hostname": self.hostname,
            "qualify_domain": self.hostname,
            "deliver_drop_privilege": "true",
            "tls_advertise_hosts": "",
            "dsn_advertise_hosts": "*",
            "host_lookup": "",
            "rfc1413_hosts": "",
            "split_spool_directory": "false",
            "log_selector": "+received_recipients +delivery_size",
            "acl_not_smtp_start": "acl_qrunner_gate",
            "acl_not_smtp": "acl_not_smtp",
            "acl_smtp_rcpt": "acl_check_rcpt",
            "acl_smtp_predata": "acl_qrunner_gate_smtp",
            # BDAT (CHUNKING) skips acl_smtp_predata in 4.96: offer no CHUNKING, or the gate leaks.
            "chunking_advertise_hosts": "",
            "acl_smtp_data": "acl_check_data",
        }
        main.update(self.settings)
        return {name: value for name, value in main.items() if value is not None}  # None: the option removed

    def config_text(self) -> str:
        """The whole configuration file."""
        main = "\n".join("%s = %s" % kv for kv in self.main_settings().items())
        return """# private Exim instance for qrunner's tests (tests/exim_instance.py)
domainlist local_domains = @ : localhost : {host}
{main}

begin acl

# The gate (contrib/exim/exim-gate.conf): relay mail into the named queue.
# "queue =" is set for every message (empty: the default queue), because
# Exim does not reset it between the messages of one SMTP session or batch.
acl_qrunner_gate:
  warn   queue = ${{if or{{{{eq{{$recipients}}{{}}}}{{forany{{<, $recipients}}{{and{{{{!eq{{${{domain:$item}}}}{{}}}}{{!match_domain{{${{domain:$item}}}}{{+local_domains}}}}}}}}}}}}{{{queue}}}{{}}}}
  accept

acl_not_smtp:
  warn   remove_header = {removed}
  accept condition = ${{if eq{{$queue_name}}{{{queue}}}}}
         control = queue
  accept

acl_qrunner_gate_smtp:
  warn   queue = ${{if or{{{{eq{{$recipients}}{{}}}}{{forany{{<, $recipients}}{{and{{{{!eq{{${{domain:$item}}}}{{}}}}{{!match_domain{{${{domain:$item}}}}{{+local_domains}}}}}}}}}}}}{{{queue}}}{{}}}}
  accept condition = ${{if eq{{$queue_name}}{{{queue}}}}}
         control = queue
  accept

acl_check_rcpt:
  accept

acl_check_data:
  accept remove_header = {removed}

begin routers

{extra_routers}
relay:
  driver = manualroute
  domains = ! +local_domains
  transport = relay_smtp
  route_list = * 127.0.0.1::{port}
  self = send
  no_more

local:
  driver = accept
  domains = +local_domains
  transport = local_mailbox

begin transports

{extra_transports}
relay_smtp:
  driver = smtp
  allow_localhost
  hosts_avoid_tls = *
  connect_timeout = 5s

local_mailbox:
  driver = appendfile
  file = {mailbox}
  user = {user}
  group = {user}
  mode = 0640
  envelope_to_add
  return_path_add

begin retry

*  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h
""".format(host=self.hostname, main=main, queue=self.queue_name, removed=REMOVED_HEADER,
           port=self.relay_port, mailbox=self.mailbox, user=EXIM_USER,
           extra_routers=self.extra_routers, extra_transports=self.extra_transports)

    def write_config(self) -> None:
        """Create the directories (Exim's user must reach them) and the config file."""
        ent = pwd.getpwnam(EXIM_USER)
        os.makedirs(self.base_dir, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        for d in (self.spool_directory, self.log_directory, os.path.dirname(self.mailbox)):
            os.makedirs(d, exist_ok=True)
            os.chown(d, ent.pw_uid, ent.pw_gid)
            os.chmod(d, 0o750)
        # Exim refuses a configuration file that others may write.
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.config_text())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config_path)
        self._written = True

    def set(self, **settings: Optional[str]) -> None:
        """Change main-section options and rewrite the configuration.

        No reload: every Exim process reads the file when it starts.
        """
        self.settings.update(settings)
        self.write_config()

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Write the configuration and check that Exim accepts it (no daemon)."""
        if not self._written:
            self.write_config()
        r = self._exim(["-bV"], check=False)
        if r.returncode != 0:
            raise EximError("the private Exim rejects its configuration: %s"
                            % r.stderr.decode("utf-8", "replace").strip())

    def stop(self) -> None:
        """Nothing runs between commands; wait for deliveries still running."""
        deadline = time.monotonic() + 15
        while self._locked_ids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def is_running(self) -> bool:
        """True when the binary runs with this configuration (``exim -bV``)."""
        if not os.path.exists(self.config_path):
            return False
        return self._exim(["-bV"], check=False).returncode == 0

    def cleanup(self) -> None:
        """Wait for running deliveries, then delete the base directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "EximInstance":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail ----------------------------------------------------------------

    def submit(self, sender: str, recipients: Sequence[str], message: bytes,
               extra_args: Sequence[str] = (), timeout: float = 30.0) -> str:
        """Submit raw ``message`` as ``sendmail`` would; return its message id.

        ``exim -C CFG -oi -f SENDER [extra_args] -- RCPT...`` (``-f ''`` for
        the null sender). Exim does not print the id; its reception log
        line (``ID <= sender ...``) is written before the command exits,
        so the first such line after the submission is this message's.
        """
        offset = self._log_size()
        argv = self.argv + ["-oi", "-f", sender] + list(extra_args) + ["--"] + list(recipients)
        r = subprocess.run(argv, input=message, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            raise EximError("%s failed (exit %d): %s" % (
                " ".join(argv), r.returncode, r.stderr.decode("utf-8", "replace")))
        for line in self._log_from(offset).splitlines():
            m = _RECEIVED.match(line)
            if m:
                return m.group("id")
        raise EximError("submitted message from <%s> has no reception line in the log:\n%s"
                        % (sender, self.log_text()[-4000:]))

    def submit_smtp(self, sender: str, recipients: Sequence[str], message: bytes,
                    mail_params: str = "", rcpt_params: Optional[Dict[str, str]] = None,
                    timeout: float = 30.0) -> str:
        """Submit over SMTP on stdin (``exim -bs``), with ESMTP parameters.

        For what the command line cannot say, such as DSN
        (``mail_params="RET=HDRS ENVID=x"``, ``rcpt_params={rcpt:
        "NOTIFY=SUCCESS ORCPT=rfc822;a@b"}``). Goes through the SMTP ACLs
        (``acl_smtp_rcpt``'s gate). Returns the id from the reply to DATA.
        """
        rcpt_params = rcpt_params or {}
        lines = [b"EHLO qrunner-test", ("MAIL FROM:<%s>%s" % (
            sender, " " + mail_params if mail_params else "")).encode()]
        for rcpt in recipients:
            params = rcpt_params.get(rcpt, "")
            lines.append(("RCPT TO:<%s>%s" % (rcpt, " " + params if params else "")).encode())
        lines.append(b"DATA")
        body = message.replace(b"\r\n", b"\n").split(b"\n")
        if body and body[-1] == b"":
            body.pop()
        body = [b"." + ln if ln.startswith(b".") else ln for ln in body]
        script = b"\r\n".join(lines + body + [b".", b"QUIT"]) + b"\r\n"
        r = self._exim(["-bs"], input=script, timeout=timeout, check=False)
        m = _SMTP_ID.search(r.stdout)
        if r.returncode != 0 or m is None:
            raise EximError("exim -bs did not accept the message (exit %d):\n%s%s" % (
                r.returncode, r.stdout.decode("utf-8", "replace"),
                r.stderr.decode("utf-8", "replace")))
        return m.group(1).decode()

    def wait_queued(self, ids: Iterable[str], timeout: float = 20.0,
                    queue_name: Optional[str] = None) -> None:
        """Wait until each message has its ``-H`` file in the queue.

        A command-line submission writes the spool before it exits, so this
        returns at once for those; it is for mail that arrives otherwise
        (a bounce generated by a delivery).
        """
        want = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            missing = [i for i in want if not os.path.exists(self.header_path(i, queue_name))]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise EximError("messages %s did not reach the %s queue within %.0f s"
                                % (", ".join(missing), self._qname(queue_name) or "default",
                                   timeout))
            time.sleep(0.02)

    def queue(self, queue_name: Optional[str] = None) -> List[dict]:
        """One queue as ``exim [-qG<queue>] -bp`` lists it, a dict per message.

        Keys: ``id``, ``sender`` ("" for <>), ``size`` (as shown: "1.5K"),
        ``frozen``, ``recipients`` (still pending, in order), ``delivered``.
        ``queue_name`` None means this instance's named queue; "" the
        default queue.
        """
        r = self._exim(self._qarg(queue_name) + ["-bp"])
        out: List[dict] = []
        for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
            m = _BP_ENTRY.match(line)
            if m:
                out.append({"id": m.group("id"), "sender": m.group("sender") or "",
                            "size": m.group("size"), "frozen": bool(m.group("frozen")),
                            "recipients": [], "delivered": []})
                continue
            m = _BP_RCPT.match(line)
            if m and out:
                key = "delivered" if m.group("flag") == "D" else "recipients"
                out[-1][key].append(m.group("address"))
        return out

    def queue_ids(self, queue_name: Optional[str] = None) -> List[str]:
        return [m["id"] for m in self.queue(queue_name)]

    def freeze(self, ids: Iterable[str], queue_name: Optional[str] = None) -> None:
        """``exim -qG<queue> -Mf ID...``, as an admin freezes mail."""
        self._exim(self._qarg(queue_name) + ["-Mf"] + list(ids))

    def thaw(self, ids: Iterable[str], queue_name: Optional[str] = None) -> None:
        """``exim -qG<queue> -Mt ID...``."""
        self._exim(self._qarg(queue_name) + ["-Mt"] + list(ids))

    def deliver(self, message_id: str, queue_name: Optional[str] = None,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``exim -qG<queue> -M ID``: deliver one message now (returns when done)."""
        return self._exim(self._qarg(queue_name) + ["-M", message_id], timeout=timeout)

    def delete_all(self) -> None:
        """Remove every message from the default and the named queue, and Exim's hints.

        ``exim -Mrm`` each; a message still being delivered is waited for
        (up to 15 s), and whatever Exim would not remove is deleted from
        the spool directly, so that the next test starts empty. The hints
        (``spool/db``: retry times, messages waiting for a host) go too:
        one test's relay outage must not hold the next test's mail.
        """
        self._delete_messages()
        hints = os.path.join(self.spool_directory, "db")
        for name in os.listdir(hints) if os.path.isdir(hints) else ():
            os.remove(os.path.join(hints, name))

    def _delete_messages(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            left = False
            for q in ("", self.queue_name):
                ids = self._spool_ids(q)
                if ids:
                    left = True
                    self._exim(self._qarg(q) + ["-Mrm"] + ids, check=False)
            if not left or not any(self._spool_ids(q) for q in ("", self.queue_name)):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for q in ("", self.queue_name):
            top = os.path.join(self.spool_directory, q) if q else self.spool_directory
            for sub in ("input", "msglog"):
                shutil.rmtree(os.path.join(top, sub), ignore_errors=True)

    def headers_mvh(self, message_id: str, queue_name: Optional[str] = None) -> List[bytes]:
        """The live header fields as ``exim -Mvh ID`` shows them.

        Exim 4.96 prints the ``-H`` file as it is; this takes the part
        after the first blank line and reads its records (a length of 3 or
        more digits, a flag, a space, that many bytes), leaving out those
        flagged ``*``, with the final newline of each removed. A small
        reader of its own, so that tests compare qrunner's reader against
        something independent of it.
        """
        r = self._exim(self._qarg(queue_name) + ["-Mvh", message_id])
        data = r.stdout
        cut = data.find(b"\n\n")
        if cut < 0:
            raise EximError("exim -Mvh %s printed no header part" % message_id)
        pos = cut + 2
        fields = []
        record = re.compile(rb"(\d{3,})(.) ", re.S)
        while pos < len(data):
            m = record.match(data, pos)
            if m is None:
                raise EximError("exim -Mvh %s: no header record at offset %d" % (message_id, pos))
            n = int(m.group(1))
            text = data[m.end():m.end() + n]
            pos = m.end() + n
            if m.group(2) != b"*":
                fields.append(text[:-1] if text.endswith(b"\n") else text)
        return fields

    def expand(self, message_id: str, expression: str) -> str:
        """``exim -Mset ID -be EXPR``: an expansion in the context of a message.

        ``-Mset`` finds only messages of the default queue (Exim 4.96 does
        not honour ``-qG`` there): move a named-queue message first.
        """
        r = self._exim(["-Mset", message_id, "-be", expression])
        text = r.stdout.decode("utf-8", "replace")
        if "Failed to load message" in text:
            raise EximError("exim -Mset %s: %s" % (message_id, text.strip()))
        return text.strip()

    def move(self, message_id: str, to_queue: str, from_queue: Optional[str] = None) -> None:
        """``exim [-qG<from>] -MG <to> ID``: move a message between queues."""
        self._exim(self._qarg(from_queue) + ["-MG", to_queue, message_id])

    def header_path(self, message_id: str, queue_name: Optional[str] = None) -> str:
        """Where the message's ``-H`` file is in this instance's layout."""
        q = self._qname(queue_name)
        top = os.path.join(self.spool_directory, q) if q else self.spool_directory
        sub = [message_id[5]] if self.split_spool_directory else []
        return os.path.join(top, "input", *sub, message_id + "-H")

    def data_path(self, message_id: str, queue_name: Optional[str] = None) -> str:
        return self.header_path(message_id, queue_name)[:-2] + "-D"

    def bp_count(self, queue_name: Optional[str] = None) -> int:
        r = self._exim(self._qarg(queue_name) + ["-bpc"])
        return int(r.stdout.strip() or 0)

    def exipick(self, variables: Sequence[str], queue_name: Optional[str] = None) -> Dict[str, Dict[str, str]]:
        """Exim's own spool reader: message id -> {variable: value} for one queue.

        ``exipick --spool DIR [--queue NAME] -i --show-vars A,B`` prints
        ``ID A='value' B='value'`` per message (4.96: no JSON; ``-C`` would
        look for /usr/sbin/exim, hence ``--spool``). It gives what ``exim
        -bp`` rounds or leaves out: ``message_size`` in bytes (the
        ``$message_size`` Exim expands) and ``received_time`` in epoch
        seconds. Only for variables whose values hold no quote (ids,
        numbers): the output does not escape them.
        """
        q = self._qname(queue_name)
        argv = [EXIPICK, "--spool", self.spool_directory] + (["--queue", q] if q else []) + [
            "-i", "--show-vars", ",".join(variables)]
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0:
            raise EximError("%s failed (exit %d): %s" % (" ".join(argv), r.returncode,
                                                         r.stderr.decode("utf-8", "replace")))
        out: Dict[str, Dict[str, str]] = {}
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            if line.strip():
                out[line.split()[0]] = dict(_EXIPICK_VAR.findall(line))
        return out

    def retry_records(self) -> Dict[str, Tuple[str, float]]:
        """Exim's retry hints as ``exim_dumpdb SPOOL retry`` prints them: key -> (error text, next try, epoch).

        Each record is two lines: ``  KEY ERRNO MORE_ERRNO TEXT``, then the
        first failure, last try and next try in local time
        (``01-Dec-2026 12:03:29``), and ``*`` for a host past its cutoff.
        """
        r = subprocess.run([EXIM_DUMPDB, self.spool_directory, "retry"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60, env=dict(os.environ, LC_ALL="C"))
        lines = r.stdout.decode("utf-8", "replace").splitlines()
        records = {}
        for head, times in zip(lines[0::2], lines[1::2]):
            key, _errno, _more, text = (head.strip().split(" ", 3) + [""])[:4]
            next_try = " ".join(times.split()[4:6])
            records[key] = (text, time.mktime(time.strptime(next_try, "%d-%b-%Y %H:%M:%S")))
        return records

    def locked_ids(self, queue_name: Optional[str] = None) -> Set[str]:
        """Messages of one queue that an Exim process is working on (delivering, freezing).

        Exim holds a POSIX lock on the start of a message's ``-D`` file for
        as long as a process works on it (a second Exim skips it: "Spool
        file is locked"); this matches each ``-D`` file's device and inode
        against the kernel's lock table (:func:`kernel_locks`).
        """
        held = kernel_locks()
        q = self._qname(queue_name)
        return {i for i in self._spool_ids(q) if _file_key(self.data_path(i, q)) in held}

    def log_text(self) -> str:
        """The instance's main log so far ("" if there is none yet)."""
        try:
            with open(self.mainlog, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def mailbox_text(self) -> str:
        """What local deliveries (bounces among them) appended to the mailbox."""
        try:
            with open(self.mailbox, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def run(self, args: Sequence[str], input: Optional[bytes] = None,
            check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Any ``exim -C CFG args...`` command."""
        return self._exim(list(args), input=input, check=check, timeout=timeout)

    # -- helpers ---------------------------------------------------------------

    def _qname(self, queue_name: Optional[str]) -> str:
        return self.queue_name if queue_name is None else queue_name

    def _qarg(self, queue_name: Optional[str]) -> List[str]:
        q = self._qname(queue_name)
        return ["-qG" + q] if q else []

    def _spool_ids(self, queue_name: str) -> List[str]:
        top = os.path.join(self.spool_directory, queue_name) if queue_name else self.spool_directory
        ids = []
        for d, _dirs, files in os.walk(os.path.join(top, "input")):
            ids.extend(f[:-2] for f in files if f.endswith("-H"))
        return sorted(ids)

    def _locked_ids(self) -> Set[str]:
        """Messages of either queue that an Exim process still works on (see :meth:`locked_ids`)."""
        return self.locked_ids("") | self.locked_ids(self.queue_name)

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.mainlog)
        except OSError:
            return 0

    def _log_from(self, offset: int) -> str:
        try:
            with open(self.mainlog, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _exim(self, args: List[str], input: Optional[bytes] = None, check: bool = True,
              timeout: float = 60.0) -> subprocess.CompletedProcess:
        argv = self.argv + args
        r = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=None if input is not None else subprocess.DEVNULL,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise EximError("%s failed (exit %d): %s%s" % (
                " ".join(argv), r.returncode, r.stderr.decode("utf-8", "replace"),
                r.stdout.decode("utf-8", "replace")))
        return r


def make_instance(relay_port: int, settings: Optional[Dict[str, str]] = None,
                  **kwargs) -> EximInstance:
    """An EximInstance in a fresh directory under /tmp.

    Under /tmp rather than pytest's tmp_path, which is private to root:
    Exim receives and delivers as the Debian-exim user, which must reach
    the spool, the log and the mailbox.
    """
    base = tempfile.mkdtemp(prefix="qr-ex-", dir="/tmp")
    return EximInstance(base, relay_port, settings=settings, **kwargs)
