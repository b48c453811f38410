"""Queue building in bulk: batches of messages handed out to a few threads, the first failure stopping the rest.

The bench (bench/postfix_bench.py over SMTP sessions, bench/exim_bench.py over ``exim -bS``) and the load tests
(tests/test_load.py) build big queues this way: one session or process per batch, far faster than a process per
message.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Sequence, TypeVar

T = TypeVar("T")


def in_batches(items: Sequence[T], size: int, threads: int, send: Callable[[Sequence[T]], Optional[str]]) -> List[str]:
    """Call ``send`` on each batch of ``size`` items, ``threads`` at a time; the errors (``send``'s return value,
    or what it raised) come back, and no batch starts after the first one."""
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    errors: List[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not batches or errors:
                    return
                batch = batches.pop(0)
            try:
                problem = send(batch)
            except Exception as error:  # noqa: BLE001 (reported, not swallowed: the caller raises on it)
                problem = str(error)
            if problem:
                with lock:
                    errors.append(problem)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors
