"""Header sources that read the MTA's own file for a message, with the MTA's own command as a fallback.

The back ends read headers with a :class:`MtaFileHeaders` subclass each
(:class:`qrunner.mta.postfix_queuefile.PostfixQueueFileHeaders`,
:class:`qrunner.mta.exim_spool.EximSpoolHeaders`), made for a message only
when it is first needed by the :class:`qrunner.message.HeaderReader` its
listing shares (``PostfixQueueFileReader``, ``EximSpoolReader``): the policy's parent
process reads the queue file when a script first touches the headers and,
when that file is gone, runs ``postcat -hq`` or ``exim -Mvh`` (the Lua
worker runs as an unprivileged user and reads no queue file itself). That command is why
this lives under ``qrunner/mta/``: :mod:`qrunner.message` runs no MTA
command.
"""

from __future__ import annotations

import subprocess
from typing import List, Optional, Sequence, Tuple

from qrunner.message import HeaderSource

__all__ = ["DEFAULT_MAX_HEADER_BYTES", "MtaFileHeaders"]

# How much header text a policy gets per message at most (256 KiB).
DEFAULT_MAX_HEADER_BYTES = 262144


class MtaFileHeaders(HeaderSource):
    """Headers read from the MTA's own file for a message, the MTA's command as a fallback.

    Holds only the file's path, the message id, the fallback command and a
    cap, so it is cheap to create for every listed message. ``read()`` reads the file; if that fails (the message
    moved since the listing, or the file is not readable by this user) and
    ``fallback_argv`` is given, it runs the MTA's own command that prints
    the same headers (``postcat -hq``, ``exim -Mvh``). When nothing could be
    read it returns ``[]`` and says why in ``.problem``; it never raises.

    A back end subclasses it with: ``kind`` (the file, in words),
    ``id_kind``, :meth:`read_file`, :meth:`is_valid_id`,
    :meth:`fallback_args` and :meth:`parse_fallback`.
    """

    __slots__ = ("path", "queue_id", "fallback_argv", "max_bytes", "problem")
    kind = "queue file"
    id_kind = "a message id"

    def __init__(self, path: str, queue_id: str, fallback_argv: Optional[Sequence[str]] = None,
                 max_bytes: int = DEFAULT_MAX_HEADER_BYTES):
        self.path = path
        self.queue_id = queue_id
        # One shared tuple for a whole listing: pickling it to the worker then costs one copy, not one per message.
        self.fallback_argv = (fallback_argv if isinstance(fallback_argv, tuple) else tuple(fallback_argv)) \
            if fallback_argv else None
        self.max_bytes = max_bytes
        self.problem: Optional[str] = None

    # what a back end provides

    def read_file(self) -> Tuple[List[bytes], Optional[str]]:  # pragma: no cover - interface
        """(fields, a note on what could not be read); OSError when unreadable, ValueError when not such a file."""
        raise NotImplementedError

    def is_valid_id(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def fallback_args(self) -> List[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def parse_fallback(self, output: bytes) -> Tuple[List[bytes], Optional[str]]:  # pragma: no cover
        raise NotImplementedError

    # the shared part

    def __getstate__(self):
        return (self.path, self.queue_id, self.fallback_argv, self.max_bytes, self.problem)

    def __setstate__(self, state) -> None:
        self.path, self.queue_id, self.fallback_argv, self.max_bytes, self.problem = state

    def prefetch(self) -> Optional[List[bytes]]:
        """The fields from the file alone; None when the file cannot be read (the fallback is :meth:`read`'s)."""
        self.problem = None
        if not self.path:
            return None
        try:
            fields, note = self.read_file()
        except Exception:
            return None
        if note:
            self.problem = "%s (%s): %s" % (self.queue_id, self.path, note)
        return fields

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self)
                and (other.path, other.queue_id, other.fallback_argv) == (self.path, self.queue_id, self.fallback_argv))

    def __hash__(self) -> int:
        return hash((self.path, self.queue_id))

    def __repr__(self) -> str:
        return "%s(%r, %r)" % (type(self).__name__, self.path, self.queue_id)

    def read(self) -> List[bytes]:
        self.problem = None
        try:
            return self._read()
        except Exception as exc:  # the contract: never raise into the policy
            self.problem = "headers of %s could not be read: %s" % (self.queue_id, exc)
            return []

    def _not_read(self, why: str) -> List[bytes]:
        self.problem = "headers of %s not read: %s" % (self.queue_id, why)
        return []

    def _read(self) -> List[bytes]:
        file_error = "no %s path known" % self.kind
        if self.path:
            try:
                fields, note = self.read_file()
            except OSError as exc:
                file_error = "cannot read %s: %s" % (self.path, exc.strerror or exc)
            except ValueError as exc:
                return self._not_read("%s: %s" % (self.path, exc))
            else:
                if note:
                    self.problem = "%s (%s): %s" % (self.queue_id, self.path, note)
                return fields
        if not self.fallback_argv:
            return self._not_read(file_error)
        if not self.is_valid_id():
            return self._not_read("%s, and %r is not %s" % (file_error, self.queue_id, self.id_kind))
        argv = list(self.fallback_argv) + self.fallback_args()
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            return self._not_read("%s; running %s failed: %s" % (file_error, argv[0], exc))
        if result.returncode != 0:
            why = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
            return self._not_read("%s; %s exited with %d%s" % (file_error, " ".join(argv), result.returncode,
                                                                 (": " + why[-1]) if why else ""))
        try:
            fields, note = self.parse_fallback(result.stdout)
        except ValueError as exc:
            return self._not_read("%s; %s printed no headers: %s" % (file_error, " ".join(argv), exc))
        if note:
            self.problem = "%s (%s): %s" % (self.queue_id, argv[0], note)
        return fields
