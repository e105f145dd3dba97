"""Chaos run: `damocles-ext run` with 4 misbehaving children serving many requests.

Run: .venv/bin/python -m bench.chaos --requests 10000 --save  (saves bench/results/chaos.json)
     .venv/bin/python -m bench.chaos --requests 1000    (a quick look: prints, saves nothing)

Several clients (damocles_ext.client, one connection each, several requests in flight on each)
send WindowPoSt requests to `damocles-ext run` over its control socket. Its 4 children are
bench/chaos_child.py (dext/1, Concurrent = 2, a few ms of work per request). Meanwhile, at random
intervals (exponential, mean --interval), a chaos task picks a child and either SIGKILLs it,
SIGSTOPs it and SIGCONTs it up to --stop-max seconds later (a hang; past RequestTimeoutSecs plus
CancelGraceSecs the supervisor kills it), makes it write garbage to its stdout (SIGUSR1) or makes
it spawn a grandchild (SIGUSR2). Each child process also exits during its handshake with
probability --handshake-exit. Each request carries a deadline (--deadline seconds).

Checked, and reported as figures: every request gets exactly one Response frame on its
connection (output or error), the output is the right one, no answer comes later than its
deadline (plus 1 s of slack for the last hop), no process carrying the run's marker is left
after `run` exits on SIGTERM, and the supervisor's RSS (sampled every 0.2 s) does not grow from
the first quarter of the run to the last. Also: failures by cause, re-dispatches and restarts
(from the supervisor's log and status), latency percentiles, peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import trio

from bench.runner import bench_parser, finish

CHILD_SCRIPT = Path(__file__).resolve().parent / "chaos_child.py"
ACTIONS = ("sigkill", "sigstop", "garbage", "grandchild")


@dataclass
class ChaosOptions:
    """The knobs of a chaos run (the CLI's flags)."""

    requests: int = 10_000
    children: int = 4
    clients: int = 4
    in_flight: int = 4  # requests in flight per client connection
    concurrent: int = 2  # Concurrent of each child
    seed: int = 1
    interval: float = 0.1  # mean seconds between chaos actions
    weights: tuple[int, ...] = (3, 2, 2, 2)  # sigkill, sigstop, garbage, grandchild
    stop_max: float = 4.0  # longest SIGSTOP
    # Children younger than this are spared: hitting a Python child while it imports would make
    # most restarts fail, and five failed starts in a row make a child FATAL by design. The
    # children's own exits during the handshake (handshake_exit) still test failed starts.
    min_age: float = 0.5
    handshake_exit: float = 0.1
    escape: float = 0.0  # share of grandchildren that start a new session
    request_timeout: float = 2.0
    cancel_grace: float = 0.5
    max_attempts: int = 3
    deadline: float = 30.0
    work_min: float = 0.002
    work_max: float = 0.02
    queue: int = 2  # requests each child offers to queue beyond its capacity (its Hello)
    restart_delay: float = 0.05
    restart_max_delay: float = 0.5
    shutdown_grace: float = 5.0


@dataclass
class _Result:
    ok: bool
    latency: float
    error: str | None = None


@dataclass
class _State:
    results: dict[tuple[int, int], _Result] = field(default_factory=dict)
    responses: Counter = field(default_factory=Counter)  # (client, id) -> Response frames
    sent: Counter = field(default_factory=Counter)  # client -> requests sent
    actions: Counter = field(default_factory=Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)
    wrong_outputs: int = 0


def _task(i: int):
    from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

    return WindowPoSt(
        miner_id=10_000 + i,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[PoStReplicaInfo(i, bytes([i % 256]) * 32, f"/c/{i}", f"/s/{i}")],
        seed=i.to_bytes(4, "little") * 8,
    )


def write_config(opts: ChaosOptions, directory: Path, marker: str) -> Path:
    """An ext-prover.cfg with `opts.children` chaos children."""
    envs = {
        "CHAOS_SEED": str(opts.seed),
        "CHAOS_MARKER": marker,
        "CHAOS_CAPACITY": str(opts.concurrent),
        "CHAOS_HANDSHAKE_EXIT": str(opts.handshake_exit),
        "CHAOS_ESCAPE": str(opts.escape),
        "CHAOS_WORK_MIN": str(opts.work_min),
        "CHAOS_WORK_MAX": str(opts.work_max),
        "CHAOS_QUEUE": str(opts.queue),
    }
    env_table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in envs.items())
    block = (
        "[[WdPost]]\n"
        f"Bin = {json.dumps(sys.executable)}\n"
        f"Args = {json.dumps([str(CHILD_SCRIPT), 'window_post'])}\n"
        f"Concurrent = {opts.concurrent}\n"
        "ReadyTimeoutSecs = 5\n"
        f"RequestTimeoutSecs = {opts.request_timeout}\n"
        f"CancelGraceSecs = {opts.cancel_grace}\n"
        f"MaxAttempts = {opts.max_attempts}\n"
        f"Envs = {{ {env_table} }}\n"
    )
    path = directory / "ext-prover.cfg"
    path.write_text(block * opts.children)
    return path


