"""The allocating clients of bench_jobs: each allocates jobs one at a time until none is left and
returns the ids it got, so the caller can check that every job was allocated exactly once.

Three kinds, run with the same number of concurrent clients on the same database engine:

- `floor_*`: the simplest allocation there is, raw SQL on a one-table schema of its own (the
  floor: no rules, no lease, no record decoded). PostgreSQL: one autocommit `UPDATE … WHERE id =
  (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id` with psycopg. SQLite: the same UPDATE
  under `BEGIN IMMEDIATE` with the sqlite3 module, with the pragmas our store sets (WAL,
  synchronous NORMAL, the busy timeout).
- `store_client`: `JobStore.allocate(spec, 1, worker)` on a JobStore of its own (one connection:
  a client is a process of its own in a real deployment).
- `BlockingRpc`: a kept-alive HTTP/1.1 connection to a `damocles-ext coordinator`, calling
  `Venus.WdPoStAllocateJobs(spec, 1, worker)` then `Venus.WdPoStFinishJob` for the job, as a
  damocles-worker's wdpost planner does (without its heartbeats: a job here is finished at once).
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

from damocles_ext.jobs import rules
from damocles_ext.jobs.database import DEFAULT_BUSY_TIMEOUT
from damocles_ext.jobs.model import SectorAccessStores, WdPoStInput, WdPoStSectorInfo
from damocles_ext.jobs.store import JobStore

MINER = 1000
PROOF_TYPE = "StackedDrgWindow2KiBV1_2"
SPEC = rules.AllocationSpec((MINER,), (PROOF_TYPE,))
# SPEC as a damocles-worker sends it (plain JSON, not through our RPC's structs).
SPEC_JSON = {"AllowedMiners": list(SPEC.allowed_miners),
             "AllowedProofTypes": list(SPEC.allowed_proof_types)}  # fmt: skip
# damocles' WdPoStFinishJob output: one 192-byte proof in base64 (as Go writes []byte), no faults.
OUTPUT = {"proofs": ["A" * 256], "faults": []}


class BenchFailure(Exception):
    """A run whose figures must not be reported: a job allocated twice or never, a client error."""


def job_inputs(count: int, run: int) -> list[WdPoStInput]:
    """`count` distinct job inputs of one sector each (distinct ids: the run and the job number
    are in the seed)."""
    inputs = []
    for n in range(count):
        seed = tuple((run * 7 + n * 13 + i) % 256 for i in range(28)) + tuple(n.to_bytes(4, "big"))
        sector = WdPoStSectorInfo(
            SectorId=n,
            CommR=tuple((n + i) % 256 for i in range(32)),
            Upgrade=False,
            Accesses=SectorAccessStores(SealedFile="store-a", CacheDir="store-a"),
        )
        inputs.append(
            WdPoStInput(Sectors=(sector,), MinerId=MINER, ProofType=PROOF_TYPE, Seed=seed)
        )
    return inputs


def check_exactly_once(taken: Sequence[Sequence[str]], expected: set[str], what: str) -> None:
    """Raise BenchFailure unless the clients' ids are `expected`, each taken by one client once."""
    seen: dict[str, int] = {}
    for ids in taken:
        for job_id in ids:
            seen[job_id] = seen.get(job_id, 0) + 1
    twice = sorted(j for j, n in seen.items() if n > 1)
    missing = sorted(expected - seen.keys())
    unknown = sorted(seen.keys() - expected)
    if twice or missing or unknown:
        raise BenchFailure(
            f"{what}: {len(expected)} jobs, but {len(twice)} allocated more than once "
            f"{twice[:3]}, {len(missing)} never {missing[:3]}, {len(unknown)} unknown "
            f"{unknown[:3]}"
        )


Client = Callable[[], Callable[[], list[str]]]
"""A client: calling it connects (not timed); the callable it returns allocates until none."""


def run_clients(clients: Sequence[Client], what: str) -> tuple[float, list[list[str]]]:
    """Connect each client in its own thread, release them all at once, and time them until the
    last one finds nothing left; (seconds, ids per client)."""
    barrier = threading.Barrier(len(clients) + 1)
    results: list[list[str]] = [[] for _ in clients]
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            allocate_all = clients[index]()
            barrier.wait(timeout=120)
            results[index] = allocate_all()
        except threading.BrokenBarrierError:
            pass  # another client failed to connect; its error is the one reported
        except BaseException as exc:  # noqa: BLE001 - reported below as the run's failure
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise BenchFailure(f"{what}: a client failed: {errors[0]!r}") from errors[0]
    return elapsed, results


# --- the floor -------------------------------------------------------------------------------

