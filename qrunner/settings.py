"""Every setting of qrunner.toml, once: its name, table, type, default and the reason it exists.

This table is the one source of truth for the configuration. ``config.py``
reads its keys, type checks and defaults from it (the ``Config`` dataclasses
get their fields from it), and ``man/build.py`` writes qrunner.toml(5) and
``contrib/qrunner.toml`` from it: a setting cannot exist without its
documentation, and its documented default is the one the loader uses.

Adding a setting is one entry in ``SETTINGS`` (then ``make man`` to
regenerate the pages and the example configuration, which a test compares
with what is committed). Texts use the manual's mark-up: `code` in
backquotes, **bold**; the type's ``description`` is also what an error
message says the value must be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

LUA_VERSIONS = ("5.1", "5.2", "5.3", "5.4", "5.5", "luajit")
MTAS = ("auto", "postfix", "exim", "memory")
ON_SCRIPT_ERROR = ("skip", "send")
ON_HOLD_EXPIRY = ("send", "bounce")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> Optional[str]:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: Any) -> Optional[str]:
    return None if value >= 0 else "must be 0 (off: no limit) or more"


def _user_name(value: Any) -> Optional[str]:
    if not value or any(c.isspace() or c in ":/" for c in value):
        return 'must be a user name such as "_qrunner" (or "root" to run the policy script as root)'
    return None


def _one_of(choices: Tuple[str, ...]) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if value not in choices:
            return "must be one of " + ", ".join(f'"{c}"' for c in choices)
        return None

    return check


@dataclass(frozen=True)
class Kind:
    """A setting's type: what an error says it must be, the test, a further check, and the Python type it becomes."""

    description: str
    test: Callable[[Any], bool]
    check: Optional[Callable[[Any], Optional[str]]] = None  # a problem sentence, or None
    python: type = str
    choices: Tuple[str, ...] = ()

    @property
    def manual(self) -> str:
        """The type as the manual says it (a choice lists its values)."""
        if self.choices:
            return "one of " + ", ".join(f'`"{c}"`' for c in self.choices)
        return self.description

    def convert(self, value: Any) -> Any:
        return float(value) if self.python is float else value


def text(what: str) -> Kind:
    return Kind(f"a string ({what})", lambda v: isinstance(v, str))


def nonempty(what: str) -> Kind:
    return Kind(f"a non-empty string ({what})", lambda v: isinstance(v, str) and v != "")


def choice(choices: Tuple[str, ...]) -> Kind:
    return Kind("a string", lambda v: isinstance(v, str), _one_of(choices), str, choices)


def seconds(description: str, check=_positive) -> Kind:
    return Kind(description, _is_number, check, float)


def whole(description: str, check=_not_negative) -> Kind:
    return Kind(description, is_whole, check, int)


def whole_from_1(description: str) -> Kind:
    return Kind(description, lambda v: is_whole(v) and v >= 1, None, int)


BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool), None, bool)


@dataclass(frozen=True)
class Setting:
    """One key of qrunner.toml.

    ``default`` is what the loader uses (None: not set, found on the host or
    required); ``shown`` says it in words where the value alone would not
    (``"Postfix's own"``). ``note`` is the one-line comment beside the key in
    ``contrib/qrunner.toml``, ``example`` the value shown there when the
    default is None. ``reason`` is what the setting does and why it exists,
    for qrunner.toml(5).
    """

    name: str
    section: str  # "" (top level), "postfix", "exim", "memory", "sender", "sender.postfix", "sender.exim"
    kind: Kind
    default: Any
    reason: str
    note: str = ""
    shown: str = ""
    example: Any = None
    group: str = ""  # a heading within the section (qrunner.toml(5), contrib/qrunner.toml)
    set_in_example: bool = False  # contrib/qrunner.toml sets it (uncommented) rather than showing it

    @property
    def key(self) -> str:
        """The key as an error message and the manual name it: ``exim.queue``, ``max_active``."""
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def default_text(self) -> str:
        """The default as the manual shows it."""
        literal = toml_value(self.default) if self.default is not None else ""
        if self.shown and literal:
            return f"`{literal}` ({self.shown})"
        return self.shown or f"`{literal}`"


