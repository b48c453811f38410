"""Postfix's flush service, spoken on its UNIX socket: ``postqueue -i``'s request, without a process per message.

The service (flush(8)) answers one request per connection: for
``send_file`` it touches the deferred queue file, moves it to incoming/ and
wakes the queue manager, then says status 0 (also for an id it no longer
finds: the caller checks the queue for that). One connection at a time
leaves most of the time waiting for the service's process to be scheduled
on a busy machine; :class:`FlushRequests` keeps a few connections open at
once (the master starts more flush processes for them, within master.cf's
limit, as for concurrent ``postqueue -i``), so that those waits overlap:
about half the time per message, measured over 1,000 requests on 2 cores
(BENCHMARKS.md, "Dispatch"). Those few are of one priority: the service
may move them in any order (the queue manager takes the files from
incoming/ in its own order in any case), never a lower priority first.
Each file is marked flushed before its request (:func:`mark_unthrottled`):
more flush processes at once widen a race of the service's own with the
queue manager's scans, which the mark closes.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Union

from qrunner.mta.base import SendRequest

log = logging.getLogger("qrunner.postfix")

FLUSH_TIMEOUT = 10.0  # seconds for any one step of one request (connect, each read)
FLUSH_WINDOW = 4  # requests on their way at once (a limit on flush in master.cf only makes them wait their turn)


def mark_unthrottled(path: str, on: bool = True) -> bool:
    """Set (or, with ``on=False``, clear) the unthrottle bit of a deferred queue file; False when the file is gone.

    The bit (group read, ``MAIL_QUEUE_STAT_UNTHROTTLE``) is how flush(8)
    tells the queue manager that a file is flushed: the queue manager lets
    such a file past ``defer_transports`` and clears the bit when it reads
    it (qmgr_active.c, qmgr_message.c). flush(8) sets it only after it has
    made the file due (utime), so a scan of the deferred queue in between
    takes the file without it and gates it again ("deferred transport"),
    while the flush service answers success; on a busy machine, with the
    gate's short scan interval, that happens (RELIABILITY.md). Set before
    the request, the bit is there whichever way the queue manager takes a
    file that was not yet due. A failed request takes it off again (one
    that another flush set at that moment goes too: that message then
    waits, gated, for its own retry time, the safe side), so that a message
    Postfix was not asked to send does not pass the gate at its retry time.

    As flush and postsuper do, only a regular file with one link that is
    ready (mode rwx for its owner) is changed, through its descriptor,
    never by a path that could be swapped under it. The open is also the
    check that the message is still deferred. Any other failure (a
    capability missing under another unit, a read-only queue) is logged,
    as a warning the first time of each kind (errno) in a process, and the
    request goes on without the mark.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        _cannot_mark(path, exc)
        return True
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_mode & stat.S_IRWXU == stat.S_IRWXU:
            wanted = st.st_mode | stat.S_IRGRP if on else st.st_mode & ~stat.S_IRGRP
            if wanted != st.st_mode:
                os.fchmod(fd, stat.S_IMODE(wanted))
    except OSError as exc:
        _cannot_mark(path, exc)
    finally:
        os.close(fd)
    return True


_warned: Set[int] = set()  # errno values already warned about


def _cannot_mark(path: str, exc: OSError) -> None:
    level = logging.DEBUG if exc.errno in _warned else logging.WARNING
    _warned.add(exc.errno or 0)
    log.log(level, "cannot mark %s flushed (%s); a queue scan that overtakes its flush request may gate it again, "
            "and the next run sends it", path, exc.strerror or exc)


def _attr_lists(data: bytes) -> List[Dict[bytes, bytes]]:
    """The complete attribute lists at the start of ``data`` (Postfix's null-terminated protocol: name\\0value\\0 ...
    then \\0); an incomplete one at the end is left out."""
    tokens = data.split(b"\0")[:-1]  # the part after the last \0 is incomplete
    lists: List[Dict[bytes, bytes]] = []
    attrs: Dict[bytes, bytes] = {}
    i = 0
    while i < len(tokens):
        if tokens[i] == b"":
            lists.append(attrs)
            attrs = {}
            i += 1
        elif i + 1 == len(tokens):
            break
        else:
            attrs[tokens[i]] = tokens[i + 1]
            i += 2
    return lists


def _answer(sock: socket.socket) -> Dict[bytes, bytes]:
    """The flush service's answer, after its greeting; OSError as soon as the greeting is not the flush service's."""
    data = b""
    greeted = False
    while True:
        lists = _attr_lists(data)
        if lists and not greeted:
            if lists[0].get(b"protocol") != b"queue_flush_protocol":
                raise OSError(f"unexpected greeting {lists[0]!r}")
            greeted = True
        if len(lists) >= 2:
            return lists[1]
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("the flush service closed the connection")
        data += chunk


