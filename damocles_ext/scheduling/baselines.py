"""damocles-manager's own ext-prover dispatch, as the simulator's baseline.

Modelled on the behaviour read from damocles-manager (see ../shared/damocles-wire.md): a request
picks its child the moment it arrives. Among the children of its stage with a free `Concurrent`
slot it picks one at random, weighted by `Weight`; if none is free it picks one at random among
all of them and then waits for *that* child's slot, even if another child frees a slot first.
Waiters on one child get its slot in arrival order. There is no deadline, no priority, no retry.
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
        child = self._children[self._where.pop(job_id)]
        child.running.discard(job_id)
        if child.waiting:
            nxt = child.waiting.popleft()
            child.running.add(nxt)
            host.start_job(nxt, child.child_id)

    def _weighted(self, children: list[BaselineChild]) -> BaselineChild:
        return self._rng.choices(children, weights=[c.weight for c in children])[0]
