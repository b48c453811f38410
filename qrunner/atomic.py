"""Replace a file that another program reads, whole or not at all.

Exim's router reads the routes file and node_exporter the metrics file at
any moment: each must see the old file or the new one, never half of one,
never none, and never a mode looser or tighter than the reader needs. So
the new text goes to a fresh file in the same directory (``mkstemp``:
``O_EXCL`` under an unpredictable name, so a symlink planted in the
directory is never followed and no other file is ever written through it),
is given its mode with ``fchmod`` (whatever the umask: the unit's
``UMask=0077`` included), reaches the disk (``fsync``), and is renamed
over the old file; the directory is then synced too, so the rename
survives a crash. On any error the fresh file is removed and the old one
stays as it was.
"""

from __future__ import annotations

import os
import tempfile


def replace_file(path: str, data: bytes, mode: int) -> None:
    """Make ``path`` hold ``data`` with ``mode``, atomically; an ``OSError`` leaves the old file untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """The rename on disk too (a crash right after it must not bring the old file back)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(fd)
