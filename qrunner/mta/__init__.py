"""MTA back ends: everything that knows Postfix or Exim lives below here.

Each back end implements :class:`qrunner.mta.base.Backend`: ``postfix.py``,
``exim.py``, ``memory.py`` (a faithful model of a queue, for any machine);
the offline snapshot reader is one too, so ``plan --queue-file`` follows
the same list and decide stages as a live run.
"""

from __future__ import annotations

from qrunner.config import Config
from qrunner.exceptions import UnavailableError
from qrunner.mta.base import Backend


def backend_for(config: Config) -> Backend:
    """The live back end the configuration names (``mta``), found on this host for ``auto``.

    Only the back end in use is imported: a command that lists the queue
    starts in a fresh process every time, and each back end pulls in its own
    modules (Exim's spool reader, Postfix's re-injection with smtplib).
    """
    mta = config.mta
    if mta == "memory":
        from qrunner.mta.memory import MemoryBackend

        return MemoryBackend(config.memory.directory)
    if mta == "auto":
        from qrunner.mta.exim import find_exim
        from qrunner.mta.postfix import find_postconf

        if find_postconf(config.postfix.command_directory) is not None:
            mta = "postfix"
        elif find_exim(config.exim.binary) is not None:
            mta = "exim"
        else:
            raise UnavailableError("no MTA found: neither Postfix's postconf nor an exim4/exim binary is installed "
                                   "(PATH, /usr/sbin); install one or set 'mta' in the configuration.")
    if mta == "exim":
        from qrunner.mta.exim import EximBackend

        return EximBackend(config.exim, config.state_dir)
    from qrunner.mta.postfix import PostfixBackend

    return PostfixBackend(config.postfix)
