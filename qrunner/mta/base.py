"""The one small interface every MTA back end implements.

The runner follows the pipeline (list, decide, plan, execute, record) and
asks the back end only these questions and for these actions, so a back end
for another MTA slots in without the runner changing shape.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

from qrunner.message import Message


class HandOverError(Exception):
    """A message could not be handed to its sender's route; the text says which step failed and why."""


class Backend:
    """A queue qrunner can read (and, for a live MTA, act on).

    ``instance`` names the MTA instance in qrunner's records (two instances
    never share records); ``list_messages`` returns every message the MTA
    shows, and ``is_candidate`` says which of them the policy may decide.
    """

    name = "backend"
    instance = ""
    hands_over = False  # True: a routed message is copied to its sender's route (Postfix), not dispatched

    def list_messages(self) -> List[Message]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the back end holds open."""

    # -- what a live MTA adds ------------------------------------------------

    def is_message_id(self, text: str) -> bool:  # pragma: no cover - interface
        """True when ``text`` has the MTA's message id syntax (checked before any command line)."""
        raise NotImplementedError

    def check_running(self) -> None:
        """Raise UnavailableError when the MTA cannot be asked about its queue."""

    def check_routes(self, senders) -> None:
        """Raise ConfigError when a sender's route cannot work with this MTA's configuration."""

    def check_can_act(self) -> None:
        """Raise when qrunner may not change the queue now (rights, MTA stopped)."""

    def is_candidate(self, message: Message, ours: bool) -> bool:  # pragma: no cover - interface
        """May the policy decide this message? ``ours``: it is held and qrunner held it."""
        raise NotImplementedError

    def why_not_candidate(self, message: Message) -> str:  # pragma: no cover - interface
        """One phrase for the log: why qrunner leaves this message alone."""
        raise NotImplementedError

    def next_retry(self, message: Message, attempt: Optional[Tuple[int, float]]) -> Optional[float]:
        """When the message is next due for delivery, or None when it is due now.

        ``attempt`` is qrunner's record of its own dispatches that left the
        message queued (count, time of the last), for MTAs that keep no
        retry schedule of their own for gated mail.
        """
        return None

    def hold_age_limit(self) -> Optional[float]:
        """Age (seconds since arrival) past which a released message is likely to bounce at once, if known."""
        return None

    def is_expired(self, message: Message) -> bool:
        """Too old for qrunner to keep: the MTA's own retry rules should take it over."""
        return False

    def hand_back(self, queue_ids: Sequence[str]) -> Set[str]:
        """Give messages back to the MTA's normal handling; the ids it confirmed."""
        return set()

    def hold(self, queue_ids: Sequence[str]) -> Set[str]:  # pragma: no cover - interface
        """Hold the messages; return the ids the MTA confirmed."""
        raise NotImplementedError

    def release(self, queue_ids: Sequence[str], to_default_queue: bool = False) -> Set[str]:  # pragma: no cover
        """Release qrunner's holds; return the ids the MTA confirmed.

        ``to_default_queue`` (Exim): also move them out of qrunner's named queue.
        """
        raise NotImplementedError

    def move_to_default_queue(self, queue_ids: Sequence[str]) -> Set[str]:
        """Move messages out of qrunner's named queue (Exim); nothing elsewhere."""
        return set()

    def hand_over(self, message: Message, sender) -> str:  # pragma: no cover - interface
        """Copy a held message into its sender's route; the copy's queue id. Raises HandOverError."""
        raise NotImplementedError

    def delete(self, queue_ids: Sequence[str]) -> Set[str]:  # pragma: no cover - interface
        """Delete messages (originals whose copy was accepted); the ids the MTA confirmed."""
        raise NotImplementedError

    def dispatch(self, messages: Sequence[Message], routes: Optional[Dict[str, object]] = None
                 ) -> Dict[str, str]:  # pragma: no cover - interface
        """Ask the MTA to deliver the messages, in the order given.

        ``routes`` maps a queue id to the sender whose route it takes (a back
        end that routes at dispatch, like Exim's router lookup file); the
        others go by the MTA's own routing.

        Returns queue id -> outcome: ``scheduled`` (the MTA took the request),
        ``delivered`` / ``deferred`` (the MTA's attempt is known to have
        ended so), ``vanished`` (no longer there to send), ``failed: why``.
        """
        raise NotImplementedError
