"""The whole worker-prover chain: how soon a dead worker's job runs elsewhere, and how many
requests per second go through it, on SQLite and on PostgreSQL.

Run: .venv/bin/python -m bench.bench_job_chain [--part failover,throughput] [--repeat 3] [--save]

Every process is real: `damocles-ext serve window_post --jobs URL` (the producer, driven as
damocles-manager drives its ext-prover: one JSON line per request on its stdin), a
`damocles-ext coordinator` on the same store, and `damocles-ext worker`s with real children.

failover: one request, so one job, taken by worker 1, whose child works on it for an hour. Then
worker 2 starts (idle: it asks again every --worker-poll seconds), worker 1 is killed (SIGKILL,
at a random point of its heartbeat interval), and the benchmark measures from the kill to
worker 2 pulling the job (its log) and to the job reaching worker 2's child (the child writes
down when a request reaches it), then that the request is answered once, from worker 2's proof.
The coordinator and the producer read damocles-manager's sector-manager.cfg with
`HeartbeatTimeout = --heartbeat-timeout` (damocles' default is 15 s); the workers heartbeat every
--heartbeat-interval seconds. The floor is the configured timeout itself: a job cannot move
before its worker has been silent that long. The rest is the coordinator's sweep (it looks for
silent jobs every 10 s as damocles-manager does, or every quarter of HeartbeatTimeout if that is
shorter: rules.sweep_every), the phase of the last heartbeat (whole seconds in the store, so a job
may move up to a heartbeat interval and a second before the timeout), and worker 2's idle poll.

throughput: --requests requests, at most --concurrent in flight (damocles-manager's
`Concurrent` for the entry), through serve --jobs, a coordinator and 1 or 3 workers (--workers)
with one `echo` child each (its answer takes no work), in answered requests per second; each
request must be answered exactly once with its echo output, and the workers' logs must show
each job pulled and delivered once (a run that fails either check fails the benchmark, exit 1).
The baseline, in the same run: `serve window_post -c` with as many local `echo` children.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.job_procs import (
    DEXT,
    STORE,
    BenchFailure,
    Processor,
    WorkerProcess,
    check_answer,
    make_task,
    marking_child,
    marks,
    parse_engines,
    producer_chain,
    spread,
    store_urls,
)
from bench.runner import bench_parser, finish, print_table
from damocles_ext.jobs.rules import JobLimits, sweep_every

PARTS = ("failover", "throughput")
LONG_PROOF = 3600.0  # seconds worker 1's child works on its job: it never finishes


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Look at `condition` every 10 ms until it holds; BenchFailure after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise BenchFailure(f"{what}: not seen within {timeout:g} s")
        time.sleep(0.01)


def manager_conf(tmp: Path, heartbeat_timeout: float) -> Path:
    """A directory with damocles-manager's sector-manager.cfg setting HeartbeatTimeout."""
    conf = tmp / "manager"
    conf.mkdir(exist_ok=True)
    (conf / "sector-manager.cfg").write_text(
        f'[Common.Proving.WorkerProver]\nHeartbeatTimeout = "{heartbeat_timeout:g}s"\n'
    )
    return conf


def sweeps_every(args) -> float:
    """The coordinator's sweep interval with the HeartbeatTimeout used."""
    return sweep_every(JobLimits(heartbeat_timeout=args.heartbeat_timeout))


