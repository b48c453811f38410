"""A private Exim configured the Debian way: Debian's split conf.d with contrib's files in place.

The admin's path on Debian (contrib/exim/README.md): install contrib's
``conf.d`` files into ``/etc/exim4/conf.d/`` and run ``update-exim4.conf``.
This does the same in a private directory. Debian's ``exim4-config``
package, unpacked by ``tests/setup/install-exim.sh`` into
``PREFIX/etc/exim4/conf.d`` (never installed, no ``/etc/exim4``), gives
the pieces; ``PREFIX/usr/sbin/update-exim4.conf`` puts them together.

How update-exim4.conf finds its input (its script and update-exim4.conf(8)):
``--confdir DIR`` makes it read ``DIR/update-exim4.conf.conf`` (the dc_*
answers debconf would have written) and, with
``dc_use_split_config='true'``, ``DIR/conf.d/{main,acl,router,transport,
retry,rewrite,auth}/`` in that order, each directory's files in file-name
order (names of letters, digits, ``_`` and ``-`` only; ``NAME.rul`` is used
instead of ``NAME`` when it exists). It inserts the macros it makes from the
dc_* answers after ``UPEX4CmacrosUPEX4C``, each in ``.ifndef``, so that an
earlier definition wins. ``--output FILE`` writes FILE and skips its own
``exim -bV`` check (which would run /usr/sbin/exim4; :meth:`start` checks
with the private binary). It reads ``/etc/mailname`` (a missing one is only
complained about on stderr) and writes nothing outside the output file and
a temporary file.

What a private instance changes, the Debian way:

- ``main/00_qrunner_test_instance`` (sorts first): the macros Debian's files
  test with ``.ifndef``: ``SPOOLDIR`` (``spool_directory``),
  ``MAIN_HARDCODE_PRIMARY_HOSTNAME``, ``MAIN_QUALIFY_DOMAIN``,
  ``MAIN_HOST_LOOKUP`` empty (no DNS), ``MAIN_FREEZE_TELL`` empty (no
  notice to a postmaster mailbox of the host), ``MAIN_LOG_SELECTOR``; and
  ``log_file_path``, which Debian leaves to the binary's built-in
  ``/var/log/exim4/%slog``.
- ``main/01_exim4-config_listmacrosdefs.rul``: Debian's file with
  ``exim_path`` naming the private binary. Debian sets ``exim_path``
  without a macro, and Exim refuses an option set twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

try:
    from exim_instance import PREFIX, EximError, EximInstance
except ImportError:  # pragma: no cover - loaded as tests.exim_debian
    from tests.exim_instance import PREFIX, EximError, EximInstance

DEBIAN_CONF_D = os.path.join(PREFIX, "etc", "exim4", "conf.d")
UPDATE_EXIM4_CONF = os.path.join(PREFIX, "usr", "sbin", "update-exim4.conf")
CONTRIB_CONF_D = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "exim", "conf.d")
# Every conf.d file contrib/exim/README.md tells an admin to install.
CONTRIB_FILES = ("main/05_qrunner_gate", "acl/35_qrunner_gate", "router/05_qrunner_route")
LISTMACROSDEFS = "main/01_exim4-config_listmacrosdefs"


def debian_missing_reason():
    """Why the Debian configuration cannot be built here, or None."""
    for path in (DEBIAN_CONF_D, UPDATE_EXIM4_CONF):
        if not os.path.exists(path):
            return f"{path} is missing; run tests/setup/install-exim.sh as root (it unpacks exim4-config)"
    return None


class DebianEximInstance(EximInstance):
    """A private Exim whose configuration update-exim4.conf builds from Debian's conf.d and ``contrib_files``.

    Debian's smarthost setup (the admin's case in issue 10), the smarthost
    being the test's SMTP sink.
    """

    def __init__(self, base_dir: str, relay_port: int, contrib_files: Sequence[str] = CONTRIB_FILES):
        super().__init__(base_dir, relay_port)
        self.contrib_files = tuple(contrib_files)
        self.confdir = os.path.join(self.base_dir, "debian")

    def config_text(self) -> str:
        """The configuration update-exim4.conf generates from the private confdir."""
        self._build_confdir()
        output = os.path.join(self.confdir, "exim4.conf.generated")
        result = subprocess.run(["sh", UPDATE_EXIM4_CONF, "--confdir", self.confdir, "--output", output],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise EximError(f"update-exim4.conf failed (exit {result.returncode}): {result.stderr}")
        with open(output) as f:
            return f.read()

    def _build_confdir(self) -> None:
        shutil.rmtree(self.confdir, ignore_errors=True)
        conf_d = os.path.join(self.confdir, "conf.d")
        shutil.copytree(DEBIAN_CONF_D, conf_d)
        for name in self.contrib_files:
            shutil.copy(os.path.join(CONTRIB_CONF_D, name), os.path.join(conf_d, name))
        with open(os.path.join(conf_d, LISTMACROSDEFS)) as f:
            listmacros = f.read()
        assert "\nexim_path = /usr/sbin/exim4\n" in listmacros, "Debian's exim_path line changed"
        with open(os.path.join(conf_d, LISTMACROSDEFS + ".rul"), "w") as f:
            f.write(listmacros.replace("\nexim_path = /usr/sbin/exim4\n", f"\nexim_path = {self.binary}\n"))
        with open(os.path.join(conf_d, "main", "00_qrunner_test_instance"), "w") as f:
            f.write(self._private_main())
        with open(os.path.join(self.confdir, "update-exim4.conf.conf"), "w") as f:
            f.write(self._debconf_answers())

    def _private_main(self) -> str:
        return (f"SPOOLDIR = {self.spool_directory}\n"
                f"MAIN_HARDCODE_PRIMARY_HOSTNAME = {self.hostname}\n"
                f"MAIN_QUALIFY_DOMAIN = {self.hostname}\n"
                "MAIN_HOST_LOOKUP =\n"
                "MAIN_FREEZE_TELL =\n"
                "MAIN_LOG_SELECTOR = +received_recipients\n"
                f"log_file_path = {os.path.join(self.log_directory, '%slog')}\n")

    def _debconf_answers(self) -> str:
        """What debconf writes for 'mail sent by smarthost; no local mail', the smarthost being the sink."""
        return (f"dc_eximconfig_configtype='smarthost'\n"
                f"dc_other_hostnames='{self.hostname}'\n"
                "dc_local_interfaces='127.0.0.1'\n"
                "dc_readhost=''\n"
                "dc_relay_domains=''\n"
                "dc_minimaldns='false'\n"
                "dc_relay_nets=''\n"
                f"dc_smarthost='127.0.0.1::{self.relay_port}'\n"
                "CFILEMODE='644'\n"
                "dc_use_split_config='true'\n"
                "dc_hide_mailname=''\n"
                "dc_mailname_in_oh='true'\n"
                "dc_localdelivery='mail_spool'\n")
