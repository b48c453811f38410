"""Today's Python tool: pymailq (PyPI) loads the queue and parses every message's headers (postcat each).

    .bench-venv/bin/python bench/pymailq_select.py CONFIG_DIRECTORY

Runs in the bench-only venv (make bench installs pymailq there). Selects
the messages whose Subject ends in 7, as the benchmark's header script
does, and prints how many it loaded, parsed and selected.
"""

import sys

import pymailq
from pymailq.store import PostqueueStore


def main() -> None:
    config = sys.argv[1]
    pymailq.CONFIG["commands"]["list_queue"] = ["postqueue", "-c", config, "-p"]
    pymailq.CONFIG["commands"]["cat_message"] = ["postcat", "-c", config, "-qv"]
    store = PostqueueStore()
    store.load()
    parsed = selected = 0
    for mail in store.mails:
        mail.parse()
        if mail.parsed:
            parsed += 1
        subject = (getattr(mail.head, "Subject", None) or [""])[0]
        if subject.rstrip().endswith("7"):
            selected += 1
    print(len(store.mails), parsed, selected)


if __name__ == "__main__":
    main()
