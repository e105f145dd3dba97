"""The coordinator: damocles' worker-prover RPC (`Venus.WdPoSt*`, `Venus.WorkerPing`) served over
HTTP POST at /rpc/v0 from a job store, so damocles-workers with `plan = "wdpost"` pull jobs from it.

The HTTP side is the one the metrics server shares (`http.HttpConnection`: h11 on the trio
loop, `ConnectionSlots` bounding the connections, each request whole within the idle timeout),
with a bounded body: a worker's
requests are small, and a client must not be able to make us buffer without limit. Each body is
read whole, decoded by jobs/rpc.py, and answered once; a store failure or a bug of ours becomes a
JSON-RPC error on that request, never the end of the server.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import h11
import msgspec
import trio

from ..jobs import rpc, rules
from ..jobs.database import SQLITE_WAL_SIZE_LIMIT
from ..jobs.log_lines import fields_of, said_of
from ..jobs.model import JobOutput
from ..jobs.outage import Outage
from ..jobs.pings import PausedWorkers, pause_of
from ..jobs.silence import Hearing
from ..jobs.store import DEFAULT_PASS_LIMIT, Outcome, StoreError, StoreLost, TrioJobStore
from ..jobs.trio_store import calling
from ..threads import NoThreadError, run_in_thread
from .coordinator_clock import ServerClock
from .dext_rpc import DextMethods
from .held_warnings import HeldWarnings
from .http import HttpConnection, Refuse, serve_http_connection
from .listeners import (
    ConnectionSlots,
    ThrottledLog,
    bind_tcp,
    join_host_port,
    peer_address,
    serve_connections,
)
from .sector_index import SectorIndex

log = logging.getLogger("damocles_ext.coordinator")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1789  # damocles-manager's
RPC_PATH = b"/rpc/v0"
MAX_BODY = 16 * 1024 * 1024
#: A body larger than this is parsed on a thread, one at a time: a junk body of MAX_BODY bytes
#: takes seconds and hundreds of MB to parse, which must stall neither the heartbeats of others
#: nor the sweep (a real call's body is a few KiB; a finish's proofs, some more).
PARSE_ON_A_THREAD = 256 * 1024
MAX_HEAD = 16 * 1024
DEFAULT_MAX_CONNECTIONS = 64
#: Bytes of request bodies all connections together may hold (read, or being answered): a
#: worker's call is a few KiB, a finish with its proofs some tens; 64 MiB is a few hundred
#: workers' calls at once many times over, and 4 bodies of MAX_BODY, where 64 connections of
#: MAX_BODY each held a GiB. Over it, the connection whose unfinished body holds the most is
#: closed.
DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024
# A worker heartbeats every 3 s and pings every 30 s over a kept-alive connection.
DEFAULT_IDLE_TIMEOUT = 120.0
# damocles-manager sweeps every 10 s (and once at start): rules.sweep_every here, never more than
# a quarter of HeartbeatTimeout. Its cleanup every 30 min is the limits' cleanup_interval.
# Cleanup passes (of DEFAULT_PASS_LIMIT jobs) between two sweeps at most.
CLEANUP_PASSES = 10
# A SQLite store's write-ahead log this large is warned (checked with the clock): it is cut back
# to SQLITE_WAL_SIZE_LIMIT at each restart, so it grows past that only while a reader keeps an
# old snapshot (or for one large transaction).
LOG_WARN_SIZE = 4 * SQLITE_WAL_SIZE_LIMIT
# Seconds between two looks at a SQLite store's write-ahead log size (at a sweep's end).
LOG_CHECK_EVERY = 600.0


# A request without the right token is answered without its body being kept; a longer body than
# this is not even read (the connection is closed), so that a client without the token cannot
# make the coordinator read megabytes.
UNAUTHORIZED_BODY = 64 * 1024
#: The one method `--index-without-token` answers without the token.
INDEX_METHOD = "Venus.SectorIndexerFind"


class Coordinator:
    """The Venus.* methods on a TrioJobStore: `await handle(call)` gives the result or raises
    rpc.RpcError."""

    def __init__(
        self,
        store: TrioJobStore,
        stores: Mapping[str, str] | None = None,
        *,
        observe: Callable[[Iterable[rules.Effect]], None] | None = None,
        sector_index: SectorIndex | None = None,
        monotonic: Callable[[], float] | None = None,
        watch_clocks: bool = True,
        paused_workers: PausedWorkers | None = None,
    ) -> None:
        self.store = store
        #: The workers whose last ping said they take no job (jobs/pings.py; the metrics').
        self.paused_workers = paused_workers or PausedWorkers(
            lambda: store.clock()  # noqa: PLW0108 - the store's clock as it is at each ping
        )
        #: The clock that only moves forward (trio's by default), beside the store's wall clock:
        #: the sweeps see a step of the wall clock, or a stretch in which this process did not
        #: run, by comparing them (`watch_clocks`; without it, for a test's clock that jumps,
        #: the PostgreSQL server's clock is not read either: the test's stands for it).
        self._monotonic = monotonic or trio.current_time  # (read in the coordinator's loop)
        self.cleanup_pass = DEFAULT_PASS_LIMIT  # finished jobs forgotten per cleanup pass
        #: A SQLite store's log size that is warned (checked with the clock), and whether it was.
        self.log_warn_size = LOG_WARN_SIZE
        self._log_grown = False
        #: Venus.SectorIndexerFind's answers: the job inputs seen, then `coordinator --proxy`.
        self.sector_index = sector_index or SectorIndex()
        #: Store name -> path, for Venus.StoreBasicInfo: damocles-worker asks it for each of its
        #: [[attached]] stores at start and refuses to start without an answer.
        self.stores = dict(stores or {})
        #: Told the effects of every store call this coordinator makes (the metrics' counters).
        self.observe = observe
        #: The jobs whose heartbeats (Venus' and Dext's) were passed over, their row held, and
        #: their warnings (`held.run`: a task beside the sweeps).
        self.held = HeldWarnings(store, monotonic=self._monotonic)
        self.dext = DextMethods(store, self.held, observe=self._observed,
                                learn=self.sector_index.learn)  # fmt: skip
        self._listing = trio.Lock()
        self._parsing = trio.Lock()  # the one large body being parsed (PARSE_ON_A_THREAD)
        # A store down for an hour is one warning and one line when it answers again.
        self._sweep_outage = Outage(
            begins="the sweep failed ({why}); it is tried again at each pass, and a line says"
            " when it works again",
            ends="the sweep works again, after {failures} failed passes in {lasted:.0f} s",
        )
        #: When heartbeats could be heard: not before this coordinator was made, nor while its
        #: store was unavailable to it or stalled, nor in a step of the wall clock; its sweeps
        #: count a running job's silence in the rest only (silence.Hearing).
        if store.hearing is None:
            store.hearing = Hearing(store.clock())
        self.hearing: Hearing = store.hearing
        #: The store's clock kept on the PostgreSQL server's, its steps told to the hearing.
        self.server_clock = ServerClock(store, self.hearing, self._monotonic, watch_clocks)
        #: Called when its SQLite store's file was deleted or replaced (StoreLost), by a call or
        #: a sweep: the coordinator command stops; serve --listen goes on (its calls fail).
        self.on_store_lost: Callable[[StoreLost], None] | None = None

    def _store_failed(self, exc: StoreError) -> None:
        if isinstance(exc, StoreLost) and self.on_store_lost is not None:
            self.on_store_lost(exc)

    def _observed(self, effects: Iterable[rules.Effect]) -> None:
        if self.observe is None:
            return
        try:
            self.observe(effects)
        except Exception:  # counting must never cost a worker its answer
            log.exception("an observer of the job store's effects failed")

    async def handle(self, call: rpc.Call) -> Any:
        namespace, _, name = call.method.partition(".")
        calling.set(call.method)  # (named by the warning of a store call that stalls)
        try:
            if namespace == "Dext":
                return await self.dext.call(name, call.params)
            return await getattr(self, "_" + name)(*call.params)
        except rpc.RpcError as exc:
            exc.request_id = call.request_id  # its message already as it goes out
            raise
        except StoreError as exc:
            self._store_failed(exc)
            # damocles' own text (e.g. "job 'X' does not exist") is what its clients print.
            raise rpc.RpcError(rpc.METHOD_ERROR, str(exc), call.request_id) from None

    async def _WdPoStAllocateJobs(
        self, spec: rpc.AllocateSpec, num: int, worker: str
    ) -> list[dict[str, Any]]:
        allocation = rules.AllocationSpec(
            tuple(spec.AllowedMiners or ()), tuple(spec.AllowedProofTypes or ())
        )
        jobs = await self.store.allocate(allocation, num, worker)
        self._observed(rules.allocated(jobs))
        self.sector_index.learn(job.Input for job in jobs)
        return [rpc.allocated_job(job) for job in jobs]

    async def _WdPoStHeartbeatJobs(self, job_ids: list[str] | None, worker: str) -> None:
        outcome = await self.store.heartbeat(job_ids or [], worker)
        self._observed(outcome.effects)
        self.held.heard(outcome, worker)  # never waits nor raises
        _raise_refusals(outcome.effects)

    async def _WdPoStFinishJob(
        self, job_id: str, output: JobOutput | None, error_reason: str
    ) -> None:
        outcome = await self.store.finish(job_id, output, error_reason)
        self._observed(outcome.effects)
        refused = [e for e in outcome.effects if isinstance(e, rules.Refused)]
        if refused:
            # damocles-manager takes every finish of a job it has, so damocles-worker retries a
            # failed one (5 times a minute apart by default, its wdpost thread held): damocles'
            # abort code makes it give the job up at once, and log why.
            raise rpc.RpcError(rpc.ABORT, "; ".join(f"job {e.job_id}: {e.reason}" for e in refused))
        _raise_refusals(outcome.effects)  # an unknown job: "key not found", as damocles says

    async def _WdPoStResetJob(self, job_id: str) -> None:
        await self.store.reset(job_id)

    async def _WdPoStRemoveJob(self, job_id: str) -> None:
        await self.store.remove(job_id)

    async def _WdPoStAllJobs(self) -> msgspec.Raw:
        # A whole store's briefs (30,000 jobs: 0.35 s of Python) are read, built and encoded off
        # the event loop, one listing at a time: a flood of them must not hold up the workers'
        # heartbeats and allocations, nor take every store thread.
        async with self._listing:
            jobs = await self.store.list_jobs()
            max_try = self.store.store.limits.max_try
            try:
                return await run_in_thread(rpc.all_jobs_result, jobs, max_try)
            except NoThreadError as exc:
                raise _no_thread("list the jobs", exc) from None

    async def _StoreBasicInfo(self, name: str) -> dict[str, Any] | None:
        path = self.stores.get(name)
        if path is None:
            # damocles' answer for a store it does not know is null (the worker then refuses to
            # start, saying the store was not found): the fix is told here.
            known = ", ".join(sorted(self.stores)) or "none"
            log.warning(
                "a worker asked for store %r, which this coordinator does not know (known: %s):"
                " the worker will not start; start the coordinator with --store %s=PATH, as the"
                " store is named in the workers' [[attached]]",
                name,
                known,
                name,
            )
            return None
        # damocles' StoreBasicInfo; the coordinator reads no file in it, so the rest is neutral.
        return {
            "Name": name,
            "Path": path,
            "Strict": False,
            "ReadOnly": False,
            "Weight": 1,
            "Meta": {},
        }

    async def _SectorIndexerFind(self, index_type: str, sid: rpc.SectorId) -> dict[str, Any]:
        return await self.sector_index.find(index_type, sid)

    async def learn_sectors(self) -> None:
        """Learn the sector locations of the jobs already in the store (at start)."""
        jobs = await self.store.list_jobs()
        # Oldest first (list_jobs gives the newest first): past MAX_LEARNED the newest stay.
        self.sector_index.learn(job.Input for job in reversed(jobs))

    async def _WorkerPing(self, info: Any) -> None:
        log.debug("worker ping: %.200r", info)
        # damocles' WorkerInfo carries the worker's Name: a worker that asked for jobs before is
        # alive (what `status --jobs` and the metrics count as a live worker); its Summary says
        # if it is paused (kept here, in memory, for the metrics and the log; and in the store,
        # for `status --jobs`).
        name = rpc.worker_name_of(info)
        if name and "\0" not in name:
            pause = pause_of(info)
            self.paused_workers.heard(name, pause)
            await self.store.worker_seen(name, pause)

    async def sweep_forever(
        self,
        sweep_interval: float | None = None,
        cleanup_interval: float | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The sweeps (`_sweeps`) and, beside them, the warnings of job rows held elsewhere and
        of store calls that stall (TrioJobStore.watch_stalls)."""
        calling.set("the sweep")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.held.run)
            nursery.start_soon(self.store.watch_stalls, log)
            await self._sweeps(sweep_interval, cleanup_interval, task_status)

    async def _sweeps(self, sweep_interval: float | None, cleanup_interval: float | None,
                      task_status: trio.TaskStatus[None]) -> None:  # fmt: skip
        """Time out silent jobs, retry failed ones, cancel past-deadline ones (and forget old
        finished ones) until cancelled; `task_status.started()` after the first pass. The passes
        are `sweep_interval` apart, by default rules.sweep_every of the store's limits; the
        cleanups `cleanup_interval` apart, by default the limits' cleanup_interval.

        Without these passes a worker that dies keeps its job running forever. A failing pass
        (the store unreachable for a while) is logged and tried again at the next interval.
        A running job is timed out only
        once it was silent for a HeartbeatTimeout while this coordinator served and its store
        answered: damocles' sweep at start takes back every job whose worker could not reach the
        manager while it was down."""
        next_cleanup = next_log_check = trio.current_time()
        started = False
        # (monotonic, this machine's, the store's clock) at the last pass
        last: tuple[float, float, float] | None = None
        paused_at: float | None = None  # (monotonic) at the last pass's end
        while True:
            # Read at each pass: the limits may change while the coordinator runs.
            every = sweep_interval or rules.sweep_every(self.store.store.limits)
            # Each pass on a fresh reading of the server's clock: one that stepped is kept to
            # within a pass by every coordinator on the store (one reading in 10 minutes left
            # them that long on clocks the step apart, each taking the others' jobs back).
            began = self._monotonic()
            await self.server_clock.read_server()
            if paused_at is not None:  # a wait for the store, not a pause of this process
                paused_at += self._monotonic() - began
            last = self.server_clock.watch(last, every, paused_at)
            try:
                outcome = await self.sweep_once()
                if (line := self._sweep_outage.answered(trio.current_time())) is not None:
                    log.info("%s", line)
                self._observed(outcome.effects)
                for effect in outcome.effects:
                    log.info("sweep: %s", said_of(effect), extra=fields_of(effect))
                if trio.current_time() >= next_log_check:
                    next_log_check = trio.current_time() + LOG_CHECK_EVERY
                    await self._check_log()
                if trio.current_time() >= next_cleanup:
                    more = await self._cleanup()
                    # A backlog goes on at the next sweep: sweeps are not held behind it.
                    pause = cleanup_interval or self.store.store.limits.cleanup_interval
                    next_cleanup = trio.current_time() + (0 if more else pause)
            except StoreError as exc:
                self._store_failed(exc)
                if (line := self._sweep_outage.failed(trio.current_time(), str(exc))) is not None:
                    log.warning("%s", line)
            if not started:
                started = True
                task_status.started()
            paused_at = self._monotonic()
            await trio.sleep(every)

    async def _check_log(self) -> None:
        """Warn once when a SQLite store's write-ahead log is log_warn_size or more (info when
        it is back under): no checkpoint passes a snapshot another connection still reads."""
        store = self.store.store
        watch = store.file_watch
        if watch is None:
            return
        try:
            size, held = await self.store.in_thread(
                watch.log_held, store.engine, self.log_warn_size
            )
        except Exception as exc:  # noqa: BLE001 (a check: never a reason for the sweep to stop)
            log.debug("cannot look at the write-ahead log of the store %s: %s", store.where, exc)
            return
        mib = size / (1024 * 1024)
        # One big transaction leaves a big log nobody holds: cut back at the next write.
        if size >= self.log_warn_size and held and not self._log_grown:
            self._log_grown = True
            log.warning(
                "the write-ahead log of the job store %s (%s-wal) is %.0f MiB: it is copied into"
                " the file only up to the oldest snapshot a connection still reads, so a reader"
                " that stays inside one transaction (a `sqlite3` shell, a backup, a stopped"
                " process) makes it grow with every write until the disk is full; find it"
                " (`fuser -v %s %s-wal`) and end it: the log is then copied in and cut back to"
                " %d MiB",
                store.where, watch.opened, mib, watch.opened, watch.opened,
                SQLITE_WAL_SIZE_LIMIT // (1024 * 1024),
            )  # fmt: skip
        elif size < self.log_warn_size and self._log_grown:
            self._log_grown = False
            log.info(
                "the write-ahead log of the job store %s is back to %.0f MiB",
                store.where,
                mib,
            )

    async def _cleanup(self) -> bool:
        """Forget the finished jobs past JobLifetime: pass after pass while a pass was full (one
        pass of 1000 every 30 min kept up with 0.56 jobs/s, and the store grew past that), at
        most CLEANUP_PASSES at a time; True when there may be more."""
        forgotten = 0
        full = True
        for _ in range(CLEANUP_PASSES):
            cleaned = await self.store.cleanup(limit=self.cleanup_pass)
            forgotten += len(cleaned.effects)
            full = len(cleaned.effects) >= self.cleanup_pass
            if not full:
                break
        if forgotten:
            log.info("cleanup: %d finished jobs forgotten", forgotten)
        return full

    async def sweep_once(self) -> Outcome:
        """One pass of the sweep: a job silent only because this coordinator or its store was
        down, stalled or restarting, or because the wall clock stepped, is not taken back for
        that time: its worker gets a timeout's time, heard, to reach it."""
        timeout = self.store.store.limits.heartbeat_timeout
        silent_before = self.hearing.silent_before(self.store.clock(), timeout)
        # Writes refused (a full disk) while reads are answered: this pass writes, so that its
        # answer tells the store takes writes again even with no worker's call to tell it.
        probe = self.hearing.writes_down
        return await self.store.sweep(silent_before=silent_before, probe_write=probe)

    async def answer(self, body: bytes) -> tuple[int, bytes]:
        """The HTTP status and the JSON-RPC answer to one POST body (exactly one answer)."""
        try:
            if len(body) > PARSE_ON_A_THREAD:
                async with self._parsing:
                    try:
                        call = await run_in_thread(rpc.parse_request, body)
                    except NoThreadError as exc:
                        raise _no_thread(
                            f"read this request body of {len(body)} bytes", exc
                        ) from None
            else:
                call = rpc.parse_request(body)
            result = await self.handle(call)
            return 200, rpc.encode_result(call.request_id, result)
        except rpc.RpcError as exc:
            return exc.http_status, rpc.encode_error(exc)
        except Exception as exc:  # a bug of ours costs one request, not the server
            log.exception("internal error answering an RPC request")
            error = rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            return error.http_status, rpc.encode_error(error)


