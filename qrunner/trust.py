"""Strict modes: as root, run no configuration or policy script that someone else could have changed.

qrunner runs as root, and what its configuration and its policy script say
decides what happens to other people's mail: a script that a user could
edit is that user's code running as root. So, as sshd's ``StrictModes``
does for the files it trusts (OpenSSH's ``safe_path`` in misc.c), a file is
refused unless it is a regular file owned by root and writable by neither
group nor others, and every directory on the way to it likewise, up to /.
A sticky world-writable directory (/tmp) is refused too, as sshd refuses
it: the sticky bit keeps others from replacing root's file there, not from
leaving a symlink or a file of their own under the name qrunner is told.

Stricter than sshd in one way: sshd checks the directories of the
resolved path only, so a symlink in a directory others may write passes
(they can point it elsewhere). Here the path is walked as the kernel
resolves it, so every directory a name is looked up in is checked: those
holding each symlink followed, and all of the target's.

The check runs on what was opened: the file is opened first, checked, and
the path walked must lead to that same file (device and inode), so no one
can swap the file between the check and the read.

Not as root, nothing is checked: qrunner then runs with the rights of the
user who started it, who may run any code of their own anyway.
"""

from __future__ import annotations

import os
import pwd
import stat
from typing import List, Optional

# Each path is resolved by hand; more symlinks than this is a loop (Linux allows 40).
MAX_SYMLINKS = 40


class UnsafePath(Exception):
    """Why a file may not be trusted: ``problem`` is a sentence fragment, ``fix`` what mends it (None: move the file)."""

    def __init__(self, problem: str, fix: Optional[str]):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


def enforced() -> bool:
    """Strict modes apply to root only: another user's qrunner runs with that user's own rights."""
    return os.geteuid() == 0


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _judge(path: str, st: os.stat_result, what: str) -> None:
    """``what`` ("the file", "the directory PATH above it") must be root's and writable by root alone."""
    if st.st_uid != 0:
        raise UnsafePath(f"{what} is owned by {_owner(st.st_uid)}, not root", f"run 'chown root {path}'")
    loose = st.st_mode & 0o022
    if loose:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if loose & bit)
        letters = "".join(c for bit, c in ((0o020, "g"), (0o002, "o")) if loose & bit)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            # /tmp and its like: the sticky bit does not make it safe, and the fix is not to close it.
            raise UnsafePath(f"{what} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}, sticky)",
                             None)
        raise UnsafePath(f"{what} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})",
                         f"run 'chmod {letters}-w {path}'")


def _walk(path: str) -> str:
    """Resolve ``path`` name by name, judging each directory a name is looked up in; return the final path.

    ``..`` goes to the parent of the directory reached so far (as the
    kernel does: after a symlink, the parent of where it led).
    """
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    pending: List[str] = [p for p in path.split("/") if p]
    pending.reverse()
    current = "/"
    judged = set()
    followed = 0
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        if current not in judged:
            _judge(current, os.stat(current), f"the directory {current} above it")
            judged.add(current)
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise UnsafePath("its path has too many levels of symbolic links", "check the symbolic links on its path")
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p]
            parts.reverse()
            pending.extend(parts)
            if target.startswith("/"):
                current = "/"
            continue
        if pending and not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{candidate} in its path is not a directory", "check the path")
        current = candidate
    return current


NULL_DEVICE = os.makedev(1, 3)  # /dev/null: reads as empty whoever may write to it (--config /dev/null: no settings)


def check_opened(path: str, fd: int, kind: str, relax: str = "") -> Optional[str]:
    """Why the file open as ``fd`` (named ``path``) must not be trusted as root, or None when it may be.

    ``kind`` names the file in the sentence ("the policy script");
    ``relax`` says how to switch the check off, where it can be. The
    answer is one sentence: the file, what is wrong, and what fixes it.
    """
    opened = os.fstat(fd)
    if stat.S_ISCHR(opened.st_mode) and opened.st_rdev == NULL_DEVICE:
        return None
    try:
        if not stat.S_ISREG(opened.st_mode):
            raise UnsafePath("it is not a regular file", "name a regular file")
        _judge(path, opened, "the file")
        final = _walk(path)
        reached = os.stat(final)
        if (reached.st_dev, reached.st_ino) != (opened.st_dev, opened.st_ino):
            raise UnsafePath("it was replaced while qrunner read it", "run qrunner again, and find out who "
                                                                        "changes it")
    except UnsafePath as unsafe:
        fix = unsafe.fix or "move it to a directory only root may change, like /etc/qrunner"
        return (f"{path}: {kind} is not safe to use as root: {unsafe.problem}, so someone other than root could "
                f"change what qrunner does; {fix}{relax}.")
    except OSError as exc:
        return (f"{path}: {kind} cannot be checked ({exc.strerror} at {exc.filename}); check the path.")
    return None
