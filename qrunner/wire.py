"""The Lua worker's end of the connections the parent made with ``multiprocessing.Pipe``.

The worker does not import :mod:`multiprocessing`: with what it pulls in
(tempfile, shutil, random, socket) it was a third of the worker's start-up
imports, and the worker, started afresh for every run and after every
killed call, needs only the few lines here to speak its framing. A module
of its own, not a class in :mod:`qrunner.policy_worker`, which runs as
``__main__``: so that the test suite's fault harness can patch it there.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any


class Connection:
    """One end of a connection the parent made with ``multiprocessing.Pipe``, framed as that module frames it.

    Each message is a pickle after its length (4 bytes, network order; a
    -1 there and then 8 bytes for a pickle of 2 GiB or more), as
    ``multiprocessing.connection.Connection`` frames it, so the parent reads
    and writes its ends with that class.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, message: Any) -> None:
        data = pickle.dumps(message)
        size = len(data)
        if size > 0x7fffffff:
            self._write(struct.pack("!iQ", -1, size))
            self._write(data)
        elif size > 16384:
            self._write(struct.pack("!i", size))
            self._write(data)
        else:
            self._write(struct.pack("!i", size) + data)

    def recv(self) -> Any:
        (size,) = struct.unpack("!i", self._read(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read(8))
        return pickle.loads(self._read(size))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def _read(self, size: int) -> bytes:
        """Exactly ``size`` bytes; EOFError when the parent closed its end before a message, OSError within one."""
        parts = []
        remaining = size
        while remaining > 0:
            part = os.read(self.fd, remaining)
            if not part:
                if remaining == size:
                    raise EOFError
                raise OSError("got end of file during message")
            parts.append(part)
            remaining -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