FLOOR_SCHEMA = (
    (
        "CREATE TABLE floor_jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, worker TEXT,"
        " created_at BIGINT NOT NULL)"
    ),
    "CREATE INDEX floor_jobs_state ON floor_jobs (state, created_at)",
)
FLOOR_ALLOCATE = (
    "UPDATE floor_jobs SET state = 'running', worker = {p} WHERE id = (SELECT id FROM floor_jobs"
    " WHERE state = 'ready' ORDER BY created_at LIMIT 1{lock}) RETURNING id"
)


def floor_fill_postgresql(url: str, ids: Sequence[str]) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for statement in FLOOR_SCHEMA:
            conn.execute(statement)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO floor_jobs VALUES (%s, 'ready', NULL, %s)",
                [(job_id, n) for n, job_id in enumerate(ids)],
            )


def floor_postgresql(url: str, worker: str) -> Client:
    """A client: connect now (not timed), then the returned callable allocates until none."""
    import psycopg

    statement = FLOOR_ALLOCATE.format(p="%s", lock=" FOR UPDATE SKIP LOCKED")

    def connect() -> Callable[[], list[str]]:
        conn = psycopg.connect(url, autocommit=True)

        def allocate_all() -> list[str]:
            got = []
            try:
                while True:
                    row = conn.execute(statement, (worker,)).fetchone()
                    if row is None:
                        return got
                    got.append(row[0])
            finally:
                conn.close()

        return allocate_all

    return connect


def _sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=DEFAULT_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)  # fmt: skip
    conn.execute(f"PRAGMA busy_timeout = {int(DEFAULT_BUSY_TIMEOUT * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def floor_fill_sqlite(path: str, ids: Sequence[str]) -> None:
    conn = _sqlite_connect(path)
    try:
        for statement in FLOOR_SCHEMA:
            conn.execute(statement)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO floor_jobs VALUES (?, 'ready', NULL, ?)",
            [(job_id, n) for n, job_id in enumerate(ids)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def floor_sqlite(path: str, worker: str) -> Client:
    statement = FLOOR_ALLOCATE.format(p="?", lock="")

    def connect() -> Callable[[], list[str]]:
        conn = _sqlite_connect(path)

        def allocate_all() -> list[str]:
            got = []
            try:
                while True:
                    conn.execute("BEGIN IMMEDIATE")
                    row = conn.execute(statement, (worker,)).fetchone()
                    conn.execute("COMMIT")
                    if row is None:
                        return got
                    got.append(row[0])
            finally:
                conn.close()

        return allocate_all

    return connect


# --- our store --------------------------------------------------------------------------------


def store_client(url: str, worker: str) -> Client:
    def connect() -> Callable[[], list[str]]:
        store = JobStore(url, pool_size=1)
        store.schema_version()  # opens its connection before the clock starts

        def allocate_all() -> list[str]:
            got = []
            try:
                while True:
                    jobs = store.allocate(SPEC, 1, worker, time.time())
                    if not jobs:
                        return got
                    got += [job.Id for job in jobs]
            finally:
                store.close()

        return allocate_all

    return connect


# --- over the coordinator's RPC ---------------------------------------------------------------


class BlockingRpc:
    """One kept-alive HTTP/1.1 connection to a coordinator, calling as go-jsonrpc does; made with
    a `Venus.WorkerPing`, so that the connection is open before the clock starts."""

    def __init__(self, port: int, worker: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.worker = worker
        self.next_id = 1
        self.call("Venus.WorkerPing", {"Name": worker})

    def call(self, method: str, *params: object) -> object:
        body = json.dumps(
            {"jsonrpc": "2.0", "method": method, "params": list(params), "id": self.next_id}
        )
        self.next_id += 1
        self.conn.request("POST", "/rpc/v0", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200 or "error" in answer:
            raise BenchFailure(f"{method} by {self.worker}: HTTP {response.status}: {answer}")
        return answer["result"]

    def allocate_all(self) -> list[str]:
        """Allocate one job, finish it, again, until none is left; the ids allocated."""
        got = []
        try:
            while True:
                jobs = self.call("Venus.WdPoStAllocateJobs", SPEC_JSON, 1, self.worker)
                assert isinstance(jobs, list)
                if not jobs:
                    return got
                for job in jobs:
                    got.append(job["Id"])
                    self.call("Venus.WdPoStFinishJob", job["Id"], OUTPUT, "")
        finally:
            self.conn.close()


def rpc_client(port: int, worker: str) -> Client:
    return lambda: BlockingRpc(port, worker).allocate_all


def rpc_idle_client(port: int, worker: str, calls: int) -> Client:
    """A worker with nothing to do: `calls` allocations, each of which must find no job."""

    def connect() -> Callable[[], list[str]]:
        client = BlockingRpc(port, worker)

        def poll() -> list[str]:
            try:
                for _ in range(calls):
                    if client.call("Venus.WdPoStAllocateJobs", SPEC_JSON, 1, worker) != []:
                        raise BenchFailure(f"{worker}: an idle allocation found a job")
            finally:
                client.conn.close()
            return []

        return poll

    return connect