def _live_children(
    pid: int, min_age: float = 0.0, seen: dict[tuple[int, float], float] | None = None
) -> list[psutil.Process]:
    """The running children of `pid` that are at least `min_age` seconds old.

    Age counts from when this process first saw the child (`seen`, monotonic clock), not from
    psutil's create_time: that one is boot time (whole seconds, from the wall clock) plus ticks
    since boot, and it was seen here up to 0.8 s off after the VM was paused, which made
    newborn children look old enough to be signalled before they set their signal handlers."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    seen = {} if seen is None else seen
    out = []
    now = time.monotonic()
    for kid in kids:
        try:
            if kid.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED):
                continue
            first = seen.setdefault((kid.pid, kid.create_time()), now)
        except psutil.NoSuchProcess:
            continue
        if now - first >= min_age:
            out.append(kid)
    return out


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every live process with `marker` in its command line or as its CHAOS_MARKER."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = proc.info["cmdline"] or []
            environ = proc.info["environ"] or {}
            if marker in cmdline or environ.get("CHAOS_MARKER") == marker:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def classify(error: str) -> str:
    """The cause of a failed request, from the supervisor's message."""
    if "deadline" in error:
        return "deadline passed"
    if "MaxAttempts" in error:
        last = error.rsplit("; giving up", 1)[0]
        if "timed out after" in last.rsplit("attempt", 1)[-1] or last.startswith("timed out"):
            return "timed out on every attempt"
        return "lost with its child on every attempt"
    if "can serve" in error or "FATAL" in error:
        return "no child could serve"
    if "shutting down" in error:
        return "supervisor shutting down"
    return "other"


async def _client(
    cid: int,
    socket_path: Path,
    opts: ChaosOptions,
    state: _State,
    counter: list[int],
) -> None:
    from damocles_ext_plugins.testing import echo_output

    from damocles_ext.client import connect
    from damocles_ext.errors import DextError
    from damocles_ext.protocol import control as control_protocol

    async with connect(socket_path) as client:
        # Count Response frames as they arrive, to prove "exactly once" on the wire (the client
        # itself would silently drop a second one).
        dispatch = client._dispatch

        def counting(msg: object) -> None:
            if isinstance(msg, control_protocol.ControlResponse):
                state.responses[(cid, msg.id)] += 1
            dispatch(msg)

        client._dispatch = counting  # type: ignore[method-assign]

        async def worker() -> None:
            while counter[0] < opts.requests:
                i = counter[0]
                counter[0] += 1
                task = _task(i)
                state.sent[cid] += 1
                key = (cid, state.sent[cid])  # the client numbers its requests 1, 2, ...
                start = time.monotonic()
                try:
                    out = await client.submit(task, deadline=time.time() + opts.deadline)
                except DextError as exc:  # a usage answer too (a config without the stage)
                    state.results[key] = _Result(False, time.monotonic() - start, str(exc))
                else:
                    if out != echo_output(task):
                        state.wrong_outputs += 1
                    state.results[key] = _Result(True, time.monotonic() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(opts.in_flight):
                nursery.start_soon(worker)


async def _chaos(run_pid: int, opts: ChaosOptions, state: _State, stop: trio.Event) -> None:
    rng = random.Random(opts.seed)
    seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> first seen (monotonic)
    stopped: list[psutil.Process] = []

    async def resume_later(proc: psutil.Process, after: float) -> None:
        await trio.sleep(after)
        try:
            proc.resume()
        except psutil.Error:
            pass  # killed meanwhile (by us or by the supervisor, for hanging)

    async with trio.open_nursery() as nursery:
        while not stop.is_set():
            with trio.move_on_after(rng.expovariate(1 / opts.interval)):
                await stop.wait()
            if stop.is_set():
                break
            kids = _live_children(run_pid, opts.min_age, seen)
            if not kids:
                continue
            victim = rng.choice(kids)
            action = rng.choices(ACTIONS, weights=opts.weights)[0]
            try:
                if action == "sigkill":
                    victim.kill()
                elif action == "sigstop":
                    victim.suspend()
                    stopped.append(victim)
                    nursery.start_soon(resume_later, victim, rng.uniform(0.05, opts.stop_max))
                elif action == "garbage":
                    victim.send_signal(signal.SIGUSR1)
                else:
                    victim.send_signal(signal.SIGUSR2)
            except psutil.Error:
                continue
            state.actions[action] += 1
        nursery.cancel_scope.cancel()
    for proc in stopped:
        try:
            proc.resume()
        except psutil.Error:
            pass


async def _sample_rss(run_pid: int, state: _State, stop: trio.Event, t0: float) -> None:
    proc = psutil.Process(run_pid)
    while not stop.is_set():
        try:
            state.rss.append((time.monotonic() - t0, proc.memory_info().rss))
        except psutil.Error:
            return
        with trio.move_on_after(0.2):
            await stop.wait()


async def _wait_for_socket(path: Path, process: trio.Process, limit: float = 30.0) -> None:
    from damocles_ext.client import NoSupervisorError, connect

    with trio.fail_after(limit):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"damocles-ext run exited early with {process.returncode}")
            try:
                async with connect(path):
                    return
            except NoSupervisorError:
                await trio.sleep(0.05)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


