"""The configuration file (TOML) and the settings it gives every command.

Settings of the run and the policy live at the top level; settings that
concern one MTA live in that MTA's table; senders are ``[[sender]]`` tables.
Every key is checked: an unknown key or a wrong type is a configuration
error (exit 78) naming the key, because a typo in a mail server's policy
configuration must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from qrunner import trust
from qrunner.exceptions import ConfigError
from qrunner.settings import (LUA_VERSIONS, MTAS, ON_HOLD_EXPIRY, ON_SCRIPT_ERROR, Kind, is_whole, keys,
                              settings_dataclass)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

DEFAULT_CONFIG = "/etc/qrunner/qrunner.toml"

__all__ = ["LUA_VERSIONS", "MTAS", "ON_HOLD_EXPIRY", "ON_SCRIPT_ERROR"]  # re-exported: cli.py and tests import them here


@dataclass(frozen=True)
class PostfixRoute:
    """How Postfix reaches a sender: re-injection into a loopback listener that fixes the route.

    ``listener`` is the ``host:port`` of the ``smtpd`` that contrib/postfix's
    master.cf lines define for this sender with ``-o
    content_filter=TRANSPORT:NEXTHOP``; ``transport`` and ``nexthop`` are
    that route, which qrunner also uses to recognise a copy it re-injected.
    """

    listener: str
    transport: str
    nexthop: str

    @property
    def content_filter(self) -> str:
        return f"{self.transport}:{self.nexthop}"

    @property
    def address(self) -> Tuple[str, int]:
        host, _, port = self.listener.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class EximRoute:
    """How Exim reaches a sender: the transport contrib/exim's router gives its messages."""

    transport: str


@dataclass(frozen=True)
class Sender:
    """One VPOP3 "mail sender": the script runs once per sender, in id order.

    A ``default`` sender's mail goes by the MTA's own routing; any other
    sender's mail goes by its route (``postfix``/``exim``), which the MTA in
    use must have.
    """

    id: int
    name: str
    default: bool = field(default=False, compare=False)
    postfix: Optional[PostfixRoute] = field(default=None, compare=False)
    exim: Optional[EximRoute] = field(default=None, compare=False)
    max_per_run: int = field(default=0, compare=False)  # at most this many of its messages a run (0: no limit)

    def __str__(self) -> str:
        return self.name


DEFAULT_SENDERS = (Sender(0, "default", True),)


@settings_dataclass("postfix")
class PostfixSettings:
    """The ``[postfix]`` table: which Postfix instance qrunner works on (its keys: qrunner/settings.py)."""


@settings_dataclass("exim")
class EximSettings:
    """The ``[exim]`` table: which Exim, which named queue, and how qrunner paces and orders its sends.

    Gated mail sits in a named queue that Exim's queue runners never
    process, so no delivery of it starts but qrunner's ``exim -Mc``. That
    ``-Mc`` respects Exim's retry hints for hosts: after a relay outage it
    does not try the relay again before the host's retry time (15 minutes
    under Debian's rule), and ``plan`` shows such a message waiting for
    Exim's retry time. It ignores the retry data of an address (a 4xx
    reply to RCPT), which only queue runners respect; so qrunner adds its
    own backoff: a message a dispatch left queued waits ``backoff_min``
    seconds, doubling per attempt up to ``backoff_max``, and also for
    Exim's retry time, whichever ends later. ``flush --ignore-policy`` goes
    past both (a forced queue run for the one message, which still skips
    frozen mail). A message older than ``max_queue_time`` is handed back
    to Exim's default queue, where Exim's own retry rules time it out and
    bounce it as usual. The defaults follow Exim's default retry rule
    (F,2h,15m; G,16h,1h,1.5; F,4d,6h): start within minutes, settle at
    hours, give up after 4 days.

    ``dispatch_concurrency``: Exim processes at once, each delivering up
    to 10 messages of one priority level in turn. A lower level's batches
    start only when every batch of the level above has ended, so the relay
    sees the levels in order; ``overlap_priorities = true`` lets them start
    as soon as a process is free (more throughput when levels are small,
    no order between levels).

    Its keys, types and defaults: qrunner/settings.py.
    """


