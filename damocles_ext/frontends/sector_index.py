"""The coordinator's `Venus.SectorIndexerFind`: a read-only sector index for its workers and for
proxy nodes (`sectors find --proxy`, a `prove --comm-r`, another coordinator's `--proxy`), so a
chain of proxies behaves as damocles' does.

It answers from its own sector-location service when it was given one (`coordinator --proxy`: a
damocles source node, or another coordinator), whose store names it passes on as they came (its
own `--store`s need not hold them, as a damocles proxy node needs none); a sector the service
does not know, or cannot answer for (its source down), from the locations it has learned: the
store names of each sector in the job inputs it has seen (the jobs in the store when it starts,
and each job it allocates). The source comes first: a sector moved since its job was made is
answered where it is now. The answer is damocles' exactly:
`{"Found": true, "Instance": {"SealedFile": NAME, "CacheDir": NAME}}`, `{"Found": false,
"Instance": {"SealedFile": "", "CacheDir": ""}}`, and for an index type other than "normal" and
"upgrade" the method's error `sector indexer of type X is not supported`. A location the service
gives without store names (a plugin's provider that gives paths only) cannot be answered in
damocles' form: not found here. When the service could not answer (its source down, nothing
known from before) the call is the method's error with the reason, as a damocles proxy node
passes its source's error on. Nothing here changes an index: there is no update method.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..jobs.model import WdPoStInput
from ..jobs.rpc import METHOD_ERROR, RpcError, SectorId

if TYPE_CHECKING:
    from ..sectors.locator import SectorLocator

log = logging.getLogger("damocles_ext.coordinator")

#: The time a lookup through the coordinator's own service may take (a worker's call waits).
LOOKUP_BUDGET = 10.0
#: Sectors remembered from job inputs at most (the oldest learned go first past it).
MAX_LEARNED = 2_000_000
NOT_FOUND: dict[str, Any] = {"Found": False, "Instance": {"SealedFile": "", "CacheDir": ""}}


#: Distinct store-name pairs and miners kept shared at most (a bound for odd inputs only).
MAX_SHARED = 4096


class SectorIndex:
    def __init__(self, locator: SectorLocator | None = None) -> None:
        self.locator = locator
        #: (index type, miner, number) -> (sealed store, cache store), learned from job inputs.
        self.learned: dict[tuple[str, int, int], tuple[str, str]] = {}
        # One copy of each pair of store names and of each miner id, shared by their sectors:
        # a deadline's thousands of sectors sit on a few stores of one miner, and each decoded
        # input brings copies of its own (MAX_LEARNED sectors took 650 MiB, half of it copies).
        self._miners: dict[int, int] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        self.answered = {"learned": 0, "service": 0, "not_found": 0, "errors": 0}

    def learn(self, inputs: Iterable[WdPoStInput]) -> None:
        """The store names of each sector of these job inputs, given oldest first (a later input
        wins, and is kept longest past MAX_LEARNED)."""
        learned, miners, pairs = self.learned, self._miners, self._pairs
        for job_input in inputs:
            if len(pairs) + len(miners) > MAX_SHARED:  # stores by the thousand: copies again
                pairs.clear()
                miners.clear()
            miner = miners.setdefault(job_input.MinerId, job_input.MinerId)
            for sector in job_input.Sectors or ():
                key = ("upgrade" if sector.Upgrade else "normal", miner, sector.SectorId)
                names = (sector.Accesses.SealedFile, sector.Accesses.CacheDir)
                learned.pop(key, None)  # re-inserted last: the newest is kept longest
                learned[key] = pairs.setdefault(names, names)
        if (excess := len(learned) - MAX_LEARNED) > 0:
            # The oldest learned, in one pass: one `del learned[next(iter(learned))]` at a time
            # walked past every slot deleted before it, E**2 / 2 steps for E (2.5M sectors
            # learned at a start took 131 s, and each allocation after it 1-2 s, the loop held).
            for key in list(itertools.islice(learned, excess)):
                del learned[key]

    async def find(self, index_type: str, sid: SectorId) -> dict[str, Any]:
        """damocles' answer for the sector (RpcError for an index type it does not have)."""
        if index_type not in ("normal", "upgrade"):
            raise RpcError(METHOD_ERROR, f"sector indexer of type {index_type} is not supported")
        names = self.learned.get((index_type, sid.Miner, sid.Number))
        if self.locator is not None:
            from ..sectors import SectorRef

            try:
                ref = SectorRef(sid.Miner, sid.Number, index_type == "upgrade")
            except ValueError as exc:
                raise RpcError(METHOD_ERROR, str(exc)) from None
            [answer] = await self.locator.locate([ref], time_left=4 * LOOKUP_BUDGET)
            location = answer.location
            # Missing (its files gone here) is still where the index says it is: the names. Not
            # a sector its scan found in part just now (not cached): no index says it is there.
            said = answer.found or answer.cached
            if location is not None and location.sealed_store is not None and said:
                self.answered["service"] += 1
                return _found(location.sealed_store, location.cache_store or location.sealed_store)
            if answer.status == "error" and names is None:
                self.answered["errors"] += 1
                raise RpcError(METHOD_ERROR, f"finding {ref}: {answer.detail}")
        if names is not None:
            self.answered["learned"] += 1
            return _found(*names)
        self.answered["not_found"] += 1
        return NOT_FOUND

    def status(self) -> dict[str, Any]:
        """The coordinator's status section of its sector index."""
        section: dict[str, Any] = {"learned": len(self.learned), "answered": dict(self.answered)}
        if self.locator is not None:
            section["locator"] = self.locator.status()
        return section


def _found(sealed: str, cache: str) -> dict[str, Any]:
    return {"Found": True, "Instance": {"SealedFile": sealed, "CacheDir": cache or sealed}}
