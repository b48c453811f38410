"""Errors that end a command, each with the exit code it ends with.

The codes follow sysexits(3), as Postfix's and Exim's own tools do, so a
wrapper script or a systemd unit can tell "fix your config" from "try again
later". Every error carries one sentence for the admin: what went wrong,
where, and how to fix it. ``cli.main`` prints it; nothing else prints a
traceback.
"""

from __future__ import annotations

EX_OK = 0
EX_POLICY_ERRORS = 1  # decided, but at least one message had a policy error
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class QrunnerError(Exception):
    """An error that ends the command with :attr:`exit_code`."""

    exit_code = EX_CONFIG

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(QrunnerError):
    """Bad command line (exit 64)."""

    exit_code = EX_USAGE


class DataError(QrunnerError):
    """Malformed input data, such as a snapshot line (exit 65)."""

    exit_code = EX_DATAERR


class NoInputError(QrunnerError):
    """An input file named on the command line does not exist (exit 66)."""

    exit_code = EX_NOINPUT


class UnavailableError(QrunnerError):
    """The MTA is not installed or not running (exit 69)."""

    exit_code = EX_UNAVAILABLE


class CantCreateError(QrunnerError):
    """An output file named on the command line cannot be created or written (exit 73)."""

    exit_code = EX_CANTCREAT


class StateError(QrunnerError):
    """The state database cannot be written (the disk full or read-only: exit 74) or is locked by another program
    past the busy timeout (exit 75: try again later)."""

    exit_code = EX_IOERR

    def __init__(self, message: str, locked: bool = False):
        super().__init__(message)
        if locked:
            self.exit_code = EX_TEMPFAIL


class LockHeldError(QrunnerError):
    """Another qrunner run holds the lock (exit 75)."""

    exit_code = EX_TEMPFAIL


class NoPermissionError(QrunnerError):
    """Not run with the rights the MTA's commands need (exit 77)."""

    exit_code = EX_NOPERM


class ConfigError(QrunnerError):
    """The configuration file is wrong (exit 78)."""

    exit_code = EX_CONFIG


class ScriptLoadError(QrunnerError):
    """The policy script did not load: nothing was decided (exit 78)."""

    exit_code = EX_CONFIG


class NothingSelected(QrunnerError):
    """The admin's selectors matched no message (exit 1); nothing was done."""

    exit_code = EX_POLICY_ERRORS