def failover_once(url: str, tmp: Path, run: int, args) -> dict[str, float]:
    """One death: seconds from the kill to worker 2 pulling the job, and to its child."""
    store = tmp / STORE
    conf = manager_conf(tmp, args.heartbeat_timeout)
    beat = ("--heartbeat-interval", f"{args.heartbeat_interval:g}s")
    marker1, marker2 = tmp / f"w1-{run}.marks", tmp / f"w2-{run}.marks"
    wait = args.heartbeat_timeout + sweeps_every(args) + args.worker_poll + 60
    chain = producer_chain(url, tmp, args.producer_poll, f"failover-{run}",
                           options=("--conf-dir", str(conf)))  # fmt: skip
    with chain as (processor, port):
        workers: list[WorkerProcess] = []
        try:
            first = WorkerProcess(tmp, port, store, args.worker_poll, name=f"w1-{run}",
                                  config=marking_child(marker1, LONG_PROOF), options=beat)  # fmt: skip
            workers.append(first)
            task = make_task(store, run)
            request = processor.send(task)
            wait_until(lambda: bool(marks(marker1)), 60, "the job reaching worker 1's child")
            second = WorkerProcess(tmp, port, store, args.worker_poll, name=f"w2-{run}",
                                   config=marking_child(marker2, 0), options=beat)  # fmt: skip
            workers.append(second)
            # Pacing, not synchronisation: the kill falls anywhere in a heartbeat interval.
            time.sleep(random.uniform(0, args.heartbeat_interval))
            killed = first.kill()
            if len(first.times("pulled")) != 1:
                raise BenchFailure(
                    f"worker 1 pulled the job {len(first.times('pulled'))} times before it was"
                    " killed: its heartbeats did not keep it (heartbeat times are whole seconds:"
                    " --heartbeat-timeout must exceed --heartbeat-interval by more than 1 s)"
                )
            if not second.wait_for(lambda: bool(second.times("pulled")), wait):
                raise BenchFailure(f"worker 2 pulled nothing within {wait:g} s of the kill")
            pulled = second.times("pulled")[0]
            wait_until(lambda: bool(marks(marker2)), 60, "the job reaching worker 2's child")
            started = marks(marker2)[0][0]
            check_answer(processor.receive(), request, task)
        finally:
            for when_pid in marks(marker1):  # worker 1's child outlives its killed worker
                kill_pid(when_pid[1])
            for worker in workers:
                worker.close()
            left = processor.close()
        if left:
            raise BenchFailure(f"failover run {run}: serve wrote more than one answer: {left}")
        if len(marks(marker1)) != 1 or len(marks(marker2)) != 1:
            raise BenchFailure(f"failover run {run}: the job reached the children "
                               f"{len(marks(marker1))} and {len(marks(marker2))} times")  # fmt: skip
    return {"to_realloc": pulled - killed, "to_child": started - killed}


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def drive(processor: Processor, tasks: list, concurrent: int) -> float:
    """Send `tasks` with at most `concurrent` in flight, as damocles-manager does; check that each
    is answered exactly once with its own output; seconds from the first send to the last answer."""
    waiting: dict[int, object] = {}
    answered: collections.Counter[int] = collections.Counter()
    pending = list(reversed(tasks))
    start = time.perf_counter()
    while pending or waiting:
        while pending and len(waiting) < concurrent:
            task = pending.pop()
            waiting[processor.send(task)] = task
        response = processor.receive()
        answered[response.id] += 1
        if response.id not in waiting:
            raise BenchFailure(f"request {response.id} answered again (or never asked): {response}")
        check_answer(response, response.id, waiting.pop(response.id))
    return time.perf_counter() - start


def throughput_local(tmp: Path, workers: int, args) -> float:
    """Requests per second through `serve -c` with `workers` local echo children."""
    config = tmp / f"local-{workers}.cfg"
    config.write_text('[[WdPost]]\nPlugin = "echo"\n' * workers)
    store = tmp / STORE
    processor = Processor([*DEXT, "serve", "window_post", "-c", str(config)], tmp / "local.log")
    try:
        processor.prove(make_task(store, 0))  # the children's start is not throughput
        tasks = [make_task(store, n) for n in range(1, args.requests + 1)]
        elapsed = drive(processor, tasks, args.concurrent)
    finally:
        left = processor.close()
    if left:
        raise BenchFailure(f"local serve wrote answers nobody asked for: {left[:3]}")
    return args.requests / elapsed


