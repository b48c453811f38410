"""Exim's retry hints: until when Exim's own ``-Mc`` refuses to try a message's hosts.

qrunner sends gated mail with ``exim -Mc``, which respects the retry hints
of the hosts (DESIGN.md section 5; ``retry_check_address()`` in Exim's
``retry.c``): after a relay outage every ``-Mc`` of a message for that
relay ends at once with "retry time not reached for any host", until the
host's next try time (15 minutes under Debian's default retry rule). ``plan``
and the run's ``action=wait`` line say so instead of sending in vain.

What ``-Mc`` respects, measured on 4.96 and read in its source: a host's
record ``T:<name>:<ip>[:<port>]`` and a message's record at one host
``T:<name>:<ip>[:<port>]:<message id>`` (``smtp.c``); not the routing and
address records ``R:...`` (a 4xx reply to RCPT writes one), which only
queue runners respect (``deliver.c``): those leave qrunner's own backoff to
pace the message.

Which hosts a message needs comes from Exim's own hints too, without
routing it again: ``wait-<transport>`` lists, per host name, the messages
whose delivery deferred at that host or skipped it for its retry time
(``transport_update_waiting()``), and a message record names its host in
its key. One ``exim_dumpdb`` per database and run (``-z``: times in UTC,
under ``LC_ALL=C`` for the month names), no process per message. What the
hints cannot see: another address of a multi-address host that has no
record (qrunner does no DNS); Exim itself then delivers the waiting messages
down the first connection that succeeds there (that same ``wait-`` hint).
"""

from __future__ import annotations

import calendar
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Set

log = logging.getLogger("qrunner.exim")

_RECORD = re.compile(r"^  (?P<key>\S+) -?\d+ -?\d+ ?(?P<error>.*)$")
_STAMP = r"(\d\d)-([A-Z][a-z]{2})-(\d{4}) (\d\d):(\d\d):(\d\d)"
_TIMES = re.compile(r"^" + _STAMP + "  " + _STAMP + "  " + _STAMP + r" ?\*?\s*$")
_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
# The message id at the end of a message record's key (4.96 form, 4.97+ form).
_MESSAGE_SUFFIX = re.compile(r":([0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}|"
                             r"[0-9A-Za-z]{6}-[0-9A-Za-z]{11}-[0-9A-Za-z]{4})$")


@dataclass(frozen=True)
class HostRetry:
    """One host retry record: ``key`` as ``exim_dumpdb <spool> retry`` prints it, its error, its next try."""

    key: str
    error: str
    next_try: float

    @property
    def host(self) -> str:
        """``<name>:<ip>[:<port>]``: the key without ``T:`` and without a message id."""
        return _MESSAGE_SUFFIX.sub("", self.key[2:])


class RetryHints:
    """The host retry records and which hosts each message waits for, as Exim's hints say."""

    def __init__(self, records: Iterable[HostRetry] = (), waiting: Mapping[str, Iterable[str]] = ()):
        self._hosts: Dict[str, HostRetry] = {}
        self._for_message: Dict[str, Dict[str, HostRetry]] = {}
        for record in records:
            suffix = _MESSAGE_SUFFIX.search(record.key)
            if suffix:
                self._for_message.setdefault(suffix.group(1), {})[record.host] = record
            else:
                self._hosts[record.host] = record
        self._waits_for: Dict[str, Set[str]] = {}
        for name, message_ids in dict(waiting).items():
            for message_id in message_ids:
                self._waits_for.setdefault(message_id, set()).add(name)

    def holding(self, message_id: str, now: float) -> Optional[HostRetry]:
        """The record that ends first among those keeping every host of the message unusable; None if one is usable.

        A host with no record, or one whose next try has passed, is usable,
        and ``-Mc`` tries it: the message is due. At one host, the host's
        record and the message's own record there must both have passed.
        """
        hosts = self._hosts_of(message_id)
        if not hosts:
            return None
        soonest: Optional[HostRetry] = None
        for host in hosts:
            records = [r for r in (self._hosts.get(host), self._for_message.get(message_id, {}).get(host)) if r]
            latest = max(records, key=lambda r: r.next_try) if records else None
            if latest is None or latest.next_try <= now:
                return None
            if soonest is None or latest.next_try < soonest.next_try:
                soonest = latest
        return soonest

    def _hosts_of(self, message_id: str) -> List[str]:
        """``<name>:<ip>[:<port>]`` of each host the hints tie to the message; a name without a record as itself."""
        hosts = set(self._for_message.get(message_id, {}))
        for name in self._waits_for.get(message_id, ()):
            known = [h for h in self._hosts if h == name or h.startswith(name + ":")]
            hosts.update(known or [name])
        return sorted(hosts)


def parse_retry_dump(text: str) -> List[HostRetry]:
    """The host records (``T:``) of ``exim_dumpdb -z <spool> retry``; routing and address records are left out.

    Each record is two lines: ``  KEY ERRNO MORE_ERRNO TEXT`` and the first
    failure, last try and next try times (UTC with ``-z``), then ``*`` if
    the host is past its final cutoff (still not tried before its next try).
    """
    records = []
    pending = None
    for line in text.splitlines():
        match = _RECORD.match(line)
        if match:
            pending = match
            continue
        times = _TIMES.match(line)
        if times and pending is not None:
            if pending.group("key").startswith("T:"):
                records.append(HostRetry(pending.group("key"), pending.group("error").strip(),
                                         _utc(times.groups()[12:18])))
            pending = None
    return records


def parse_wait_dump(text: str) -> Dict[str, Set[str]]:
    """Host name -> message ids, from ``exim_dumpdb <spool> wait-<transport>`` (``NAME ID ID ...`` a line).

    A full record continues under ``NAME:<n>``; those are merged into NAME.
    """
    lines = [line.split() for line in text.splitlines() if line.strip()]
    names = {fields[0] for fields in lines}
    waiting: Dict[str, Set[str]] = {}
    for fields in lines:
        name = fields[0]
        base, colon, number = name.rpartition(":")
        if colon and number.isdigit() and base in names:
            name = base
        waiting.setdefault(name, set()).update(fields[1:])
    return waiting


def read_hints(dumpdb: Optional[str], spool_directory: str, now: float) -> RetryHints:
    """Exim's hints for this run: the retry database, and the wait databases only when a host record is pending."""
    directory = os.path.join(spool_directory, "db")
    if dumpdb is None or not os.path.exists(os.path.join(directory, "retry")):
        return RetryHints()
    records = [r for r in parse_retry_dump(_dump(dumpdb, spool_directory, "retry")) if r.next_try > now]
    if not records:
        return RetryHints()
    waiting: Dict[str, Set[str]] = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("wait-") and not name.endswith(".lockfile"):
            for host, message_ids in parse_wait_dump(_dump(dumpdb, spool_directory, name)).items():
                waiting.setdefault(host, set()).update(message_ids)
    return RetryHints(records, waiting)


def _dump(dumpdb: str, spool_directory: str, database: str) -> str:
    """``exim_dumpdb -z SPOOL DATABASE``; "" (no hints) when it cannot be read, which only costs a futile send."""
    try:
        result = subprocess.run([dumpdb, "-z", spool_directory, database], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, errors="replace", timeout=60,
                                env=dict(os.environ, LC_ALL="C"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("cannot read Exim's %s hints with %s: %s", database, dumpdb, exc)
        return ""
    if result.returncode != 0:
        log.debug("exim_dumpdb %s exited %d: %s", database, result.returncode, result.stderr.strip())
    return result.stdout


def _utc(fields) -> float:
    day, month, year, hour, minute, second = fields
    return float(calendar.timegm((int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second))))