def _send(path: str, queue_id: str) -> socket.socket:
    """A connection to the service with the request for ``queue_id`` on its way.

    The request goes out with the connection rather than after the
    service's greeting: the service reads it once it has greeted, and each
    message waits for one answer instead of two (a third less time per
    request, measured on a 1,000-message dispatch). The greeting is still
    checked, as soon as it has come, before any answer is believed.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(FLUSH_TIMEOUT)
        sock.connect(path)
        sock.sendall(b"request\0send_file\0queue_id\0" + queue_id.encode("ascii") + b"\0\0")
    except BaseException:
        sock.close()
        raise
    return sock


def _accepted(sock: socket.socket) -> bool:
    """Whether the service took the request sent on ``sock`` (closed here); OSError when it did not answer."""
    with sock:
        reply = _answer(sock)
    status = reply.get(b"status")
    if status is None:
        raise OSError(f"unexpected reply {reply!r}")
    return status == b"0"


def flush_request(path: str, queue_id: str) -> bool:
    """One ``postqueue -i`` request: True when the service accepted it; OSError when the socket did not serve."""
    return _accepted(_send(path, queue_id))


class FlushRequests:
    """Flush requests on their way, each on its own connection, answered when asked for.

    :meth:`send` puts a request on its way; :meth:`answer` waits for the
    answer to one already sent, while the service works on the others. A
    request that could not be sent keeps its error until :meth:`answer`
    raises it. :meth:`close` drops what was never answered (the service
    may still act on those requests, as after a crash: their files keep
    their mark) and names those that never left.
    """

    def __init__(self, path: str):
        self.path = path
        self._open: Dict[str, Union[socket.socket, OSError]] = {}  # queue id -> its socket, or why it is not sent

    def __len__(self) -> int:
        return len(self._open)  # requests on their way, not yet answered

    def sent(self, queue_id: str) -> bool:
        return queue_id in self._open

    def unanswered(self) -> List[str]:
        """The requests on their way, in the order they were sent."""
        return list(self._open)

    def send(self, queue_id: str) -> None:
        try:
            self._open[queue_id] = _send(self.path, queue_id)
        except OSError as exc:
            self._open[queue_id] = exc

    def answer(self, queue_id: str) -> bool:
        """True when the service accepted the request for ``queue_id``; OSError when its socket did not serve."""
        pending = self._open.pop(queue_id)
        if isinstance(pending, OSError):
            raise pending
        return _accepted(pending)

    def close(self) -> List[str]:
        """Drop the unanswered requests; the queue ids of those that could not be sent."""
        unsent = [queue_id for queue_id, pending in self._open.items() if isinstance(pending, OSError)]
        for pending in self._open.values():
            if isinstance(pending, socket.socket):
                pending.close()
        self._open.clear()
        return unsent


class FlushAhead:
    """The flush requests of one send, each sent a few messages ahead of its answer.

    ``plan`` is the send's requests in order; those of the default route
    (``route`` None) go by a flush request, and :meth:`answer` is called for
    them, in that order. It sends the request for its message and for the
    next ones, up to :data:`FLUSH_WINDOW` requests on their way, never past
    a message that goes otherwise (a sender's copy: no request overtakes
    it) or at another priority (each level's requests are all answered
    before the next level's first is sent: the service never takes a lower
    priority first), then waits for its own answer. Within a level the
    service may take the few on their way in any order, as the queue
    manager takes the files from incoming/ in its own. A message that
    ``waiting`` no longer finds gets no request.
    """

    def __init__(self, path: str, plan: Sequence[SendRequest], waiting: Callable[[str], bool]):
        self.requests = FlushRequests(path)
        self.plan = plan
        self.waiting = waiting
        self.at = 0  # where in plan the last answered message was
        self.gone: Set[str] = set()

    def answer(self, queue_id: str) -> Optional[bool]:
        """None when the message is no longer waiting; else :meth:`FlushRequests.answer` (OSError included)."""
        self._ask(queue_id)
        for next_id in self._run_after(queue_id):
            if len(self.requests) >= FLUSH_WINDOW:
                break
            self._ask(next_id)
        if queue_id in self.gone:
            self.gone.discard(queue_id)
            return None
        return self.requests.answer(queue_id)

    def _ask(self, queue_id: str) -> None:
        if not (self.requests.sent(queue_id) or queue_id in self.gone):
            if self.waiting(queue_id):
                self.requests.send(queue_id)
            else:
                self.gone.add(queue_id)

    def _run_after(self, queue_id: str) -> Iterator[str]:
        """The flushed messages after ``queue_id`` in the plan, up to the next one that goes otherwise or at
        another priority."""
        plan = self.plan
        for i in range(self.at, len(plan)):
            if plan[i].route is None and plan[i].message.queue_id == queue_id:
                self.at = i
                for j in range(i + 1, len(plan)):
                    if plan[j].route is not None or plan[j].priority != plan[i].priority:
                        return
                    yield plan[j].message.queue_id
                return

    def close(self) -> List[str]:
        """As :meth:`FlushRequests.close`."""
        return self.requests.close()