def throughput_jobs(url: str, tmp: Path, workers: int, run: int, args, *,
                    listen: bool = False) -> float:  # fmt: skip
    """Requests per second through serve --jobs, a coordinator (with `listen`, serve's own) and
    `workers` workers."""
    store = tmp / STORE
    started: list[WorkerProcess] = []
    with producer_chain(url, tmp, args.producer_poll, f"chain-{run}", listen=listen) as (
        processor,
        port,
    ):
        try:
            for n in range(workers):
                started.append(WorkerProcess(tmp, port, store, args.worker_poll,
                                             name=f"chain-{run}-{n}"))  # fmt: skip
            base = run * 100_000
            processor.prove(make_task(store, base))  # warm: connections, first imports
            tasks = [make_task(store, base + n) for n in range(1, args.requests + 1)]
            elapsed = drive(processor, tasks, args.concurrent)
        finally:
            for worker in started:
                worker.close()
            left = processor.close()
    if left:
        raise BenchFailure(f"serve --jobs wrote answers nobody asked for: {left[:3]}")
    for what in ("pulled", "delivered"):
        once_each([j for w in started for x, j, _ in w.events if x == what], args.requests + 1,
                  f"run {run}: jobs {what}")  # fmt: skip
    return args.requests / elapsed


def once_each(job_ids: list[str], expected: int, what: str) -> None:
    """`expected` jobs, each seen once in `job_ids` (a worker's log lines); BenchFailure if not."""
    seen = collections.Counter(job_ids)
    twice = sorted(j for j, count in seen.items() if count > 1)
    if len(seen) != expected or twice:
        raise BenchFailure(f"{what}: {len(seen)} of {expected}, more than once: {twice[:3]}")


def measure_failover(urls: dict, tmp: Path, args, results: dict) -> None:
    figures = results["failover"] = {
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "heartbeat_interval_s": args.heartbeat_interval,
        "sweep_interval_s": sweeps_every(args),
        "worker_poll_s": args.worker_poll,
        "engines": {},
    }
    run = 0
    for engine, new_url in urls.items():
        if isinstance(new_url, str):
            figures["engines"][engine] = new_url
            continue
        runs: dict[str, list[float]] = {"to_realloc": [], "to_child": []}
        for _ in range(args.repeat):
            run += 1
            got = failover_once(new_url(), tmp, run, args)
            for key, value in got.items():
                runs[key].append(value)
            print(f"  failover, {engine}: kill -> re-allocated {got['to_realloc']:.2f} s,"
                  f" -> on worker 2's child {got['to_child']:.2f} s")  # fmt: skip
        figures["engines"][engine] = {k: {**spread(v), "runs": v} for k, v in runs.items()}


def measure_throughput(urls: dict, tmp: Path, args, results: dict) -> None:
    figures = results["throughput"] = {
        "requests": args.requests,
        "concurrent": args.concurrent,
        "producer_poll_s": args.producer_poll,
        "worker_poll_s": args.worker_poll,
        "by_workers": {},
    }
    run = 0
    for workers in args.workers:
        rates: dict[str, list[float]] = {"local": []}
        for _ in range(args.repeat):
            rates["local"].append(throughput_local(tmp, workers, args))
            for engine, new_url in urls.items():
                if isinstance(new_url, str):
                    continue
                # SQLite also as on one machine: the coordinator inside serve (--listen).
                for listen in (False, True) if engine == "SQLite" else (False,):
                    run += 1
                    path = f"{engine}, serve --listen" if listen else engine
                    rates.setdefault(path, []).append(
                        throughput_jobs(new_url(), tmp, workers, run, args, listen=listen)
                    )
            print(f"  throughput, {workers} workers: "
                  + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in rates.items())
                  + " requests/s, each answered exactly once")  # fmt: skip
        figures["by_workers"][str(workers)] = {
            k: {**spread(v), "runs": v} for k, v in rates.items()
        }
    figures["skipped"] = {e: why for e, why in urls.items() if isinstance(why, str)}


