"""A damocles-manager source node as a proxy node sees it: `Venus.SectorIndexerFind` served by
the go-jsonrpc look-alike (gojsonrpc.py), answering as damocles' `Sealer.SectorIndexerFind` over
its KV indexer does (damocles-manager/modules/sealer/sealer_cli.go, modules/impl/sectors/
indexer.go):

- params `(indexType, {"Miner": m, "Number": n})`, `indexType` "normal" or "upgrade";
- found: `{"Found": true, "Instance": {"SealedFile": NAME, "CacheDir": NAME}}`, the cache
  directory's store defaulting to the sealed file's when none was recorded;
- not found: `{"Found": false, "Instance": {"SealedFile": "", "CacheDir": ""}}`;
- another index type: the method's error `sector indexer of type X is not supported` (HTTP 200,
  code 1, as go-jsonrpc answers an error a method returns);
- params that do not decode as damocles' types: go-jsonrpc's -32602 (HTTP 500).

`put(...)` and `remove(...)` change the index as sealing or moving a sector would;
`stop()`/`start()`/`hold()`/`release()` and `calls` come from GoJsonRpcServer.
"""

from __future__ import annotations

import threading
from typing import Any

from .gojsonrpc import GoJsonRpcServer, MethodError

METHOD = "Venus.SectorIndexerFind"


class DamoclesSource(GoJsonRpcServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__({METHOD: self._find}, **kwargs)
        self._index_lock = threading.Lock()
        self.index: dict[str, dict[tuple[int, int], tuple[str, str]]] = {
            "normal": {},
            "upgrade": {},
        }

    def put(
        self, miner: int, number: int, sealed: str, cache: str = "", *, upgrade: bool = False
    ) -> None:
        """Record where a sector is (store names), as damocles' indexer Update does."""
        with self._index_lock:
            self.index["upgrade" if upgrade else "normal"][miner, number] = (sealed, cache)

    def remove(self, miner: int, number: int, *, upgrade: bool = False) -> None:
        with self._index_lock:
            self.index["upgrade" if upgrade else "normal"].pop((miner, number), None)

    def finds(self) -> int:
        """How many SectorIndexerFind calls were made."""
        return self.methods_called().count(METHOD)

    def _find(self, index_type: Any, sid: Any) -> dict[str, Any]:
        if not isinstance(index_type, str):
            raise TypeError(f"unmarshaling params: indexType is {type(index_type).__name__}")
        # Go's encoding/json: unknown fields ignored, a missing one is 0, a wrong type an error.
        if not isinstance(sid, dict) or not all(
            isinstance(sid.get(k, 0), int) and not isinstance(sid.get(k, 0), bool)
            for k in ("Miner", "Number")
        ):
            raise TypeError(f"unmarshaling params: {sid!r} is not an abi.SectorID")
        with self._index_lock:
            index = self.index.get(index_type)
            if index is None:
                raise MethodError(f"sector indexer of type {index_type} is not supported")
            found = index.get((sid.get("Miner", 0), sid.get("Number", 0)))
        if found is None:
            return {"Found": False, "Instance": {"SealedFile": "", "CacheDir": ""}}
        sealed, cache = found
        return {"Found": True, "Instance": {"SealedFile": sealed, "CacheDir": cache or sealed}}
