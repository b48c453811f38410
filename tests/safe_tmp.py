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
