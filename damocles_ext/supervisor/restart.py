"""The restart rules for one prover child, in one place and free of I/O.

A child that stops (a failed start, or an exit after it was ready) is started again after a delay
that doubles from `base` up to `cap`, with jitter so a pool that crashed together does not restart
in lockstep. The delay sequence starts over once a child has stayed ready for `stable_after`
seconds, and also after a run that answered at least one request (a success or an error answer):
such a child works, and what killed it (the OOM killer, a GPU fault) says nothing about its next
run, so it restarts after `base` however often that happens, while the requests queued for it
wait. Backoff is for children that cannot start or die before they answer anything. A child whose
start fails `max_failed_starts` times in a row is FATAL: it is not started
again, so a broken binary or config costs a few log lines, not a restart storm. The same holds for
a child that says it is ready and then exits before answering a single request, again and again
(`max_failed_starts` such exits in a row, none of them after `stable_after` seconds of ready): it
backs off like any crash, then is FATAL instead of crash-looping forever. A run that was sent a
request and went down before answering (a crash on that request) is no such exit: it backs off
like any crash, never to FATAL, and leaves the count as it was. Each request's MaxAttempts bounds
what a child crashing on requests costs, and a request that crashes every prover it is sent to
(vanilla proofs a native SNARK prover aborts on, resubmitted) would otherwise make every child of
its stage FATAL in turn. A child with AutoRestart off is never restarted.

What FATAL means next is the policy's `retry_fatal`. Off (the default, and `prove -c`'s, a
one-shot command): FATAL is final, the child is not started again, and a caller waiting for it
(`Supervisor.wait_ready`) hears so at once. On (`run`, `serve` and `worker`, which run for
months): a FATAL child is started again every `cap` seconds (with jitter, never above it), so a
cause that passes (a GPU driver not loaded yet at boot) ends it without a restart of
damocles-ext, at the cost of a few log lines a minute per broken child (its failed start, the
FATAL and when it is tried next); it stays FATAL for its stage (requests fail at once with why)
until a start succeeds.

Times are floats on a clock the caller chooses; randomness comes from the `random.Random` passed
in, so a seeded generator gives a reproducible sequence in tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The numbers of the restart rules."""

    base: float = 1.0
    cap: float = 60.0
    stable_after: float = 60.0
    max_failed_starts: int = 5
    # The delay is drawn uniformly from [d * (1 - jitter), d]: never above the nominal delay, so
    # `cap` stays a true upper bound.
    jitter: float = 0.2
    # A child whose start is refused (it exits 2 before its ready message: its prover cannot
    # load with this config) is FATAL at once rather than retried: a one-shot command (prove
    # -c) says so promptly. Off for long-running supervisors, where a refusal may pass (a GPU
    # driver not loaded yet at boot).
    give_up_when_refused: bool = False
    # FATAL is final when off; when on, a FATAL child is started again every `cap` seconds (with
    # jitter) until a start succeeds. On for the long-running commands (run, serve, worker).
    retry_fatal: bool = False

    def nominal_delay(self, step: int) -> float:
        """The delay before restart number `step` (0-based) in a row, before jitter."""
        # Cap the exponent first: 2**step overflows a float long before a child gives up.
        return min(self.cap, self.base * 2.0 ** min(step, 64))


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the child again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The child is not restarted by the backoff; `fatal` is False when AutoRestart is simply
    off. `retry_in`: a FATAL child is tried again after that many seconds (`retry_fatal`), else
    None (never again)."""

    reason: str
    fatal: bool
    retry_in: float | None = None


Decision = Restart | GiveUp


class RestartTracker:
    """Restart state of one child: feed it what happened, it says what to do next."""

    def __init__(
        self,
        policy: BackoffPolicy | None = None,
        *,
        auto_restart: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self.auto_restart = auto_restart
        self._rng = rng or random.Random()
        self.failed_starts = 0  # consecutive starts that never reached ready
        self.idle_exits = 0  # consecutive exits after ready without answering any request
        self.step = 0  # position in the doubling sequence
        self.restarts = 0  # total restarts decided (for statistics)
        self._ready_since: float | None = None

    def ready(self, now: float) -> None:
        """The child reported ready: its start succeeded."""
        self.failed_starts = 0
        self._ready_since = now

    def start_failed(self, reason: str, *, refused: bool = False) -> Decision:
        """The child never became ready (spawn error, bad ready message, timeout, early exit);
        `refused`: it exited 2, its prover cannot load with this config."""
        self._ready_since = None
        self.failed_starts += 1
        if refused and self.policy.give_up_when_refused:
            return GiveUp(f"FATAL: its prover cannot load (last: {reason})", fatal=True)
        if self.failed_starts >= self.policy.max_failed_starts:
            return self._fatal(f"{self.failed_starts} failed starts in a row (last: {reason})")
        return self._restart(reason)

    def exited(self, now: float, reason: str, *, served: bool, sent: bool = False) -> Decision:
        """The child stopped after it had been ready (crash, kill after a hang, broken protocol).

        `served`: it answered at least one request in that run (then it restarts after `base`);
        `sent`: it was sent one (a crash on a request it was given is no idle exit: see the
        module's docstring).
        """
        stable = (
            self._ready_since is not None and now - self._ready_since >= self.policy.stable_after
        )
        if stable or served:
            self.step = 0
        self._ready_since = None
        if served or stable:
            self.idle_exits = 0
        elif not sent:
            self.idle_exits += 1
            if self.idle_exits >= self.policy.max_failed_starts:
                return self._fatal(
                    f"exited {self.idle_exits} times in a row after its ready message"
                    f" without answering a request (last: {reason})"
                )
        return self._restart(reason)

    def _fatal(self, why: str) -> Decision:
        if not (self.auto_restart and self.policy.retry_fatal):
            return GiveUp(
                f"FATAL: {why}; not restarting - fix the program or config and restart"
                " damocles-ext",
                fatal=True,
            )
        # Every cap seconds, jittered like a restart so that a pool retries apart.
        delay = self.policy.cap * (1.0 - self.policy.jitter * self._rng.random())
        self.restarts += 1
        return GiveUp(
            f"FATAL: {why}; trying again every {self.policy.cap:g}s until it starts"
            " - fix the program or config",
            fatal=True,
            retry_in=delay,
        )

    def _restart(self, reason: str) -> Decision:
        if not self.auto_restart:
            return GiveUp(f"{reason}; AutoRestart is off, not restarting", fatal=False)
        nominal = self.policy.nominal_delay(self.step)
        delay = nominal * (1.0 - self.policy.jitter * self._rng.random())
        self.step += 1
        self.restarts += 1
        return Restart(delay, reason)
