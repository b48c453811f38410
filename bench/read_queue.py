"""The floors of reading the queue from Python: every queue file read once, or listed from its envelope.

    python bench/read_queue.py postfix QUEUE_DIRECTORY       # every file of deferred/, whole, nothing parsed
    python bench/read_queue.py postfix-list QUEUE_DIRECTORY  # the queue listed from its files, as qshape reads it
    python bench/read_queue.py exim SPOOL/QUEUE/input        # every -H file

``postfix-list`` is the least a lister that reads the queue directories
instead of running ``postqueue -j`` does: per message one open of its queue
file, its envelope records (``C`` sizes, ``T`` arrival, ``S`` sender, each
``R`` still to be delivered) parsed up to the content, the extracted part
(``X`` to ``E``, found from the offsets in ``C``) read with one ``pread``,
and for a deferred message its defer log (the delay reasons ``postqueue -j``
shows). No pointer records, no damage checks, nothing kept beyond a count:
whatever a real lister adds comes on top. It answers the question of issue
13 whether listing from the files is faster than ``postqueue -j``.

Prints how many messages (files) it read and their recipients (bytes), so
that the benchmark can check it read the whole queue.
"""

import os
import sys

ENVELOPE_END, EXTRACTED_END = ord("M"), ord("E")
SIZE, RECIPIENT = ord("C"), ord("R")
FIRST_READ = 4096


def records(buf: bytes, stop: int):
    """(type, data) of each whole record in ``buf``, up to and with the first of type ``stop``; then
    (None, offset of the first record not whole) if the buffer ends before it."""
    pos, n = 0, len(buf)
    while pos + 2 <= n:
        start, rtype, length = pos, buf[pos], buf[pos + 1]
        pos += 2
        if length >= 0x80:  # a length of more than one 7-bit group
            length, shift = length & 0x7F, 7
            while pos < n:
                b = buf[pos]
                pos += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            else:
                yield None, start
                return
        if pos + length > n:
            yield None, start
            return
        yield rtype, buf[pos:pos + length]
        if rtype == stop:
            return
        pos += length
    yield None, pos


def envelope(fd: int, path: str) -> int:
    """How many recipients of one queue file are still to be delivered."""
    buf, offset, count, size = os.read(fd, FIRST_READ), 0, 0, None
    while True:
        more = None
        for rtype, data in records(buf, ENVELOPE_END):
            if rtype is None:
                more = data
            elif rtype == RECIPIENT:
                count += 1
            elif rtype == SIZE:
                size = data.split()
        if more is None:
            break
        left = len(buf) - more  # the part of a record not yet whole: read on from it, more than before
        offset += more
        buf = os.pread(fd, max(65536, 2 * len(buf)), offset)
        if len(buf) <= left:
            raise SystemExit(f"{path}: the file ends before its envelope does")
    if size is None:
        raise SystemExit(f"{path}: a queue file without a size record")
    extracted = os.pread(fd, 65536, int(size[0]) + int(size[1]))
    count += sum(1 for rtype, _data in records(extracted, EXTRACTED_END) if rtype == RECIPIENT)
    return count


def postfix_list(queue_directory: str) -> None:
    messages = recipients = 0
    for queue in ("incoming", "active", "deferred", "hold"):
        top = os.path.join(queue_directory, queue)
        for directory, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(directory, name)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue  # moved on meanwhile, as showq skips it
                try:
                    recipients += envelope(fd, path)
                finally:
                    os.close(fd)
                messages += 1
                if queue == "deferred":
                    log = os.path.join(queue_directory, "defer", os.path.relpath(directory, top), name)
                    try:
                        fd = os.open(log, os.O_RDONLY)
                    except FileNotFoundError:
                        continue
                    try:
                        os.read(fd, 65536)
                    finally:
                        os.close(fd)
    print(messages, recipients)


def main() -> None:
    kind, top = sys.argv[1], sys.argv[2]
    if kind == "postfix-list":
        postfix_list(top)
        return
    if kind == "postfix":
        top = os.path.join(top, "deferred")
    count = size = 0
    for directory, _dirs, files in os.walk(top):
        for name in files:
            if kind == "exim" and not name.endswith("-H"):
                continue
            with open(os.path.join(directory, name), "rb") as f:
                size += len(f.read())
            count += 1
    print(count, size)


if __name__ == "__main__":
    main()