def toml_value(value: Any) -> str:
    """A value written as TOML (whole floats without their .0, as an admin would write them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


PACING = "Pacing of each run: what a limit stops waits where it is, for the next run"
HOLD_AGE = "Hold age: how long mail may wait for the policy"

SETTINGS: Tuple[Setting, ...] = (
    # -- the top level: the run and the policy ---------------------------------------------------------
    Setting("mta", "", choice(MTAS), "auto", set_in_example=True,
            note='which MTA: "postfix", "exim", or "auto" (Postfix if postconf is found, else Exim if exim4/exim is); '
                 "set it on a host that has both",
            reason='Which MTA qrunner works on: `"postfix"`, `"exim"`, or `"auto"` (Postfix if `postconf` is '
                   'found, else Exim if `exim4`/`exim` is). `"memory"` is qrunner\'s model of a queue (see '
                   "`[memory]`), for trying a policy and for qrunner's own tests. Set it on a host that has both "
                   "MTAs."),
    Setting("script", "", text("a file path"), "/etc/qrunner/relayout.lua",
            note="the policy (VPOP3's relayout.lua API, function CheckFile)",
            reason="The policy script, VPOP3's `relayout.lua` API (function `CheckFile`; see "
                   "**qrunner-policy**(7)). A script that is missing or does not load stops every command "
                   "that needs it with exit 78, before anything is changed. `--script` overrides it."),
    Setting("strict_modes", "", BOOLEAN, True,
            note="as root, refuse a policy script someone other than root could change",
            reason="As root, refuse (exit 78) a policy script that someone other than root could change: not "
                   "owned by root, writable by group or others, or under a directory that is (sticky `/tmp` "
                   "included), as sshd's `StrictModes`. `false` relaxes it for the script, for a site that keeps "
                   "its script in a shared directory knowingly. The configuration file is checked the same way "
                   "and no setting relaxes that (see SECURITY in **qrunner**(8))."),
    Setting("state_dir", "", text("a directory"), "/var/lib/qrunner",
            note="qrunner's records of its holds, copies and runs, and the lock",
            reason="qrunner's SQLite records (holds and why, copies handed to a sender's route, runs and the "
                   "order they dispatched in, each message's history) and the run lock `qrunner.lock`. Records "
                   "are keyed by the queue directory (Exim: spool directory and queue name), so two `postmulti` "
                   "instances never mix. The directory is root's alone (0700; the database and the lock 0600). "
                   "With Exim, the routes file is written beside it, in `STATE_DIR-exim/exim-routes`, a directory "
                   "of its own that Exim's delivery user may pass (0711)."),
    Setting("script_user", "", Kind("a string (a user name)", lambda v: isinstance(v, str), _user_name), "_qrunner",
            note='whom the Lua worker runs the policy script as, when qrunner runs as root; "root": as root',
            reason="Whom the Lua worker runs the policy script as when qrunner runs as root: a system user of "
                   "its own (`make install` and the package create it), so that the script cannot read the "
                   "queue, qrunner's records or anything else root can (see PRIVILEGES in **qrunner-policy**(7)). "
                   "A user that does not exist stops qrunner run as root (exit 78, naming the fix); `\"root\"` "
                   "runs the script as root, knowingly. Run as another user, qrunner runs the script as that "
                   "user and ignores this."),
    Setting("history_days", "", seconds("a number of days"), 30.0,
            note="runs and message history older than this many days are pruned",
            reason="Runs (and the order they scheduled mail in) and the messages' history (`qrunner explain`) "
                   "older than this are pruned by every run that acts, so the database does not grow forever; "
                   "holds and copies are kept as long as their messages are queued, and so is the history of a "
                   "message qrunner holds, with the runs it names."),
    Setting("metrics_file", "", text('a file path, "" for no metrics'), "", shown="none",
            note='a Prometheus textfile for node_exporter, e.g. "/var/lib/prometheus/node-exporter/qrunner.prom"; '
                 '"": none',
            reason="The Prometheus textfile written, atomically and mode 0644, after every `run`, `flush` and "
                   "`release` that acts (never a dry run), for node_exporter's textfile collector (see METRICS "
                   "in **qrunner**(8)). A write that fails is an error in the log, not the run's."),
    Setting("on_script_error", "", choice(ON_SCRIPT_ERROR), "skip",
            note='a policy error holds the message; "send" sends it at priority 50',
            reason='What a policy error (a runtime error, a timeout, a bad return value) does to that message: '
                   '`"skip"` holds it (fail closed, like Postfix\'s policy-service default of a temporary '
                   'failure; a later sender may still take it); `"send"` sends it at priority 50. '
                   "`--on-script-error` overrides it."),
    Setting("script_timeout", "", seconds("a number of seconds"), 2.0,
            note="seconds per CheckFile call (and for the top level, and Start())",
            reason="Seconds each `CheckFile` call may take, and the script's top level and `Start()`: a Lua "
                   "hook stops a busy script, and a wall-clock watchdog kills the Lua worker stuck inside one C "
                   "function (see **qrunner-policy**(7)). An overrun is a policy error for that message."),
    Setting("script_memory_mb", "", Kind("a whole number of megabytes", is_whole, _positive, int), 64,
            note="memory per Lua state",
            reason="Megabytes of memory each Lua state may use (lupa's `max_memory`): a script that builds a "
                   "huge table gets a policy error, not the mail server's memory."),
    Setting("lua", "", choice(LUA_VERSIONS), "5.4",
            note='"5.1", "5.2", "5.3", "5.4", "5.5" or "luajit"',
            reason='The Lua the script runs with: `"5.1"`, `"5.2"`, `"5.3"`, `"5.4"`, `"5.5"` or `"luajit"` '
                   "(lupa's modules; the limits per version are in **qrunner-policy**(7)). VPOP3 scripts are "
                   "plain Lua and run on any of them. `--lua` overrides it."),
    # -- hold age ------------------------------------------------------------------------------------------
    Setting("max_hold_age", "", seconds("a number of seconds since arrival (0: off)", _not_negative), 0.0,
            shown="off", group=HOLD_AGE,
            note="seconds since arrival; past it the policy is no longer asked and the message goes by the MTA's "
                 "own routing (0: off); e.g. 259200 (3 days), below Postfix's maximal_queue_lifetime (5d) and "
                 "Exim's retry rule (4d)",
            reason="Seconds since arrival; past it the policy is no longer asked and the message is sent by the "
                   "MTA's own routing at priority 50 (or returned to its sender: `on_hold_expiry`), before the "
                   "MTA's queue lifetime would bounce it at its first attempt after release: a policy's skip "
                   "means \"not now\", not \"never\". Off by default because it overrides the policy; set it "
                   "below `maximal_queue_lifetime` (Postfix, 5 days) or Exim's retry rule (Debian's ends at 4 "
                   "days), e.g. `259200` (3 days). An admin's hold, a message being delivered and a copy on a "
                   "sender's route never expire. See HOLD AGE in **qrunner**(8)."),
    Setting("on_hold_expiry", "", choice(ON_HOLD_EXPIRY), "send", group=HOLD_AGE,
            note='past max_hold_age: "send" it, or "bounce" (return it to its sender: exim -Mg; '
                 "Postfix 3.5+ postsuper -f)",
            reason='What `max_hold_age` does: `"send"` the message by the MTA\'s own routing, or `"bounce"`: '
                   "the MTA returns it to its sender now, with its own bounce (Exim `-Mg`; Postfix 3.5 and later "
                   "`postsuper -f`). With a Postfix before 3.5 `\"bounce\"` is a configuration error (exit 78). "
                   "A bounce (null sender) is never returned: it is sent."),
    # -- pacing --------------------------------------------------------------------------------------------
    Setting("max_per_run", "", whole("a whole number of messages (0: no limit)"), 0, shown="no limit",
            group=PACING,
            note="messages a run hands over at most, highest priority first; 0: no limit",
            reason="Messages a `run` hands over at most, counted in dispatch order, so what waits is always the "
                   "lowest priority; the rest waits, where it is, for the next run (`action=wait`): for a relay "
                   "that takes only so much an hour. Known before anything is sent, so `plan` shows it. Each "
                   "`[[sender]]` may have its own `max_per_run`, counted first."),
    Setting("max_active", "", whole("a whole number of messages (0: no limit)"), 0, shown="no limit",
            group=PACING,
            note="hand over only while the MTA delivers fewer than this; 0: no limit",
            reason="A `run` hands over only while the MTA delivers fewer messages than this (Postfix: the files "
                   "in its `incoming` and `active` queues, counted as `qshape` does; Exim: the messages an Exim "
                   "process holds the lock of); the rest waits for the next run, so a slow relay does not pile "
                   "up active mail."),
    Setting("max_run_seconds", "", seconds("a number of seconds (0: no limit)", _not_negative), 0.0,
            shown="no limit", group=PACING,
            note="stop handing over once the run has taken this long; 0: no limit",
            reason="A `run` that has spent this long (counted from its start, deciding included) stops handing "
                   "over; the rest waits for the next run, so a slow policy or relay cannot hold the lock for "
                   "hours. Looked at before each step of the hand-over; the first step always goes, so that a "
                   "policy slower than the limit still lets mail out."),
    Setting("strict_priority", "", BOOLEAN, False, group=PACING,
            note="true: one priority level at a time, each waited for until it has left",
            reason="`true`: hand over one priority level at a time and wait until it has left the MTA's "
                   "delivery (delivered, deferred or bounced) before the next, so that \"100 goes first\" holds "
                   "at the relay, not only at qrunner. Overrides `[exim] overlap_priorities`."),
    Setting("strict_priority_wait", "", seconds("a number of seconds"), 180.0, group=PACING,
            note="seconds a level is waited for at most; then the rest waits for the next run",
            reason="Seconds `strict_priority` waits for a level at most; a level still in delivery then (a huge "
                   "message on a slow link) stops the hand-over, the lower levels wait for the next run, and a "
                   "warning names the messages still in delivery."),
    # -- [postfix] -----------------------------------------------------------------------------------------
    Setting("config_directory", "postfix", nonempty("a directory"), None, shown="Postfix's own",
            example="/etc/postfix-out", note="default: Postfix's own; a postmulti instance: its directory",
            reason="Passed as `-c` to every Postfix command, so that qrunner works on a `postmulti` instance. "
                   "The queue directory and its hashing come from `postconf -h`, never guessed."),
    Setting("command_directory", "postfix", nonempty("a directory"), None, shown="what `postconf` says",
            example="/usr/sbin", note="default: what postconf says; where postconf is, if not on PATH",
            reason="Where `postconf`, `postsuper` and `postqueue` are, when they are not on PATH."),
    # -- [exim] --------------------------------------------------------------------------------------------
    Setting("binary", "exim", nonempty("a file path"), None, shown="`exim4` or `exim` on PATH or in /usr/sbin",
            example="/usr/sbin/exim4", note="default: exim4 or exim on PATH or in /usr/sbin",
            reason="The Exim binary qrunner runs for every Exim command."),
    Setting("config", "exim", nonempty("a file path"), None, shown="Exim's own", example="/etc/exim/exim.conf",
            note="default: Exim's own; when set, passed as -C to every Exim command",
            reason="Passed as `-C` to every Exim command, for an Exim that runs with a configuration of its own."),
    Setting("spool_directory", "exim", nonempty("a directory"), None, shown="what `exim -bP spool_directory` says",
            example="/var/spool/exim4", note="default: what `exim -bP spool_directory` says",
            reason="Where the `-H` files are read (no process per message)."),
    Setting("queue", "exim", text('a queue name, "" for the default queue'), "qrunner",
            note='the named queue contrib/exim\'s gate fills ("": the default queue)',
            reason='The named queue the gate fills and qrunner works on. Exim\'s own queue runners never process '
                   'a named queue, so qrunner alone decides what leaves it. `""` is the default queue, which '
                   "Exim's runners also process: no gate. A plain name (ASCII letters and digits, then also "
                   "`_ . -`)."),
    Setting("dispatch_concurrency", "exim", whole_from_1("a whole number from 1 up"), 2,
            note="exim -Mc processes at once, each up to 10 messages of one priority",
            reason="`exim -Mc` processes at once, each delivering up to 10 messages of one priority level in "
                   "turn; a lower level's batches start only when every batch of the level above has ended."),
    Setting("overlap_priorities", "exim", BOOLEAN, False,
            note="true: a lower priority level may start before the level above has left",
            reason="`true` lets a lower priority level's batches start while the level above is still "
                   "delivering: more throughput when levels are small, no order between levels at the relay. "
                   "`strict_priority` overrides it."),
    Setting("backoff_min", "exim", whole_from_1("a whole number of seconds from 1 up"), 300,
            note="seconds a message a dispatch left queued waits before the next...",
            reason="Seconds a message that a dispatch left queued waits before the next, doubling per attempt up "
                   "to `backoff_max`, besides Exim's own retry time for its hosts (which `-Mc` respects; the "
                   "later wins): `-Mc` ignores an address's retry data (a 4xx to RCPT), which only queue runners "
                   "respect. The defaults follow Exim's default retry rule, which starts at 15 minutes and "
                   "settles at hours."),
    Setting("backoff_max", "exim", whole_from_1("a whole number of seconds from 1 up"), 14400,
            note="...doubling per attempt up to this",
            reason="The longest qrunner's own backoff gets (see `backoff_min`); not smaller than `backoff_min`."),
    Setting("max_queue_time", "exim", whole_from_1("a whole number of seconds from 1 up"), 345600,
            shown="4 days", note="4 days: older gated mail goes back to Exim's default queue",
            reason="Gated mail older than this that is waiting, or frozen by Exim or an admin, is handed back to "
                   "Exim's default queue (`action=handback`), for Exim's retry rules to time out and bounce "
                   "(Exim's default rule gives up after 4 days); qrunner's own holds are kept, and warned about."),
    # -- [memory] ------------------------------------------------------------------------------------------
    Setting("directory", "memory", nonempty("a directory"), None, shown='none: needed with `mta = "memory"`',
            example="/var/tmp/qrunner-memory", note="no default: where that queue is kept (queue.json and its log)",
            reason="Where the memory back end keeps its queue: `queue.json`, its log of operations and one file "
                   "per message, each operation one line written under a lock. It delivers nothing anywhere."),
    # -- [[sender]] ----------------------------------------------------------------------------------------
    Setting("id", "sender", whole("a whole number from 0 up"), None, shown="none: every sender needs one",
            reason="VPOP3's `senderid`: senders run in ascending id order, and the script sees it as the "
                   "global `senderid`. Without any `[[sender]]` there is one sender, `0:default`."),
    Setting("name", "sender", nonempty("the sender's name"), None, shown="none: every sender needs one",
            reason="VPOP3's `sendername`, as the script, the log (`sender=`) and `qrunner status` show it."),
    Setting("default", "sender", BOOLEAN, False, shown="`true` for a single sender without a route",
            reason="`true` (at most one sender): its mail goes by the MTA's own routing. Every other sender "
                   "needs a route for the MTA in use (`[sender.postfix]`, `[sender.exim]`), or `run` and "
                   "`flush` stop with exit 78 naming it."),
    Setting("max_per_run", "sender", whole("a whole number of messages (0: no limit)"), 0, shown="no limit",
            reason="Messages of this sender a `run` hands over at most, counted before the run's own "
                   "`max_per_run`: for the relay of a sender that takes only so much."),
    Setting("listener", "sender.postfix", nonempty("host:port"), None, shown="none: a Postfix route needs it",
            reason="The loopback `smtpd` of `contrib/postfix/master.cf.qrunner` that this sender's mail is "
                   "re-injected into, as `host:port` (`127.0.0.1:10026`)."),
    Setting("transport", "sender.postfix", nonempty("a master.cf service name"), None,
            shown="none: a Postfix route needs it",
            reason="The transport of the listener's `-o content_filter=TRANSPORT:NEXTHOP`: an `smtp` clone, "
                   "never in `defer_transports` (exit 78 if it is: its copies would never leave). Every run "
                   "compares it and `nexthop` with master.cf (`postconf -xP`) and refuses (78) when they "
                   "differ; they are also how qrunner recognises the sender's copies in the queue."),
    Setting("nexthop", "sender.postfix", nonempty("one next hop"), None, shown="none: a Postfix route needs it",
            reason="The next hop of that `content_filter`, like `[smtp.isp.example]:587`."),
    Setting("transport", "sender.exim", nonempty("an Exim transport name"), None,
            shown="none: an Exim route needs it",
            reason="The Exim transport contrib/exim's router gives this sender's messages (through "
                   "`state_dir/exim-routes`); a transport of yours that names its hosts itself."),
)

# Section -> (the heading of qrunner.toml(5) and contrib/qrunner.toml, what the table is for).
SECTIONS: Dict[str, Tuple[str, str]] = {
    "": ("Top level", "Settings of the run and the policy."),
    "postfix": ("[postfix]", "Read when qrunner works on Postfix: which Postfix instance. Both default to "
                             "Postfix's own."),
    "exim": ("[exim]", "Read when qrunner works on Exim (contrib/exim/README.md): which Exim, which named "
                       "queue, and how qrunner paces and orders its sends."),
    "memory": ("[memory]", "The memory back end (`mta = \"memory\"`): qrunner's model of a queue, for trying a "
                           "policy; no mail leaves."),
    "sender": ("[[sender]]", "VPOP3's mail senders: the script runs once per sender, in ascending id order; the "
                             "first sender that does not skip a message sends it."),
    "sender.postfix": ("[sender.postfix]", "How Postfix reaches a sender that is not the default: re-injection "
                                           "into a loopback listener that fixes the route."),
    "sender.exim": ("[sender.exim]", "How Exim reaches a sender that is not the default."),
}


def in_section(section: str) -> Tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.section == section)


def keys(section: str) -> Dict[str, Kind]:
    """A table's known keys and their types, in the order the manual lists them."""
    return {s.name: s.kind for s in in_section(section)}


def settings_dataclass(section: str):
    """A class decorator: a frozen dataclass whose fields are the section's settings, with their defaults.

    The class body keeps what is not a setting (derived values, methods,
    sub-tables); every setting comes from :data:`SETTINGS`, so the loader's
    defaults are the documented ones.
    """

    def build(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for setting in in_section(section):
            annotations[setting.name] = "Optional[str]" if setting.default is None else setting.kind.python.__name__
            setattr(cls, setting.name, setting.default)
        cls.__annotations__ = annotations
        return dataclass(frozen=True)(cls)

    return build


