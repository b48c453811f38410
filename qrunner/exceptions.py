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

# What each exit code means, for the manual (qrunner(8), EXIT STATUS) and ``--help``: one list for both.
EXIT_STATUS = (
    (EX_OK, "every message decided (and acted on) without a policy error"),
    (EX_POLICY_ERRORS, "decided, but at least one message had a policy error (that message was handled by "
                       "on_script_error), or (run, flush, release) could not be acted on: a send the MTA refused, "
                       "a hand-over whose original or copy the MTA would not change (the next run finishes it), "
                       "a named message qrunner may not touch or does not hold; status shows such a run as "
                       "'exit 1:' with the reasons. status, release, flush: the selectors matched no message "
                       "(nothing was done). explain: the id is not in the queue (its history, if any, is shown)"),
    (EX_USAGE, "bad usage: an unknown option, a malformed --now or --sender, a queue id that is not one"),
    (EX_DATAERR, "malformed input: a snapshot line that is not postqueue -j JSON (each such line is named, file "
                 "and line number, and passed over: the other lines are still planned or checked), a cases file "
                 "that is not one"),
    (EX_NOINPUT, "the --queue-file snapshot does not exist (a missing script or configuration file is 78)"),
    (EX_UNAVAILABLE, "the MTA is not installed, or Postfix is not running, or one of the MTA's commands failed "
                     "(postqueue, postsuper, exim: an error it printed, its binary missing or not executable): the "
                     "run stopped before its next change, the message says which command and how many messages "
                     "it changed first, and the next run settles the rest"),
    (EX_CANTCREAT, "snapshot -o FILE: the file cannot be created or written"),
    (EX_IOERR, "the state database or Exim's routes file cannot be written (the disk under it full or "
               "read-only; the message names the file): the run stopped before its next change to the queue (each "
               "change is recorded before it is made), and the next run settles what it left; free space or make "
               "the directory writable. A metrics file that cannot be written is an error in the log, not the "
               "command's"),
    (EX_TEMPFAIL, "another qrunner run holds the lock; try again later. Also: the state database is locked by "
                  "another program (an admin's sqlite3 session) for longer than qrunner waits (30 s); nothing was "
                  "changed"),
    (EX_NOPERM, "not run as root (postsuper and exim -Mf/-Mt/-M are for admins), checked before anything is "
                "touched; or the state directory cannot be read (status, plan)"),
    (EX_CONFIG, "configuration error (among them on_hold_expiry = \"bounce\" with a Postfix before 3.5), or a "
                "policy script that does not load: nothing decided, nothing printed on stdout, nothing in the "
                "queue changed; release --for-removal: the MTA is still gated for qrunner, or qrunner cannot "
                "tell and --gate-removed was not given (nothing released)"),
)


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


class FileWriteError(QrunnerError):
    """A file qrunner must write before it goes on, Exim's routes file, cannot be written (the disk full or
    read-only, exit 74), as for the state database (:class:`StateError`)."""

    exit_code = EX_IOERR


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
