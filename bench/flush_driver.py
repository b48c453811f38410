"""Schedule the listed Postfix queue ids through the flush service, with qrunner's own client.

    python bench/flush_driver.py CONFIG_DIRECTORY IDS_FILE

What a run does with the deferred messages it sends by the default route
(``PostfixBackend.send``: a request on the flush socket per message, a few
on their way at once, each outcome handed to the run's journal, here one
that keeps nothing). Prints how many the flush service accepted and the
seconds the send took (without the process start and imports), and exits
1 if any was not scheduled.
"""

import sys
import time

from qrunner.config import PostfixSettings
from qrunner.message import Message
from qrunner.mta.base import Result, SendRequest
from qrunner.mta.postfix import PostfixBackend


class Journal:
    """A run's hand-over journal that keeps nothing (the default route writes only ``sent``)."""

    def sent(self, _request, _outcome) -> None:
        pass


def main() -> None:
    backend = PostfixBackend(PostfixSettings(config_directory=sys.argv[1]))
    with open(sys.argv[2]) as f:
        ids = f.read().split()
    requests = [SendRequest(Message(queue_id, 0, 0, "", (), queue_name="deferred"), None) for queue_id in ids]
    started = time.perf_counter()
    outcomes = backend.send(requests, Journal())
    seconds = time.perf_counter() - started
    accepted = sum(1 for outcome in outcomes.values() if outcome.result is Result.SCHEDULED)
    print(accepted, f"{seconds:.6f}")
    sys.exit(0 if accepted == len(ids) else 1)


if __name__ == "__main__":
    main()