async def run_chaos(opts: ChaosOptions, workdir: Path) -> dict:
    """One chaos run in `workdir` (config, socket, log); returns the report."""
    from damocles_ext.client import connect

    marker = f"dext-chaos-{uuid.uuid4().hex[:12]}"
    cfg = write_config(opts, workdir, marker)
    sock_dir = workdir / "sock"
    socket_path = sock_dir / "control.sock"
    log_path = workdir / "run.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    state = _State()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "damocles_ext",
                "run",
                "-c",
                str(cfg),
                "--socket",
                str(socket_path),
                "--restart-delay",
                str(opts.restart_delay),
                "--restart-max-delay",
                str(opts.restart_max_delay),
                "--shutdown-grace",
                str(opts.shutdown_grace),
                "--log-level",
                "info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            env=env,
        )
    finally:
        os.close(log_fd)
    try:
        await _wait_for_socket(socket_path, process)
        t0 = time.monotonic()
        stop_chaos = trio.Event()
        counter = [0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_chaos, process.pid, opts, state, stop_chaos)
            nursery.start_soon(_sample_rss, process.pid, state, stop_chaos, t0)
            async with trio.open_nursery() as clients:
                for cid in range(opts.clients):
                    clients.start_soon(_client, cid, socket_path, opts, state, counter)
            serve_wall = time.monotonic() - t0
            stop_chaos.set()
        async with connect(socket_path) as c:
            status = await c.status()
        t_term = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(opts.shutdown_grace + 30):
            await process.wait()
        shutdown_s = time.monotonic() - t_term
        returncode = process.poll()
    finally:
        if process.poll() is None:
            process.kill()
            await process.wait()
    # Leftovers: anything carrying the marker (children, grandchildren), given a moment for the
    # kernel to finish reaping.
    leftovers = marked_processes(marker)
    with trio.move_on_after(3):
        while leftovers:
            await trio.sleep(0.1)
            leftovers = marked_processes(marker)
    leftover_info = []
    for proc in leftovers:
        try:
            leftover_info.append(
                {"pid": proc.pid, "ppid": proc.ppid(), "cmdline": proc.cmdline()[:4]}
            )
            proc.kill()
        except psutil.Error:
            pass
    return _report(opts, state, status, log_path, serve_wall, shutdown_s, returncode, leftover_info)


