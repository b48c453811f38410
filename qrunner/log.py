"""Logging that a mail admin reads next to the MTA's own.

Lines look like Postfix's: ``qrunner[PID]: QUEUEID: action=hold ...``. They
go to stderr and, for the commands that change the queue and are not run
from a terminal (cron), to syslog's mail facility as well; under systemd,
stderr is the journal already.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER = "qrunner"
SYSLOG_ADDRESS = "/dev/log"


def setup_logging(verbosity: int = 0, use_syslog: bool = False) -> logging.Logger:
    """Configure qrunner's log: ``-v`` (1) for more, ``-q`` (-1) for errors only."""
    level = {-1: logging.ERROR, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"qrunner[{os.getpid()}]: %(message)s"))
    logger.addHandler(stderr)
    # Under systemd stderr already is the journal (JOURNAL_STREAM): syslog too would log every line twice.
    if use_syslog and not sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ and os.path.exists(SYSLOG_ADDRESS):
        try:
            syslog = logging.handlers.SysLogHandler(SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError:
            pass
        else:
            syslog.setFormatter(logging.Formatter("qrunner[%(process)d]: %(message)s"))
            logger.addHandler(syslog)
    return logger
