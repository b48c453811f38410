"""Progress bars for long commands at a terminal (``run``, ``flush``, ``plan``, ``release``, ``snapshot``).

An admin who starts ``qrunner flush --all`` over 50,000 messages at a
shell wants to see that it moves and how fast; cron, systemd and a pipe
want nothing of the kind. So a bar is drawn only when stderr is a terminal,
without ``-q``, and not under systemd (``INVOCATION_ID``, or stderr being the
journal's stream); and only for a stage that lasts longer than
:data:`DELAY` seconds, so a small queue looks as it always did. The bars
are tqdm's; qrunner's log lines on stderr are written above the bar, not
through it.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from qrunner.log import LOGGER, stderr_is_journal

DELAY = 1.0  # seconds a stage runs before its bar appears


def wanted(verbosity: int) -> bool:
    """Bars for this process: at a terminal, without -q, not under systemd."""
    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return terminal and verbosity >= 0 and not os.environ.get("INVOCATION_ID") and not stderr_is_journal()


Tick = Callable[[int], None]


def no_tick(count: int = 1) -> None:
    """The tick of no bar."""


class Progress:
    """Makes the bars of one command; ``Progress(False)`` (:data:`NONE`) makes none."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextmanager
    def bar(self, what: str, total: int, unit: str = "msg") -> Iterator[Tick]:
        """A bar for ``total`` items; the stage calls the tick it gets with how many more are done."""
        if not self.enabled or total <= 0:
            yield no_tick
            return
        from tqdm import tqdm  # only at a terminal: cron and the timer never import it

        with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, delay=DELAY, leave=False,
                  dynamic_ncols=True) as bar, _log_above(tqdm):
            yield bar.update


NONE = Progress(False)


class _AboveTheBar:
    """A stream for the stderr log handler while a bar is drawn: each line goes above the bar."""

    def __init__(self, tqdm_class, stream):
        self.tqdm = tqdm_class
        self.stream = stream

    def write(self, text: str) -> None:
        self.tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def _log_above(tqdm_class) -> Iterator[None]:
    handlers = [h for h in logging.getLogger(LOGGER).handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]
    for handler in handlers:
        handler.stream = _AboveTheBar(tqdm_class, sys.stderr)
    try:
        yield
    finally:
        for handler in handlers:
            handler.stream = sys.stderr