@settings_dataclass("memory")
class MemorySettings:
    """The ``[memory]`` table: where the in-memory back end keeps its queue (``mta = "memory"``).

    A faithful model of an MTA queue (qrunner/mta/memory.py) for trying a
    policy and for running qrunner's own cases on any machine; it delivers
    nothing anywhere.
    """


@dataclass(frozen=True)
class Pacing:
    """How fast, and in what strict order, a ``run`` hands mail to the MTA (qrunner(8), PACING).

    ``max_per_run``: messages a run hands over at most (0: no limit), and
    ``sender_max_per_run`` the same per sender (name -> limit), both counted
    in dispatch order, so that what waits is always the lowest priority.
    ``max_active``: the run hands over only while the MTA delivers fewer
    messages than this (0: no limit). ``max_run_seconds``: the run stops
    handing over once it has spent this long (0: no limit). ``strict_priority``:
    one priority level at a time, each waited for (at most
    ``strict_priority_wait`` seconds) until it has left the MTA's delivery.
    Whatever a limit stops waits, where it is, for the next run.
    """

    max_per_run: int = 0
    sender_max_per_run: Tuple[Tuple[str, int], ...] = ()
    max_active: int = 0
    max_run_seconds: float = 0.0
    strict_priority: bool = False
    strict_priority_wait: float = 180.0

    @property
    def paces_hand_over(self) -> bool:
        """Does any limit act while the run hands over (so that it hands over in steps and looks between)?"""
        return bool(self.max_active or self.max_run_seconds or self.strict_priority)


NO_PACING = Pacing()


