"""WindowPoSt job allocation: jobs per second with 1, 8 and 32 concurrent clients, on SQLite and on
PostgreSQL, against the floor of the simplest raw-SQL allocation measured in the same run.

Run: .venv/bin/python -m bench.bench_jobs [--jobs 1000] [--repeat 3] [--save]

For each engine, each number of clients and each repeat, on a fresh database holding --jobs
ready jobs (one sector each), the clients allocate one job at a time until none is left:

* floor: raw SQL on a one-table schema of its own, no code of ours. PostgreSQL: psycopg,
  autocommit `UPDATE … WHERE id = (SELECT … ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING id`; SQLite: the sqlite3 module, the same UPDATE under `BEGIN IMMEDIATE`, with our
  store's pragmas (WAL, synchronous NORMAL);
* store: `JobStore.allocate(spec, 1, worker)`, each client a JobStore with its own connection;
* RPC: a real `damocles-ext coordinator` process on the same database, each client a kept-alive
  HTTP connection calling `Venus.WdPoStAllocateJobs(spec, 1, worker)` then
  `Venus.WdPoStFinishJob` for the job it got (two requests per job, as a damocles-worker makes
  without its heartbeats). Then, on the same coordinator, what idle workers cost: the clients
  share 1,000 `Venus.WdPoStAllocateJobs` calls that find nothing (a damocles-worker with no job
  asks again every `recover_interval`), in calls per second.

Each client is a thread of this process (the database server and the coordinator are processes
of their own). The three methods run interleaved, for every repeat. Every run checks that each
job was allocated exactly once (no job twice, none missing, and the database says so): a wrong
count fails the benchmark (exit 1) and no figure is printed for it.

PostgreSQL is a throw-away server this benchmark starts (tests/helpers/postgres.py: initdb in a
temporary directory, unix socket, fsync and synchronous_commit off, as the tests run it): the
figures measure locking and round trips, not a disk. Without initdb it is skipped, saying so.

The peer, damocles-manager's own worker-prover (jobs in its embedded KV store), is a Go program
that is not installed and cannot be built here: there is no peer figure.

Goal: an allocation rate far beyond what a deadline needs (see docs/BENCHMARKS.md): over the RPC
with 32 clients, at least 100 jobs/s on each engine, in every run (not only as a median).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.job_procs import RPC_AT
from bench.jobs_clients import (
    BenchFailure,
    Client,
    check_exactly_once,
    floor_fill_postgresql,
    floor_fill_sqlite,
    floor_postgresql,
    floor_sqlite,
    job_inputs,
    rpc_client,
    rpc_idle_client,
    run_clients,
    store_client,
)
from bench.runner import bench_parser, finish, print_table, spread
from damocles_ext.jobs import rules
from damocles_ext.jobs.model import FINISHED, RUNNING, job_id
from damocles_ext.jobs.store import JobStore

DEXT = [sys.executable, "-m", "damocles_ext"]
METHODS = ("floor", "store", "rpc")
GOAL_RPC_32 = 100.0  # jobs/s over the RPC with 32 clients
IDLE_CALLS = 1000  # allocations that find nothing, per RPC run (shared by its clients)


class Engine:
    """Fresh databases on one engine: `new()` gives (store URL, what the floor connects to)."""

    name = ""

    def new(self) -> tuple[str, str]:
        raise NotImplementedError

    def fill_floor(self, target: str, ids: list[str]) -> None:
        raise NotImplementedError

    def floor(self, target: str, worker: str) -> Client:
        raise NotImplementedError


class SqliteEngine(Engine):
    name = "SQLite"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def new(self) -> tuple[str, str]:
        self.count += 1
        path = self.directory / f"run{self.count}.db"
        return f"sqlite:///{path}", str(path)

    def fill_floor(self, target: str, ids: list[str]) -> None:
        floor_fill_sqlite(target, ids)

    def floor(self, target: str, worker: str) -> Client:
        return floor_sqlite(target, worker)


class PostgresEngine(Engine):
    name = "PostgreSQL"

    def __init__(self, server) -> None:
        self.server = server

    def new(self) -> tuple[str, str]:
        url = self.server.create_database()
        return url, url  # libpq reads the same URL

    def fill_floor(self, target: str, ids: list[str]) -> None:
        floor_fill_postgresql(target, ids)

    def floor(self, target: str, worker: str) -> Client:
        return floor_postgresql(target, worker)


@contextlib.contextmanager
def postgres_engine() -> Iterator[PostgresEngine | str]:
    """A started throw-away server, or the reason there is none."""
    # The tests' helper: one copy of how to run a throw-away PostgreSQL server.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers.postgres import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        yield (
            "skipped: no PostgreSQL server programs (initdb, pg_ctl) under "
            "/usr/lib/postgresql/*/bin or on PATH (Debian: apt-get install postgresql)"
        )
        return
    server = PostgresServer(bindir)
    try:
        server.start()
        yield PostgresEngine(server)
    finally:
        server.stop()


@contextlib.contextmanager
def coordinator(url: str, *options: str) -> Iterator[int]:
    """A `damocles-ext coordinator` on the store at `url`; its port. Stopped by SIGTERM."""
    proc = subprocess.Popen(
        [*DEXT, "coordinator", "--jobs", url, "--listen", "127.0.0.1:0", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    port = None
    try:
        for line in proc.stderr:
            seen.append(line)
            found = RPC_AT.search(line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise BenchFailure(f"the coordinator did not start:\n{''.join(seen)}")
        # Keep reading its log, or a full pipe would stop it.
        drain = threading.Thread(target=lambda: seen.extend(proc.stderr or ()), daemon=True)
        drain.start()
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    if code != 0:
        raise BenchFailure(f"the coordinator exited {code}:\n{''.join(seen)[-2000:]}")


def one_run(engine: Engine, method: str, clients: int, jobs: int, run: int) -> dict[str, float]:
    """The rate at which `clients` clients allocate `jobs` jobs by `method`, checked: {method:
    jobs/s}; the RPC's run adds {"idle": calls/s}, the rate of allocations that find nothing."""
    url, target = engine.new()
    inputs = job_inputs(jobs, run)
    what = f"{engine.name}, {method}, {clients} clients, run {run}"
    workers = [f"bench-worker-{n}" for n in range(clients)]
    if method == "floor":  # its own table only: our store is not opened
        ids = [job_id(i) for i in inputs]
        expected = set(ids)
        assert len(expected) == jobs
        engine.fill_floor(target, ids)
        elapsed, taken = run_clients([engine.floor(target, w) for w in workers], what)
        check_exactly_once(taken, expected, what)
        return {method: jobs / elapsed}
    with JobStore.open(url) as store:
        made = store.create_many([rules.Create(i) for i in inputs], time.time())
    expected = {job.Id for job, _ in made}
    assert len(expected) == jobs
    rates = {}
    if method == "store":
        elapsed, taken = run_clients([store_client(url, w) for w in workers], what)
        state = RUNNING
    else:
        with coordinator(url) as port:
            elapsed, taken = run_clients([rpc_client(port, w) for w in workers], what)
            # Then what idle workers cost: allocations that find nothing, on the same server.
            calls = -(-IDLE_CALLS // clients)
            idle, _ = run_clients([rpc_idle_client(port, w, calls) for w in workers], what)
            rates["idle"] = calls * clients / idle
        state = FINISHED
    check_exactly_once(taken, expected, what)
    # And the database agrees: each job in the state the method leaves it, on its client.
    owner = {job: workers[n] for n, got in enumerate(taken) for job in got}
    with JobStore.open(url, create=False) as store:
        wrong = [
            job.Id
            for job in store.list_jobs()
            if job.State != state or job.WorkerName != owner.get(job.Id) or job.TryNum != 1
        ]
    if wrong:
        raise BenchFailure(f"{what}: {len(wrong)} jobs not {state} on their client: {wrong[:3]}")
    return {method: jobs / elapsed, **rates}


def goal_verdict(runs: list[float]) -> str:
    """The goal is met only if every run met it: a median above it hides the runs that missed."""
    missed = [rate for rate in runs if rate < GOAL_RPC_32]
    if missed:
        return (
            f"NOT MET ({len(missed)} of {len(runs)} runs below: "
            + ", ".join(f"{rate:,.1f}" for rate in missed)
            + " jobs/s)"
        )
    return f"met (every run; the slowest {min(runs):,.1f} jobs/s)"


def measure(engine: Engine, clients_list: list[int], jobs: int, repeat: int,
            log: Callable[[str], None]) -> dict:  # fmt: skip
    """{clients: {method: {min, median, max, runs}}} in jobs/s."""
    figures: dict = {}
    run = 0
    for clients in clients_list:
        rates: dict[str, list[float]] = {m: [] for m in (*METHODS, "idle")}
        for _ in range(repeat):
            for method in METHODS:
                run += 1
                for key, rate in one_run(engine, method, clients, jobs, run).items():
                    rates[key].append(rate)
            log(
                f"  {engine.name}, {clients} clients: "
                + ", ".join(f"{m} {rates[m][-1]:,.0f}" for m in METHODS)
                + f" jobs/s, each job allocated exactly once; idle RPC {rates['idle'][-1]:,.0f}"
                " calls/s"
            )
        figures[str(clients)] = {m: {**spread(r), "runs": r} for m, r in rates.items()}
    return figures


def report(results: dict) -> None:
    rows = []
    for engine, by_clients in results["engines"].items():
        if isinstance(by_clients, str):
            continue
        for clients, f in by_clients.items():
            floor, store, rpc = (f[m]["median"] for m in METHODS)
            rows.append([
                engine, clients,
                *(f"{f[m]['min']:,.0f} / {f[m]['median']:,.0f} / {f[m]['max']:,.0f}" for m in METHODS),
                f"{store / floor:.2f}", f"{rpc / floor:.2f}",
                f"{f['idle']['min']:,.0f} / {f['idle']['median']:,.0f} / {f['idle']['max']:,.0f}",
            ])  # fmt: skip
    print()
    print_table(
        rows,
        [
            "engine",
            "clients",
            "floor jobs/s (min / median / max)",
            "store jobs/s",
            "RPC jobs/s",
            "store / floor",
            "RPC / floor",
            "idle RPC calls/s",
        ],
    )
    for engine, by_clients in results["engines"].items():
        if isinstance(by_clients, str):
            print(f"\n{engine}: {by_clients}")
    print(f"\nGoal: RPC with 32 clients >= {GOAL_RPC_32:.0f} jobs/s in every run, on each engine:")
    for engine, verdict in results["goal"].items():
        print(f"  {engine}: {verdict}")
    if not results["goal"]:
        print("  not measured (no run with 32 clients)")
    print(f"\nPeer: {results['peer']}")


PEER = (
    "damocles-manager's own worker-prover (jobs in its embedded KV store) is not runnable "
    "here: a Go program with Filecoin's native dependencies, not installed; no peer figure"
)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "jobs")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per run (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument(
        "--clients", default="1,8,32", help="numbers of concurrent clients (default 1,8,32)"
    )
    parser.add_argument(
        "--engines",
        default="sqlite,postgresql",
        help="which of sqlite,postgresql to measure (default both)",
    )
    args = parser.parse_args(argv)
    try:
        clients_list = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients: expected numbers separated by commas, got {args.clients!r}")
    engines = [e.strip().lower() for e in args.engines.split(",")]
    unknown = set(engines) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from sqlite, postgresql")
    if args.jobs < 1 or args.repeat < 1 or min(clients_list) < 1:
        parser.error("--jobs, --repeat and --clients must be at least 1")

    results: dict = {
        "jobs_per_run": args.jobs,
        "repeat": args.repeat,
        "clients": clients_list,
        "load_before": os.getloadavg()[0],
        "engines": {},
        "goal": {},
        "peer": PEER,
    }
    print(f"{args.jobs} jobs per run, {args.repeat} runs per figure; jobs/s per run:")
    try:
        with tempfile.TemporaryDirectory(prefix="dext-bench-jobs-") as tmp:
            if "sqlite" in engines:
                engine = SqliteEngine(Path(tmp))
                results["engines"][engine.name] = measure(
                    engine, clients_list, args.jobs, args.repeat, print
                )
            if "postgresql" in engines:
                with postgres_engine() as pg:
                    if isinstance(pg, str):
                        results["engines"]["PostgreSQL"] = pg
                    else:
                        results["engines"][pg.name] = measure(
                            pg, clients_list, args.jobs, args.repeat, print
                        )
    except BenchFailure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    results["load_after"] = os.getloadavg()[0]
    for engine, by_clients in results["engines"].items():
        if isinstance(by_clients, dict) and "32" in by_clients:
            results["goal"][engine] = goal_verdict(by_clients["32"]["rpc"]["runs"])
    report(results)
    finish("jobs", results, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
