"""Scratch directories that qrunner's strict modes accept: under a root-owned 0755 directory, never under /tmp.

As root, qrunner refuses a configuration or policy script that someone
other than root could change, and every directory above it is judged
too (qrunner/trust.py): /tmp (1777) fails that, as it fails sshd's
StrictModes. So the tests and the bench keep the files they hand qrunner
under SAFE_ROOT instead of relaxing the check. conftest.py points pytest's
``tmp_path`` there (``PYTEST_DEBUG_TEMPROOT``); ``mkdtemp`` is for the
scratch directories made outside pytest (the bench). Not as root, nothing
is checked and the system's temporary directory is used.
"""

from __future__ import annotations

import os
import stat
import tempfile

SAFE_ROOT = "/var/lib/qrunner-tests"


def root() -> str:
    """SAFE_ROOT (made root's and 0755 if missing, refused if someone else could write it); as non-root, /tmp."""
    if os.geteuid() != 0:
        return tempfile.gettempdir()
    os.makedirs(SAFE_ROOT, mode=0o755, exist_ok=True)
    st = os.lstat(SAFE_ROOT)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{SAFE_ROOT} must be a directory of root's that only root may write (0755); "
                           "remove it and run the tests again.")
    return SAFE_ROOT


def mkdtemp(prefix: str) -> str:
    """A fresh 0700 directory under :func:`root`."""
    return tempfile.mkdtemp(prefix=prefix, dir=root())


_SHIPPED: dict = {}


def shipped(relative: str) -> str:
    """A file or directory of this repository, as qrunner may be handed it: as root, a copy under :func:`root`
    (made once per test process), since the checkout itself may sit where others could change it (a copy under
    /tmp, as a fresh machine's admin or CI makes one) and strict modes rightly refuse that; as another user,
    the file in the repository itself."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relative)
    if os.geteuid() != 0:
        return here
    if relative not in _SHIPPED:
        import atexit
        import shutil
        place = os.path.join(mkdtemp("shipped-"), relative)
        os.makedirs(os.path.dirname(place), mode=0o755, exist_ok=True)
        (shutil.copytree if os.path.isdir(here) else shutil.copy)(here, place)
        atexit.register(shutil.rmtree, os.path.dirname(place) if not os.path.isdir(here) else place,
                        ignore_errors=True)
        _SHIPPED[relative] = place
    return _SHIPPED[relative]
