"""The floor of reading the queue: every queue file read once from Python, nothing parsed.

    python bench/read_queue.py postfix QUEUE_DIRECTORY   # every file of deferred/, whole
    python bench/read_queue.py exim SPOOL/QUEUE/input    # every -H file

Prints how many files it read and their bytes, so that the benchmark can
check it read the whole queue.
"""

import os
import sys


def main() -> None:
    kind, top = sys.argv[1], sys.argv[2]
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
