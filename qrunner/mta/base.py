"""The one small interface every MTA back end implements."""

from __future__ import annotations

from typing import List

from qrunner.message import Message


class Backend:
    """A queue qrunner can read (and, for a live MTA, act on).

    ``list_messages`` returns the candidates for the policy: for a live MTA
    the messages qrunner may act on, for a snapshot every line.
    """

    name = "backend"

    def list_messages(self) -> List[Message]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the back end holds open."""