def _report(opts, state, status, log_path, serve_wall, shutdown_s, returncode, leftovers) -> dict:
    log_text = log_path.read_text(errors="replace")
    results = state.results
    latencies = [r.latency for r in results.values()]
    ok_lat = [r.latency for r in results.values() if r.ok]
    causes = Counter(classify(r.error) for r in results.values() if not r.ok)
    examples: dict[str, str] = {}
    for r in results.values():
        if not r.ok:
            examples.setdefault(classify(r.error), r.error[:300])
    expected = {(c, i) for c, n in state.sent.items() for i in range(1, n + 1)}
    duplicates = sorted(k for k, n in state.responses.items() if n > 1)
    missing = sorted(expected - set(state.responses))
    unexpected = sorted(set(state.responses) - expected)
    late = [r.latency for r in results.values() if r.latency > opts.deadline + 1.0]
    rss = [v for _, v in state.rss]
    quarter = max(1, len(rss) // 4)
    first_q = statistics.median(rss[:quarter]) if rss else 0
    last_q = statistics.median(rss[-quarter:]) if rss else 0
    per_cause_log = {
        "retries (re-dispatches)": len(re.findall(r"; retrying \(attempt", log_text)),
        "taken back from a child's queue": len(re.findall(r": taken back from ", log_text)),
        "restarts scheduled": len(re.findall(r": restarting in ", log_text)),
        "failed starts": len(re.findall(r"failed start", log_text)),
        "exits during the handshake": len(
            re.findall(r"\] chaos: exiting during the handshake", log_text)
        ),
        "grandchildren spawned": len(re.findall(r"chaos: spawned grandchild", log_text)),
        "orphans adopted and killed": len(
            re.findall(r"killing pid \d+ .*outside its process group", log_text)
        ),
        "killed as hung (cancel grace)": len(re.findall(r"after a Cancel; killing", log_text)),
        "child exits seen (SIGKILL, crash)": len(re.findall(r"\): exited \(", log_text)),
        "killed for breaking the protocol": len(
            re.findall(r"\): broke the protocol: .*; killing its process group", log_text)
        ),
        "FATAL": len(re.findall(r"FATAL", log_text)),
    }
    return {
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "requests": opts.requests,
        "answered": len(results),
        "outputs": sum(r.ok for r in results.values()),
        "errors": sum(not r.ok for r in results.values()),
        "wrong_outputs": state.wrong_outputs,
        "failures_by_cause": dict(causes.most_common()),
        "failure_examples": examples,
        "exactly_once": {
            "response_frames": sum(state.responses.values()),
            "duplicates": len(duplicates),
            "missing": len(missing),
            "unexpected_ids": len(unexpected),
        },
        "late_answers": len(late),
        "chaos_actions": dict(state.actions),
        "supervisor_log": per_cause_log,
        "restarts": sum(c.restarts for c in status.children),
        "children_fatal": sum(c.state == "fatal" for c in status.children),
        "latency_s": {
            "p50": _percentile(latencies, 0.50),
            "p90": _percentile(latencies, 0.90),
            "p99": _percentile(latencies, 0.99),
            "max": max(latencies, default=None),
            "ok_p50": _percentile(ok_lat, 0.50),
            "ok_p99": _percentile(ok_lat, 0.99),
        },
        "wall_s": serve_wall,
        "requests_per_s": len(results) / serve_wall if serve_wall else None,
        "rss_mb": {
            "samples": len(rss),
            "first_quarter_median": first_q / 2**20,
            "last_quarter_median": last_q / 2**20,
            "peak": max(rss, default=0) / 2**20,
            "growth_ratio": (last_q / first_q) if first_q else None,
            # 16 evenly spaced samples (seconds since the clients started, MB): flat means
            # bounded; warm-up shows in the first few.
            "series": [
                (round(t, 1), round(v / 2**20, 1))
                for t, v in state.rss[:: max(1, len(state.rss) // 16)]
            ],
        },
        "shutdown": {"returncode": returncode, "seconds": shutdown_s},
        "leftover_processes": leftovers,
    }


def check(report: dict) -> list[str]:
    """What went wrong in a run (empty: it held up)."""
    problems = []
    once = report["exactly_once"]
    if report["answered"] != report["requests"]:
        problems.append(f"{report['requests'] - report['answered']} requests never answered")
    if once["duplicates"] or once["missing"] or once["unexpected_ids"]:
        problems.append(f"not exactly once: {once}")
    if report["wrong_outputs"]:
        problems.append(f"{report['wrong_outputs']} wrong outputs")
    if report["late_answers"]:
        problems.append(f"{report['late_answers']} answers came after their deadline")
    if report["failures_by_cause"].get("other"):
        problems.append(f"unclassified errors: {report['failure_examples'].get('other')}")
    if report["leftover_processes"]:
        problems.append(f"processes left behind: {report['leftover_processes']}")
    if report["shutdown"]["returncode"] != 0:
        problems.append(f"run exited with {report['shutdown']['returncode']}")
    growth = report["rss_mb"]["growth_ratio"]
    if growth is not None and growth > 1.25:
        problems.append(f"supervisor RSS grew {growth:.2f}x from the first to the last quarter")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "<OUT>")
    defaults = ChaosOptions()
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--in-flight", type=int, default=defaults.in_flight)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--interval", type=float, default=defaults.interval)
    parser.add_argument("--stop-max", type=float, default=defaults.stop_max)
    parser.add_argument("--handshake-exit", type=float, default=defaults.handshake_exit)
    parser.add_argument(
        "--escape",
        type=float,
        default=defaults.escape,
        help="share of grandchildren that start their own session",
    )
    parser.add_argument("--deadline", type=float, default=defaults.deadline)
    parser.add_argument(
        "--queue",
        type=int,
        default=defaults.queue,
        help="requests each child offers to queue beyond Concurrent, for quick requests"
        f" (default {defaults.queue}; 0: none)",
    )
    parser.add_argument(
        "--work-max",
        type=float,
        default=defaults.work_max,
        help=f"most seconds of work per request (default {defaults.work_max:g}; under 0.01 every"
        " answer is quick, and the children's queues are used)",
    )
    parser.add_argument(
        "--out", default="chaos", help="with --save, write bench/results/<OUT>.json (default chaos)"
    )
    args = parser.parse_args(argv)
    opts = ChaosOptions(
        requests=args.requests,
        clients=args.clients,
        in_flight=args.in_flight,
        seed=args.seed,
        interval=args.interval,
        stop_max=args.stop_max,
        handshake_exit=args.handshake_exit,
        escape=args.escape,
        deadline=args.deadline,
        queue=args.queue,
        work_max=args.work_max,
    )
    with tempfile.TemporaryDirectory(prefix="dext-chaos-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o700)
        report = trio.run(run_chaos, opts, workdir)
        if os.environ.get("CHAOS_KEEP_LOG"):
            (Path(os.environ["CHAOS_KEEP_LOG"])).write_bytes((workdir / "run.log").read_bytes())
        problems = check(report)
        if problems:
            kept = Path(tempfile.mkdtemp(prefix="dext-chaos-log-")) / "run.log"
            kept.write_bytes((workdir / "run.log").read_bytes())
            report["log_kept_at"] = str(kept)
    report["problems"] = problems
    _print(report)
    finish(args.out, report, args.save)
    return 1 if problems else 0


def _print(report: dict) -> None:
    lat = report["latency_s"]
    rss = report["rss_mb"]
    once = report["exactly_once"]
    log = report["supervisor_log"]
    causes = ", ".join(f"{k}: {v}" for k, v in report["failures_by_cause"].items())
    answered = f"{report['answered']} ({report['outputs']} / {report['errors']})"
    starts = f"{log['failed starts']} ({log['exits during the handshake']})"
    latency = f"{lat['p50']:.3f} / {lat['p99']:.3f} / {lat['max']:.3f}"
    memory = (
        f"{rss['first_quarter_median']:.1f} / {rss['last_quarter_median']:.1f}, {rss['peak']:.1f}"
    )
    shutdown = f"{report['shutdown']['returncode']}, {report['shutdown']['seconds']:.2f}"
    rows = [
        ("requests", report["requests"]),
        ("answered (outputs / errors)", answered),
        ("exactly once (duplicates / missing)", f"{once['duplicates']} / {once['missing']}"),
        ("answers after their deadline", report["late_answers"]),
        ("failures by cause", causes or "none"),
        ("chaos actions", ", ".join(f"{k}: {v}" for k, v in report["chaos_actions"].items())),
        ("re-dispatches", log["retries (re-dispatches)"]),
        ("of which taken back from a child's queue", log["taken back from a child's queue"]),
        ("restarts", report["restarts"]),
        ("failed starts (of which exits in the handshake)", starts),
        ("latency p50 / p99 / max (s)", latency),
        ("throughput (requests/s)", f"{report['requests_per_s']:.0f}"),
        ("supervisor RSS first/last quarter, peak (MB)", memory),
        ("shutdown (exit code, s)", shutdown),
        ("processes left behind", len(report["leftover_processes"])),
    ]
    from bench.runner import print_table

    print_table(rows, ["figure", "value"])
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")


if __name__ == "__main__":
    sys.exit(main())