def report(results: dict) -> None:
    if "failover" in results:
        f = results["failover"]
        timeout = f["heartbeat_timeout_s"]
        print(f"\nA worker's death: HeartbeatTimeout {timeout:g} s, heartbeats every"
              f" {f['heartbeat_interval_s']:g} s, sweeps every {f['sweep_interval_s']:g} s,"
              f" idle workers ask every {f['worker_poll_s']:g} s (seconds from SIGKILL)")  # fmt: skip
        rows = []
        for engine, figures in f["engines"].items():
            if isinstance(figures, str):
                continue
            for key, label in (("to_realloc", "re-allocated to worker 2"),
                               ("to_child", "running on worker 2's child")):  # fmt: skip
                s = figures[key]
                rows.append([engine, label, *(f"{s[k]:.2f}" for k in ("min", "median", "max")),
                             f"timeout {s['median'] - timeout:+.2f} s"])  # fmt: skip
        print_table(rows, ["engine", "kill ->", "min", "median", "max", "median as"])
        for engine, why in f["engines"].items():
            if isinstance(why, str):
                print(f"{engine}: {why}")
    if "throughput" in results:
        t = results["throughput"]
        print(f"\nThroughput: {t['requests']} requests, {t['concurrent']} in flight; producer"
              f" polls every {t['producer_poll_s']:g} s (SQLite), idle workers every"
              f" {t['worker_poll_s']:g} s; requests/s min / median / max")  # fmt: skip
        rows = []
        for workers, by_path in t["by_workers"].items():
            local = by_path["local"]["median"]
            for path, s in by_path.items():
                name = f"serve -c, {workers} echo children" if path == "local" else (
                    f"serve --jobs, {path}, {workers} workers")  # fmt: skip
                rows.append([name, f"{s['min']:,.1f} / {s['median']:,.1f} / {s['max']:,.1f}",
                             f"{s['median'] / local:.3f}"])  # fmt: skip
        print_table(rows, ["path", "requests/s", "/ local (medians)"])
        for engine, why in t.get("skipped", {}).items():
            print(f"{engine}: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "job_chain")
    add = parser.add_argument
    add("--part", default=",".join(PARTS), help="which of failover,throughput (default both)")
    add("--engines", default="sqlite,postgresql", help="sqlite,postgresql (default both)")
    add("--repeat", type=int, default=3, help="runs per figure (default 3)")
    add("--heartbeat-timeout", type=float, default=5.0,
        help="failover: HeartbeatTimeout, seconds (default 5; damocles' default is 15)")  # fmt: skip
    add("--heartbeat-interval", type=float, default=1.0,
        help="failover: the workers' --heartbeat-interval, seconds (default 1)")  # fmt: skip
    add("--requests", type=int, default=200, help="throughput: requests per run (default 200)")
    add("--concurrent", type=int, default=32,
        help="throughput: requests in flight, damocles-manager's Concurrent (default 32)")  # fmt: skip
    add("--workers", default="1,3", help="throughput: numbers of workers (default 1,3)")
    add("--worker-poll", type=float, default=1.0,
        help="the workers' --idle-poll, seconds (default 1; damocles advises 15)")  # fmt: skip
    add("--producer-poll", type=float, default=3.0,
        help="serve --jobs --poll-interval, seconds (default 3, damocles')")  # fmt: skip
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--part: choose from {', '.join(PARTS)}, got {args.part!r}")
    engines = parse_engines(parser, args.engines)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: numbers separated by commas, got {args.workers!r}")
    numbers = (args.repeat, args.requests, args.concurrent, min(args.workers))
    seconds = (args.heartbeat_timeout, args.heartbeat_interval, args.worker_poll,
               args.producer_poll)  # fmt: skip
    if min(numbers) < 1 or min(seconds) <= 0:
        parser.error("--repeat, --requests, --concurrent, --workers must be at least 1, and the"
                     " intervals and the timeout longer than 0")  # fmt: skip
    results: dict = {"load_before": os.getloadavg()[0]}
    try:
        with tempfile.TemporaryDirectory(prefix="dext-bench-chain-") as name:
            tmp = Path(name)
            with store_urls(engines, tmp) as urls:
                if "failover" in parts:
                    measure_failover(urls, tmp, args, results)
                if "throughput" in parts:
                    measure_throughput(urls, tmp, args, results)
    except BenchFailure as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    results["load_after"] = os.getloadavg()[0]
    report(results)
    finish("job_chain", results, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
