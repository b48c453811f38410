"""MTA back ends: everything that knows Postfix or Exim lives below here.

Each back end implements :class:`qrunner.mta.base.Backend`; the offline
snapshot reader is one too, so ``plan --queue-file`` follows the same path
as a live run.
"""

from __future__ import annotations

from qrunner.config import Config
from qrunner.exceptions import UnavailableError


def backend_for(config: Config):
    """The live back end the configuration names (``mta``), found on this host for ``auto``."""
    from qrunner.mta.postfix import PostfixBackend, find_postconf

    mta = config.mta
    if mta == "auto":
        if find_postconf(config.postfix.command_directory) is None:
            raise UnavailableError("no MTA found: Postfix's postconf is not installed (PATH, /usr/sbin); "
                                   "install Postfix or set 'mta' in the configuration.")
        mta = "postfix"
    if mta == "postfix":
        return PostfixBackend(config.postfix)
    raise UnavailableError(f"mta = \"{mta}\": this version of qrunner has no {mta} back end yet; "
                           "use mta = \"postfix\", or plan --queue-file for a snapshot.")