def _no_thread(doing: str, exc: NoThreadError) -> rpc.RpcError:
    """The answer to a request that needed a thread this process could not start (logged: the
    operator must hear of the limit, not only the client)."""
    log.warning("cannot %s: %s", doing, exc)
    return rpc.RpcError(
        rpc.INTERNAL_ERROR, f"the coordinator cannot {doing} now: {exc}; try again later"
    )


def _raise_refusals(effects: Iterable[rules.Effect]) -> None:
    """A StoreError in damocles' words for the jobs a Venus.* call was refused for or did not
    find (damocles-manager answers "key not found" for a job that is not there)."""
    problems = [
        f"job {e.job_id}: {e.reason}" if isinstance(e, rules.Refused)
        else f"job {e.job_id}: key not found"
        for e in effects
        if isinstance(e, rules.Refused | rules.NotFound)
    ]  # fmt: skip
    if problems:
        raise StoreError("; ".join(problems))


#: How long a stopping coordinator waits for the requests it is answering (the command's, and
#: serve --listen's after its own requests are answered).
STOP_GRACE = 10.0


class CoordinatorServer:
    """POST /rpc/v0 over HTTP/1.1; the port is bound here (UsageError when it cannot be), unless
    `sock` is given: a socket bind_tcp bound already (before the store was opened), now the
    server's."""

    def __init__(
        self,
        coordinator: Coordinator,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_body: int = MAX_BODY,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        token: str | None = None,
        index_without_token: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be at least 1 byte, got {max_buffered}")
        self.coordinator = coordinator
        #: When set, every request must carry `Authorization: Bearer <token>`.
        self.token = None if token is None else token.encode()
        #: Venus.SectorIndexerFind answered without the token (read-only): a damocles proxy node
        #: calls its source without one.
        self.index_without_token = index_without_token
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.max_buffered = max_buffered
        #: Bytes of request bodies held now, all connections together, and the most ever held.
        self.buffered = self.peak_buffered = 0
        self.over_buffer = 0  # connections closed for holding the most when over max_buffered
        self._holding: set[_Connection] = set()  # the connections with a body held
        self._over_buffer_log = ThrottledLog(log)
        self.token_refusals = ThrottledLog(log)  # a client with a wrong token retries
        if sock is None:
            sock = bind_tcp(host, port, doing="listen", option="--listen")
        self._sock = sock
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{join_host_port(host, self.port)}/rpc/v0"
        self._slots: ConnectionSlots | None = None
        self._accepting = trio.CancelScope()
        self.stopping = False
        self.stopped = trio.Event()  # serve returned

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started()` once listening."""
        self._slots = ConnectionSlots(self.max_connections, "coordinator port", log)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                with self._accepting:
                    await serve_connections(listener, self._slots, nursery, self._connection)
                await listener.aclose()  # stopping: no new connection; the open ones finish
        finally:
            self.stopped.set()
            with trio.CancelScope(shield=True):
                await listener.aclose()

    def close(self) -> None:
        self._sock.close()

    def stop(self) -> None:
        """Stop gracefully: accept nothing more, close idle connections; a request being
        answered gets its answer, then its connection closes; `serve` returns when all are."""
        self.stopping = True
        self._accepting.cancel()
        if self._slots is not None:
            self._slots.evict_idle("the coordinator is stopping")

    def _buffer_changed(self, conn: _Connection, held: int) -> bool:
        """Account the `held` bytes of `conn`'s body; False if `conn` itself must go (over the
        cap, its unfinished body the largest). Only a body still being read is closed: one
        being answered gets its answer, and frees its bytes then."""
        self.buffered += held - conn.buffered
        conn.buffered = held
        (self._holding.add if held else self._holding.discard)(conn)
        keep = True
        while self.buffered > self.max_buffered:
            reading = [c for c in self._holding if c.reading_body]
            if not reading:
                break
            hog = max(reading, key=lambda c: c.buffered)
            self.over_buffer += 1
            reason = (
                f"its unfinished request body holds {hog.buffered / 2**20:.1f} MiB, the most of"
                f" any connection, and all of them together hold {self.buffered / 2**20:.1f} MiB,"
                f" over the limit of {self.max_buffered / 2**20:g} MiB"
            )
            self._over_buffer_log("closing a coordinator connection: %s", reason)
            # Its bytes go with it: counted out now, so one read over the cap closes one.
            self.buffered -= hog.buffered
            hog.buffered = 0
            self._holding.discard(hog)
            if hog is conn:
                keep = False
            else:
                hog.evict(reason)
        self.peak_buffered = max(self.peak_buffered, self.buffered)
        return keep

    async def _connection(self, stream: trio.SocketStream) -> None:
        assert self._slots is not None
        conn = _Connection(self, stream)
        await serve_http_connection(
            self._slots, conn, stream, busy="too many connections to the coordinator\n"
        )


class _Connection(HttpConnection):
    """One client's connection: a bounded body, the token checked before the body is kept."""

    def __init__(self, server: CoordinatorServer, stream: trio.SocketStream) -> None:
        super().__init__(stream, idle_timeout=server.idle_timeout, max_head=MAX_HEAD, log=log,
                         what="coordinator", stopping=lambda: server.stopping)  # fmt: skip
        self._server = server
        # Workers read a job's NotAfter against the Date and X-Dext-Clock: the coordinator's
        # clock, the server's.
        self.date_clock = server.coordinator.store.clock
        self._refused: rpc.RpcError | None = None  # the request being read lacks the token
        self._why: str | None = None  # what is wrong with its token, said in our log
        self.buffered = 0  # bytes of the request body kept, as the server accounts them
        self.reading_body = False  # the body is being read (not answered yet)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self._server._buffer_changed(self, 0)

    def on_head(self, request: h11.Request) -> None:
        self.reading_body = True
        self._refused = self._check_token(request)
        # Refused before reading it, when the client says how long it is (h11 checked the
        # header's digits; a chunked body has none and is counted as it comes).
        length = int(dict(request.headers).get(b"content-length", b"0"))
        if self._refused is not None and length > UNAUTHORIZED_BODY:
            raise self._unauthorized(self._refused)
        if length > self._server.max_body:
            raise self._too_large()

    def on_data(self, request: h11.Request, data: bytes, size: int) -> bool:
        if self._refused is not None:
            if size > UNAUTHORIZED_BODY:
                raise self._unauthorized(self._refused)
            # Read to keep the connection usable; kept only to see if it asks the open index.
            keep = self._server.index_without_token
        elif size > self._server.max_body:
            raise self._too_large()
        else:
            keep = True
        if keep and not self._server._buffer_changed(self, size):
            raise Refuse(503, b"the coordinator holds too many request bodies; try again\n")
        return keep

    def _too_large(self) -> Refuse:
        return Refuse(413, f"a request body is at most {self._server.max_body} bytes\n".encode())

    def _check_token(self, request: h11.Request) -> rpc.RpcError | None:
        token = self._server.token
        if token is None:
            return None
        given = next((v for k, v in request.headers if k == b"authorization"), None)
        self._why = rpc.bearer_problem(given, token)  # (for our log: the client is told more)
        return rpc.bearer_refusal(self._why)

    def _unauthorized(self, error: rpc.RpcError) -> Refuse:
        # Said (never the token): the client is told, but its operator may not read its log.
        self._server.token_refusals(
            "refused a request from %s: it carries %s; give the client the token of this"
            " coordinator's --token-file (or serve it from a coordinator without one)",
            peer_address(self._stream),
            self._why,
        )
        return _unauthorized(error)

    async def answer(self, request: h11.Request, body: bytes) -> None:
        self.reading_body = False
        try:
            await self._answer(request, body)
        finally:
            self._server._buffer_changed(self, 0)  # the body is let go of once answered

    async def _answer(self, request: h11.Request, body: bytes) -> None:
        if self._refused is not None and not self._asks_open_index(body):
            # The connection stays open: a client that fixes its header may go on using it.
            refusal = self._unauthorized(self._refused)
            await self.send(refusal.status, refusal.body, content_type=refusal.content_type,
                            extra=refusal.extra)  # fmt: skip
        elif request.target.split(b"?", 1)[0] != RPC_PATH:
            await self.send(404, b"the RPC is served at POST /rpc/v0\n")
        elif request.method != b"POST":
            await self.send(405, b"only POST is served here\n", extra=[("Allow", "POST")])
        else:
            status, answer = await self._server.coordinator.answer(body)
            await self.send(status, answer, content_type="application/json")

    def _asks_open_index(self, body: bytes) -> bool:
        if not self._server.index_without_token:
            return False
        try:
            return rpc.parse_request(body).method == INDEX_METHOD
        except rpc.RpcError:
            return False


def _unauthorized(error: rpc.RpcError) -> Refuse:
    return Refuse(error.http_status, rpc.encode_error(error), content_type="application/json",
                  extra=[("WWW-Authenticate", "Bearer")])  # fmt: skip
