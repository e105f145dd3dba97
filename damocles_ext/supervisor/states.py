"""A configured child's states (`ChildState`) and the changes between them that are allowed
(`TRANSITIONS`); `child_loop.Child.change_state` is the only place a state changes."""

from __future__ import annotations

import enum


class ChildState(enum.Enum):
    """Where a configured child is in its life (statistics also report "busy": ready, working)."""

    STARTING = "starting"  # spawned (or about to be), waiting for its ready message
    READY = "ready"  # takes requests
    STOPPING = "stopping"  # its process is going away; no more requests for it
    BACKOFF = "backoff"  # waiting to start again
    FATAL = "fatal"  # gave up: it kept failing (the restart rules); may be retried at the cap
    STOPPED = "stopped"  # for good: shutdown, or AutoRestart off

    @property
    def word(self) -> str:
        """How messages name it: FATAL in capitals, the others as they are."""
        return self.value.upper() if self is ChildState.FATAL else self.value


# Every allowed change of state; anything else is a bug of ours (IllegalTransition).
TRANSITIONS: dict[ChildState, frozenset[ChildState]] = {
    ChildState.STARTING: frozenset(
        {
            ChildState.READY,
            ChildState.STOPPING,  # went down before it was ready
            ChildState.BACKOFF,  # could not be spawned
            ChildState.FATAL,
            ChildState.STOPPED,
        }
    ),
    ChildState.READY: frozenset({ChildState.STOPPING, ChildState.STOPPED}),
    ChildState.STOPPING: frozenset({ChildState.BACKOFF, ChildState.FATAL, ChildState.STOPPED}),
    ChildState.BACKOFF: frozenset({ChildState.STARTING, ChildState.STOPPED}),
    # Final unless the restart rules retry FATAL children (BackoffPolicy.retry_fatal).
    ChildState.FATAL: frozenset({ChildState.STARTING}),
    ChildState.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A child was moved between two states that TRANSITIONS does not link: a bug."""