@settings_dataclass("")
class Config:
    """Every setting, with the defaults a fresh install runs with.

    The top-level settings (``mta``, ``script``, ...) are fields made from
    qrunner/settings.py; the body holds the tables and what is not a setting.
    """

    senders: Tuple[Sender, ...] = DEFAULT_SENDERS
    postfix: PostfixSettings = field(default_factory=PostfixSettings)
    exim: EximSettings = field(default_factory=EximSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    path: Optional[str] = None

    @property
    def pacing(self) -> Pacing:
        """The pacing settings of a ``run`` (the top-level ones and each sender's ``max_per_run``)."""
        return Pacing(self.max_per_run, tuple((s.name, s.max_per_run) for s in self.senders if s.max_per_run),
                      self.max_active, self.max_run_seconds, self.strict_priority, self.strict_priority_wait)

    def with_overrides(self, **changes: Any) -> "Config":
        """A copy with command-line values (those not None) taking precedence."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# A setting whose name says it is a secret (a future SMTP password of a re-injection route, an API token).
SECRET_NAME = re.compile(r"password|passwd|passphrase|secret|token|credential", re.IGNORECASE)
HIDDEN = "<hidden>"


def is_secret(key: str) -> bool:
    """Does the setting's name (its last part: ``sender.postfix.password``) say that its value is a secret?"""
    return bool(SECRET_NAME.search(key.rpartition(".")[2]))


class Secret:
    """A secret setting's value, which no output of qrunner can show.

    Its ``str``, ``repr`` and format are ``<hidden>``, so a log line, an
    error message or a printed configuration that names it shows nothing;
    it is no ``str`` (so ``json.dumps`` refuses it rather than write it).
    The one way to the value is :meth:`reveal`, for the code that hands it
    to the MTA.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return HIDDEN

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return HIDDEN

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def shown(key: str, value: Any) -> str:
    """A setting's value as an error message may quote it: never a secret's (``<hidden>``)."""
    return HIDDEN if is_secret(key) or isinstance(value, Secret) else repr(value)


def _kept(key: str, value: Any) -> Any:
    """A secret setting's value is kept as a :class:`Secret`, so that nothing prints it by mistake later."""
    return Secret(value) if is_secret(key) and isinstance(value, str) else value


_TOP_LEVEL = keys("")  # key -> its Kind (type description, type test, further check): qrunner/settings.py


def _fail(path: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: setting '{key}' {problem}; fix it or remove the line to use the default.")


_SENDER_KEYS = tuple(keys("sender")) + ("postfix", "exim")
_LISTENER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")
_ROUTE_WORD = re.compile(r"[A-Za-z0-9_.-]+\Z")


def _parse_postfix_route(path: str, where: str, raw: Any) -> PostfixRoute:
    if not isinstance(raw, dict):
        raise _fail(path, f"{where}.postfix", "must be a [sender.postfix] table")
    for key in raw:
        if key not in keys("sender.postfix"):
            raise _fail(path, f"{where}.postfix.{key}", "is not a known setting (listener, transport, nexthop)")
    for key in ("listener", "transport", "nexthop"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(path, f"{where}.postfix.{key}", "is missing: a Postfix route needs listener, transport "
                                                         "and nexthop (see contrib/postfix/master.cf.qrunner)")
    if not _LISTENER.match(raw["listener"]) or not 0 < int(raw["listener"].rpartition(":")[2]) < 65536:
        raise _fail(path, f"{where}.postfix.listener", f"must be host:port, like 127.0.0.1:10026, not {raw['listener']!r}")
    if not _ROUTE_WORD.match(raw["transport"]):
        raise _fail(path, f"{where}.postfix.transport", f"must be a master.cf service name, not {raw['transport']!r}")
    if any(c.isspace() or c in ",;" for c in raw["nexthop"]):
        raise _fail(path, f"{where}.postfix.nexthop", f"must be one next hop like [smtp.isp.example]:587, "
                                                      f"not {raw['nexthop']!r}")
    return PostfixRoute(raw["listener"], raw["transport"], raw["nexthop"])


def _parse_exim_route(path: str, where: str, raw: Any) -> EximRoute:
    if not isinstance(raw, dict) or set(raw) != {"transport"} or not isinstance(raw["transport"], str) \
            or not _ROUTE_WORD.match(raw["transport"]):
        raise _fail(path, f"{where}.exim", "must be a [sender.exim] table with one key, transport = "
                                           "\"<an Exim transport name>\"")
    return EximRoute(raw["transport"])


def _parse_senders(path: str, raw: Any) -> Tuple[Sender, ...]:
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise _fail(path, "sender", "must be written as [[sender]] tables")
    senders: List[Sender] = []
    for number, table in enumerate(raw, 1):
        where = f"sender #{number}"
        for key in table:
            if key not in _SENDER_KEYS:
                raise _fail(path, f"{where}.{key}", "is not a known setting (a sender has " +
                            ", ".join(_SENDER_KEYS) + ")")
        sender_id = table.get("id")
        if not isinstance(sender_id, int) or isinstance(sender_id, bool) or sender_id < 0:
            raise _fail(path, f"{where}.id", "must be a whole number from 0 up")
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(path, f"{where}.name", "must be a non-empty string")
        default = table.get("default", False)
        if not isinstance(default, bool):
            raise _fail(path, f"{where}.default", "must be true or false")
        limit = table.get("max_per_run", 0)
        if not is_whole(limit) or limit < 0:
            raise _fail(path, f"{where}.max_per_run", "must be a whole number of messages, 0 (no limit) or more")
        postfix = _parse_postfix_route(path, where, table["postfix"]) if "postfix" in table else None
        exim = _parse_exim_route(path, where, table["exim"]) if "exim" in table else None
        senders.append(Sender(sender_id, name, default, postfix, exim, limit))
    return check_senders(senders, path)


def check_senders(senders: Sequence[Sender], where: str) -> Tuple[Sender, ...]:
    """Senders in the order they run (ascending id); ids and names unique; at most one default.

    One sender without a route is the default: its mail goes by the MTA's
    own routing, as a site with one VPOP3 sender expects.
    """
    senders = list(senders)
    defaults = [s.name for s in senders if s.default]
    if len(defaults) > 1:
        raise ConfigError(f"{where}: senders {', '.join(defaults)} are all default = true; at most one sender "
                          "may use the MTA's own routing.")
    if not defaults and len(senders) == 1 and senders[0].postfix is None and senders[0].exim is None:
        senders[0] = replace(senders[0], default=True)
    if not senders:
        raise ConfigError(f"{where}: no senders are configured; add a [[sender]] table or leave them all out for one sender 0:default.")
    for attr in ("id", "name"):
        values = [getattr(s, attr) for s in senders]
        duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
        if duplicates:
            raise ConfigError(f"{where}: sender {attr} {duplicates[0]} is used twice; every sender needs its own {attr}.")
    return tuple(sorted(senders, key=lambda s: s.id))


def fallback_sender(senders: Sequence[Sender]) -> Optional[Sender]:
    """Who sends what the admin forces out (``flush --ignore-policy``): the default sender, else the first."""
    return next((s for s in senders if s.default), senders[0] if senders else None)


_POSTFIX_KEYS = keys("postfix")
_EXIM_KEYS = keys("exim")


def _check_value(path: str, key: str, kind: Kind, value: Any) -> Any:
    """One value against its setting's type and check; what the loader keeps (seconds as floats)."""
    if not kind.test(value):
        raise _fail(path, key, f"must be {kind.description}, not {shown(key, value)}")
    problem = kind.check(value) if kind.check else None
    if problem:
        raise _fail(path, key, f"{problem} (it is {shown(key, value)})")
    return _kept(key, kind.convert(value))


def _check_table(path: str, name: str, raw: Any, known: Dict[str, Kind]) -> Dict[str, Any]:
    """An MTA's table: only known keys, each of its type."""
    if not isinstance(raw, dict):
        raise _fail(path, name, f"must be a [{name}] table")
    for key in raw:
        if key not in known:
            raise _fail(path, f"{name}.{key}", "is not a known setting (known: " + ", ".join(known) + ")")
    return {key: _check_value(path, f"{name}.{key}", known[key], value) for key, value in raw.items()}


_MEMORY_KEYS = keys("memory")


def _parse_memory(path: str, raw: Any) -> MemorySettings:
    return MemorySettings(**_check_table(path, "memory", raw, _MEMORY_KEYS))


def _parse_postfix(path: str, raw: Any) -> PostfixSettings:
    return PostfixSettings(**_check_table(path, "postfix", raw, _POSTFIX_KEYS))


def _parse_exim(path: str, raw: Any) -> EximSettings:
    raw = _check_table(path, "exim", raw, _EXIM_KEYS)
    queue = raw.get("queue", "qrunner")
    if queue and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", queue):
        raise _fail(path, "exim.queue", f"must be a plain queue name (ASCII letters and digits, then also "
                                        f"_ . -), not {queue!r}")
    settings = EximSettings(**raw)
    if settings.backoff_max < settings.backoff_min:
        raise _fail(path, "exim.backoff_max", f"must not be smaller than backoff_min ({settings.backoff_min})")
    return settings


def parse_config(data: Dict[str, Any], path: str) -> Config:
    """Check a parsed TOML document and turn it into a :class:`Config`."""
    values: Dict[str, Any] = {}
    for key, value in data.items():
        if key == "sender":
            values["senders"] = _parse_senders(path, value)
            continue
        if key == "postfix":
            values["postfix"] = _parse_postfix(path, value)
            continue
        if key == "exim":
            values["exim"] = _parse_exim(path, value)
            continue
        if key == "memory":
            values["memory"] = _parse_memory(path, value)
            continue
        if key not in _TOP_LEVEL:
            raise _fail(path, key, "is not a known setting")
        values[key] = _check_value(path, key, _TOP_LEVEL[key], value)
    config = Config(path=path, **values)
    if config.mta == "memory" and not config.memory.directory:
        raise ConfigError(f'{path}: mta = "memory" needs [memory] directory, the directory that holds its queue; '
                          "add it.")
    return config


def load_config(path: Optional[str] = None) -> Config:
    """Read the configuration.

    ``path`` is what ``--config`` gave; without it ``QRUNNER_CONFIG`` is
    used, else the default path. A file the admin named must exist; the
    default file may be absent (defaults apply), so that ``plan
    --queue-file`` works on a machine where qrunner is not set up yet.

    As root the file must be root's alone, and so must every directory
    above it (qrunner/trust.py, sshd's StrictModes): it says which script
    runs as root. No setting relaxes this check, since a setting in the
    file would be written by whoever can write the file; ``strict_modes``
    governs the policy script only.
    """
    explicit = path or os.environ.get("QRUNNER_CONFIG") or None
    path = explicit or DEFAULT_CONFIG
    try:
        with open(path, "rb") as handle:
            unsafe = trust.check_opened(path, handle.fileno(), "the configuration file") if trust.enforced() else None
            if unsafe:
                raise ConfigError(unsafe)
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: configuration file not found; check the --config option or QRUNNER_CONFIG.")
        return Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the file.")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}.")
    return parse_config(data, path)
