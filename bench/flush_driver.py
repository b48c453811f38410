"""Schedule the listed Postfix queue ids through the flush service, with qrunner's own client.

    python bench/flush_driver.py CONFIG_DIRECTORY IDS_FILE

What a run does for each deferred message it sends by the default route
(``PostfixBackend.schedule``: one request on the flush socket per message).
Prints how many the flush service accepted and the seconds the loop took
(without the process start and imports), and exits 1 if any was refused.
"""

import sys
import time

from qrunner.config import PostfixSettings
from qrunner.mta.postfix import PostfixBackend


def main() -> None:
    backend = PostfixBackend(PostfixSettings(config_directory=sys.argv[1]))
    with open(sys.argv[2]) as f:
        ids = f.read().split()
    started = time.perf_counter()
    accepted = sum(1 for queue_id in ids if backend.schedule(queue_id))
    seconds = time.perf_counter() - started
    print(accepted, f"{seconds:.6f}")
    sys.exit(0 if accepted == len(ids) else 1)


if __name__ == "__main__":
    main()
