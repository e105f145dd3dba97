"""damocles-manager's own ext-prover dispatch, as the simulator's baseline.

Modelled on the behaviour read from damocles-manager (see ../shared/damocles-wire.md): a request
picks its child the moment it arrives. Among the children of its stage with a free `Concurrent`
slot it picks one at random, weighted by `Weight`; if none is free it picks one at random among
all of them and then waits for *that* child's slot, even if another child frees a slot first.
Waiters on one child get its slot in arrival order. There is no priority and no retry.

When a deadline's challenge window closes, damocles-manager aborts that deadline's runner
(poster/scheduler.go `shouldAbort`), which ends the context of its requests (`expire`): a request
still waiting for its child's slot is dropped, and one already sent to its child goes on running
there (the JSON-lines protocol has no cancel) while its slot is given back (extproc's `process`
returns and frees its limiter), so the child may take its next waiter alongside it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class Host(Protocol):
    """What a dispatcher needs from the simulator."""

    def start_job(self, job_id: int, child_id: str) -> None: ...


@dataclass(slots=True)
class BaselineChild:
    """One child as damocles-manager sees it: a weighted slot semaphore with a waiting line."""

    child_id: str
    stage: str
    capacity: int = 1
    weight: int = 1
    running: set[int] = field(default_factory=set)
    waiting: deque[int] = field(default_factory=deque)


class DamoclesDispatch:
    """damocles-manager's choice of child, driven by arrivals and completions (sans-IO)."""

    def __init__(self, children: list[BaselineChild], rng: random.Random) -> None:
        self._rng = rng
        self._children = {c.child_id: c for c in children}
        self._by_stage: dict[str, list[BaselineChild]] = {}
        for c in children:
            self._by_stage.setdefault(c.stage, []).append(c)
        self._where: dict[int, str] = {}

    def arrived(self, host: Host, job_id: int, stage: str) -> None:
        """A request arrives: bind it to a child now, start it if that child has a free slot."""
        pool = self._by_stage.get(stage)
        if not pool:
            raise ValueError(f"the baseline deployment has no {stage} child")
        free = [c for c in pool if len(c.running) < c.capacity]
        choice = self._weighted(free or pool)
        self._where[job_id] = choice.child_id
        if len(choice.running) < choice.capacity:
            choice.running.add(job_id)
            host.start_job(job_id, choice.child_id)
        else:
            choice.waiting.append(job_id)

    def finished(self, host: Host, job_id: int) -> None:
        """A request ended on its child: the slot goes to that child's next waiter, if any."""
        where = self._where.pop(job_id, None)
        if where is None:
            return  # its context ended before (expire): its slot was given back then
        child = self._children[where]
        child.running.discard(job_id)
        self._next(host, child)

    def expire(self, host: Host, job_ids: list[int]) -> list[int]:
        """The context of these requests (one deadline's) ended: those still waiting for a slot
        are dropped, and returned; those running keep running on their child but give their slot
        back (see the module notes). The waiting ones go first: a slot given back never goes to
        a request whose context has ended with it."""
        dropped = []
        for job_id in job_ids:
            where = self._where.get(job_id)
            if where is not None and job_id not in self._children[where].running:
                self._children[where].waiting.remove(job_id)
                del self._where[job_id]
                dropped.append(job_id)
        for job_id in job_ids:
            where = self._where.pop(job_id, None)  # None: it ended already, or was just dropped
            if where is not None:
                child = self._children[where]
                child.running.discard(job_id)
                self._next(host, child)
        return dropped

    def _next(self, host: Host, child: BaselineChild) -> None:
        if child.waiting and len(child.running) < child.capacity:
            nxt = child.waiting.popleft()
            child.running.add(nxt)
            host.start_job(nxt, child.child_id)

    def _weighted(self, children: list[BaselineChild]) -> BaselineChild:
        return self._rng.choices(children, weights=[c.weight for c in children])[0]
