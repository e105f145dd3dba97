"""`damocles-ext worker`: a GPU machine that pulls WindowPoSt jobs from a manager (our coordinator,
or damocles-manager --worker-prover), proves them on the children of its supervisor, heartbeats
them while they run and delivers their results.

What it does that damocles-worker's wdpost threads do not:
- it asks for jobs only for the slots its ready children have free, as many as free in one call
  (one per call from damocles-manager, whose allocation is one job), and right after a slot
  frees: no job waits on a busy worker, no pause between jobs;
- a job the manager says is no longer ours (reset, removed, timed out, given to another worker,
  past its deadline) is cancelled on its child at once, and the slot takes the next job;
- an unreachable manager is waited for with backoff and one log line per outage; running proofs
  go on, their results are kept and sent again until the manager answers or the job's deadline
  or lifetime passes (then logged with the job id, never dropped silently).

The rules (how many to ask for, what a failed call means, when to give up, where a sector is)
are in jobs/worker_rules.py and jobs/outage.py; this module runs the worker and asks for jobs,
worker_jobs.py proves and delivers them, worker_beats.py heartbeats them and worker_ping.py
pings the manager.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from ..api import open_supervisor
from ..errors import ProverError, UsageError
from ..jobs import rpc
from ..jobs.client import (
    RpcCallError,
    RpcClient,
    RpcClientError,
    RpcConnectionError,
    local_address_towards,
    manager_down,
)
from ..jobs.listing import format_partitions
from ..jobs.outage import Outage, allocations_outage, heartbeats_outage
from ..jobs.worker_rules import (
    NO_WORKER_PROVER,
    SLOT_STAGES,
    UNPROVED_BURST,
    UP,
    Api,
    Backoff,
    Breaker,
    Failure,
    UnheldStops,
    UnprovedRounds,
    allocate_params,
    deadline_reached,
    failure_of,
    free_slots,
    jobs_to_ask,
    no_child_can_prove,
    passing_answer,
    ready_slots_of,
    runnable_capacity,
)
from ..stages import child_stages
from .worker_beats import heartbeat_forever
from .worker_jobs import deliver, proof_of, say_faults_seen
from .worker_ping import manager_offset, ping_forever
from .worker_sectors import FAULT_LOOK_THREADS
from .worker_state import (
    ADOPTED,
    PROVER_FAILURES,
    SAME,
    UNPROVED_JOBS,
    UNPROVED_PAUSED,
    HeldJob,
    Pause,
    WorkerCounters,
    given_again,
    given_twice_line,
    no_jobs_line,
    one_per_job,
    pause_in_force,
    read_answer,
    taken_back_line,
)

if TYPE_CHECKING:
    import pluggy

    from ..jobs.client import AnswerClock
    from ..jobs.endpoint import Endpoint
    from ..jobs.worker_rules import PulledJob
    from ..jobs.worker_settings import WorkerSettings
    from ..sectors.locator import SectorLocator
    from ..supervisor.core import Supervisor
    from ..supervisor.stats import ChildStats

log = logging.getLogger("damocles_ext.worker")


class Worker:
    """The worker: `await worker.run()` until `stop()` (graceful) or cancellation."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        supervisor_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        locator: SectorLocator | None = None,
    ) -> None:
        self.settings = settings
        #: The sector-location service, for sectors in stores not attached (`--proxy`).
        self.locator = locator
        self.pm = plugin_manager
        self._sup_options = dict(supervisor_options or {})
        self._clock = clock
        self.api = Api.DEXT
        self.name = settings.name
        self.manager_url = settings.manager  # the RPC URL once the run starts
        self.held: dict[str, HeldJob] = {}
        self.counters = WorkerCounters()
        self.stopping, self._stop, self._changed = False, trio.Event(), trio.Event()
        self._comebacks = 0  # times the manager came back from an outage (_came_back)
        self._outage, self._beats_failing = Outage(), heartbeats_outage()
        self._refusals = allocations_outage()  # allocations refused: the manager's store down
        self._look_limiters: dict[str, trio.CapacityLimiter] = {}  # one per store directory
        #: The looks at faulty sectors' files (worker_jobs.say_faults_seen): their own threads,
        #: so a slow one never holds a proof's store check; their scopes, which `stop` cancels.
        self._fault_look_threads = trio.CapacityLimiter(FAULT_LOOK_THREADS)
        self._fault_looks: set[trio.CancelScope] = set()
        self._idle_until = -math.inf
        self._breaker = Breaker()  # prover failures in a row: a pause
        self._unproved = UnprovedRounds(Backoff(settings.retry_base, settings.idle_poll))
        self.pause_of: dict[str, Pause] = {}  # the latest pause of each reason (paused())
        self._sup: Supervisor | None = None
        self._dead: str | None = None  # why no child can prove any more
        self._refused: str | None = None  # why the manager refused our token, once running
        self.address: str | None = None  # the local address that reaches the manager
        self._start_scope = trio.CancelScope()  # naming itself, asking about its stores
        self.unheld_stops = UnheldStops()  # when to say stops for jobs not held here
        self.allocating = False  # an allocation call's answer is awaited (worker_beats)
        self.deferred_stops: dict[str, str | None] = {}  # job -> lease put off (worker_beats)
        self._over_allocated = False  # the last allocation gave more than was asked (said)
        #: The manager's clock less this machine's, from the clock of its answers (worker_ping.
        #: manager_offset): job deadlines are the manager's, and read on its clock.
        self.clock_offset = 0.0

    # -- for callers and tests ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop asking for jobs; running proofs get the shutdown grace, their results are sent.
        Before the run started (naming itself, asking the manager about its stores): at once."""
        self.stopping = True
        self._stop.set()
        for look in self._fault_looks:
            look.cancel()
        self._start_scope.cancel()  # (nothing once the start is over)
        self.touch()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds; it is looked at after each change of the worker."""
        while not condition():
            await self._changed.wait()

    @property
    def manager_reachable(self) -> bool:
        """False during an outage (between its first failed call and its first answer): a
        call of any kind that could not connect begins one; the heartbeats' failures with a
        connection made (no answer in time, cut) are an outage of their own, not shown here."""
        return self._outage.down_since is None

    @property
    def supervisor(self) -> Supervisor:
        """The running supervisor (from `run`'s task_status.started() to its end)."""
        assert self._sup is not None, "the worker is not running"
        return self._sup

    def touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the run ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the attached stores, start the children, pull and prove until stopped.

        Raises UsageError (exit 2) for what the operator must fix: a bad address, a store the
        manager does not know, a refused token."""
        try:
            endpoint = self.settings.endpoint
        except ValueError as exc:
            raise UsageError(f"--manager: {exc}") from None

        def client() -> RpcClient:
            return RpcClient(
                endpoint,
                token=self.settings.token,
                timeout=self.settings.rpc_timeout,
                headers=list(self.settings.headers),
            )

        # Heartbeats have a connection of their own: they must not wait behind a finish that is
        # being retried, or behind an allocation.
        async with client() as calls, client() as beats, client() as pings:
            self._calls = calls
            self.manager_url = calls.url
            # Stopped meanwhile (stop() cancels this scope): a call in flight to a manager that
            # does not answer is given up at once, not at the end of its --rpc-timeout.
            early = self.stopping  # stopped before the run: nothing was asked yet
            with self._start_scope:
                if self.name is None:
                    self.name = await self._default_name(endpoint)
                await self._check_stores()
            # cancel_called, not cancelled_caught: a stop before the run, with --name and no
            # attached store, reaches no checkpoint inside (nothing is caught), and the
            # children would be started only to be stopped.
            if self._start_scope.cancel_called:
                # (a name is set only once found: none yet, it was still looking for one)
                during = "before the worker could name itself" if self.name is None else (
                    "before the run started" if early else "while waiting for the manager"
                )  # fmt: skip
                log.info("stopped %s; nothing was pulled", during)
                task_status.started()  # and returns at once: run_worker sees it done
                return
            log.info("worker %r pulls WindowPoSt jobs from %s", self.name, calls.url)
            # A job's faults are said on its own line (its id, the sectors): not a second time
            # by the supervisor's note of the request that proved it.
            sup_options = {"shutdown_grace": self.settings.shutdown_grace,
                           "faults_said_elsewhere": True, **self._sup_options}  # fmt: skip
            sup_options.setdefault("plugin_manager", self.pm)
            async with open_supervisor(list(self.settings.children), **sup_options) as sup:
                self._sup = sup
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    background = trio.CancelScope()

                    async def in_background() -> None:
                        with background:
                            async with trio.open_nursery() as inner:
                                inner.start_soon(
                                    heartbeat_forever, self, beats, self.settings.heartbeat_interval
                                )
                                inner.start_soon(
                                    ping_forever, self, pings, endpoint, self.settings.ping_interval
                                )
                                inner.start_soon(self._forward_supervisor_changes, sup)
                                if self.locator is not None:
                                    inner.start_soon(self.locator.refresh_forever)

                    nursery.start_soon(in_background)
                    task_status.started()
                    await self._allocate_loop()
                    await self._drain()
                    background.cancel()
                self._sup = None
        if self._dead is not None:
            raise ProverError(
                f"{self._dead}; their stderr above says why: fix their [[WdPost]] tables and"
                " start the worker again"
            )
        if self._refused is not None:
            raise UsageError(f"the manager refused this worker's token: {self._refused}")

    async def _default_name(self, endpoint: Endpoint) -> str:
        backoff = Backoff(self.settings.retry_base, self.settings.retry_cap)
        while True:
            try:
                name = await local_address_towards(endpoint)
            except OSError as exc:
                what = f"no route to {endpoint.host} to name this worker by: {exc}"
                await self._wait_out(what, backoff)
                continue
            log.info("worker name: %s (the address that reaches the manager; --name sets it)", name)
            self.address = name
            return name

    async def _check_stores(self) -> None:
        """damocles-worker's start check: the manager must know each attached store."""
        backoff = Backoff(self.settings.retry_base, self.settings.retry_cap)
        for name in sorted(self.settings.attached):
            while True:
                try:
                    info = await self._calls.call("Venus.StoreBasicInfo", name)
                except RpcCallError as exc:
                    self.refused_token(exc)
                    raise UsageError(
                        f"the manager at {self._calls.url} does not know the attached store"
                        f" {name!r} ({exc.message}); attach only the stores the manager has"
                        f" (as it names them), or add {name!r} to the manager's stores"
                    ) from None
                except RpcClientError as exc:  # no answer, or a proxy's while the manager is away
                    if not isinstance(exc, RpcConnectionError) and not passing_answer(
                        getattr(exc, "status", None)
                    ):
                        raise UsageError(str(exc)) from None
                    await self._wait_out(str(exc), backoff)
                    continue
                self.answered()
                if info is None:
                    raise UsageError(
                        f"the manager at {self._calls.url} does not know the attached store"
                        f" {name!r}; attach only the stores the manager has (as it names them),"
                        f" or add {name!r} to the manager's stores (a coordinator: --store"
                        f" {name}=PATH)"
                    )
                break

    async def _wait_out(self, what: str, backoff: Backoff) -> None:
        """Before the run starts: log the outage, wait the backoff (stop() cancels the start)."""
        self._unreachable(what)
        await trio.sleep(backoff.next_delay())

    def refused_token(self, exc: RpcCallError) -> bool:
        """A refused token: a UsageError at start; once running, the worker stops (exit 2).
        Whether the manager refuses it."""
        if exc.code != rpc.UNAUTHORIZED:
            return self._refused is not None
        if self._sup is None:
            raise UsageError(f"the manager refused this worker's token: {exc.message}") from None
        if self._refused is None:
            self._refused = exc.message
            log.error("the manager refuses this worker's token now (%s): it stops", exc.message)
            self.stop()
        return True

    # -- allocation ---------------------------------------------------------------------------

    def _pool(self, children: Sequence[ChildStats] | None = None) -> list[ChildStats]:
        """The children whose slots a pulled job takes (as they are now, when not given)."""
        children = self.supervisor.statistics().children if children is None else children
        return [c for c in children if c.stage in SLOT_STAGES]

    async def _forward_supervisor_changes(self, sup: Supervisor) -> None:
        while True:
            await sup.wait_changed()
            self.touch()

    async def _allocate_loop(self) -> None:
        backoff = Backoff(self.settings.retry_base, self.settings.retry_cap)
        while not self.stopping:
            # Before each pull: split vanilla children may take jobs no SNARK child can finish.
            children = self.supervisor.statistics().children
            states = [(c.name, c.stage, c.state, c.last_exit) for c in children]
            if (dead := no_child_can_prove(states)) is not None:
                self._dead = dead
                log.error("%s; the worker stops", dead)
                self.stop()
                break
            ready = ready_slots_of(children)
            free = free_slots(ready, len(self.held), self.settings.max_jobs)
            want = jobs_to_ask(self.api, free)
            until = max(self._idle_until, self._breaker.paused_until, self._unproved.until)
            if want == 0 or trio.current_time() < until:
                changed = self._changed
                with trio.move_on_at(until if want else math.inf):
                    await changed.wait()
                if want and trio.current_time() >= self._idle_until:
                    self._idle_until = -math.inf
                continue
            assert self.name is not None
            method, params = allocate_params(
                self.api,
                self.settings.allowed_miners,
                self.settings.allowed_proof_types,
                want,
                self.name,
            )
            # One call at a time, and none while the last one's result is unknown: the manager
            # may have given us jobs in a call whose answer was lost (they time out there).
            try:
                # Each entry read apart: one that is no job loses none of the others. `null` or
                # no `result` is no list: a protocol error (no manager sends it for no job).
                self.allocating = True
                try:
                    got = await self._calls.call(method, *params, result_type=list[Any])
                finally:
                    self.allocating = False
            except RpcCallError as exc:
                self.answered()
                self.refused_token(exc)
                why = str(exc)
                if failure_of(self.api, exc.code) is Failure.NO_METHOD:
                    if self.api is Api.DEXT:
                        log.info("the manager has no Dext.* methods (a damocles-manager): one job"
                                 " per call with Venus.WdPoStAllocateJobs, no leases")  # fmt: skip
                        self.api = Api.VENUS
                        continue
                    why += f": {NO_WORKER_PROVER}"
                self._unreachable(why, self._refusals)
                self._idle(min(backoff.next_delay(), self.settings.idle_poll))  # as when idle
                continue
            except RpcClientError as exc:  # no answer, or not JSON-RPC (a proxy's 502): said once
                self.unanswered(exc)
                await self.retry_wait(backoff.next_delay(), until_stopped=True)
                continue
            self.answered(self._outage, self._refusals)
            self.heard_clock(self._calls.answer_clock)  # (before its jobs' deadlines are read)
            backoff.reset()
            self.counters.allocations += 1
            # Asked again at once only after a full answer with a new job: a job given again
            # (held here) fills no slot, but the manager counted it (the slots it left free are
            # asked for now); an answer with no new job is waited after, or a manager that keeps
            # giving the same job would be asked for ever at full speed.
            jobs, bad, first_bad = read_answer(got)
            if bad:  # one line for the answer (it may hold thousands)
                log.error("%s", no_jobs_line(self.manager_url, bad, first_bad))
            jobs, twice = one_per_job(jobs)  # (a job given twice in it: proved once)
            if twice:
                log.warning("%s", given_twice_line(self.manager_url, twice))
            if len(got) > want and not self._over_allocated:  # once while answers go on so
                log.warning("the manager at %s gave %d entries where %d job(s) were asked: the %d"
                            " job(s) among them are all taken, the extra ones waiting here for a"
                            " slot (their heartbeats sent meanwhile)", self.manager_url, len(got),
                            want, len(jobs))  # fmt: skip
            self._over_allocated = len(got) > want
            new = [h for job, problem in jobs if (h := self._take(job, problem)) is not None]
            if taken := len(new):  # (its jobs all failed before a prover: waited after, _release)
                slots = free_slots(ready, 0, self.settings.max_jobs)
                self._unproved.burst = max(UNPROVED_BURST, 2 * slots)
                number = self._unproved.round(taken)
                for h in new:
                    h.round = number
            self.counters.empty_allocations += not taken  # (waited after, as an empty one)
            if not taken or len(got) < want:  # (want > 0 here; taken <= len(got))
                self._idle(self.settings.idle_poll)
            self.touch()

    def paused(self, now_unix: float | None = None) -> Pause | None:
        """The pause in force (no job is asked for before its `until_unix`), or None. Read from
        any thread (the metrics, on theirs)."""
        untils = {PROVER_FAILURES: self._breaker.paused_until, UNPROVED_JOBS: self._unproved.until}
        now = self._clock() if now_unix is None else now_unix
        return pause_in_force(list(self.pause_of.values()), untils, now)

    def _paused(self, reason: str, why: str, until: float) -> None:
        """A pause of `reason` until `until` (trio time) begins, said by `why`."""
        unix = self._clock() + (until - trio.current_time())
        self.pause_of[reason] = Pause(reason, why, until, unix)

    def _idle(self, seconds: float) -> None:  # ask again then, or when one of our jobs ends
        self._idle_until = trio.current_time() + seconds

    async def retry_wait(self, seconds: float, *, until_stopped: bool = False) -> None:
        """Wait `seconds` before calling the manager again, less when it comes back meanwhile
        from an outage in which a call could not connect (it was down, not slow), or when its
        heartbeats or allocations are answered again after failing (its job store was down):
        the call goes at once, not up to the backoff's cap later. `until_stopped`: a stop ends
        the wait too."""
        back = self._comebacks
        with trio.move_on_after(seconds):
            await self.wait_for(
                lambda: self._comebacks != back or (until_stopped and self.stopping)
            )

    def _take(self, job: PulledJob, problem: str | None) -> HeldJob | None:
        """Hold `job` (failing it if `problem`: its input cannot be read) if it is a new one:
        its HeldJob then, else None."""
        now = self._clock()
        if (had := self.held.get(job.Id)) is not None:
            how = given_again(had, job, now) if problem is None else SAME
            if how == ADOPTED:
                had.log.warning("job %s: given again (try %d): its lease had lapsed; the work"
                                " on it goes on under the new one", job.Id, job.TryNum)  # fmt: skip
                self.counters.pulled += 1
                self.touch()
                return None
            if how == SAME and had.stop_reason is None:
                had.log.warning("job %s: given again while this worker holds it; ignored", job.Id)
                return None
            self.stop_job(job.Id, "reset", "reset: given to this worker afresh (try 1)")
        held = HeldJob(job, now, state="proving" if problem is None else "finishing")
        self.held[job.Id] = held
        self.counters.pulled += 1  # (unreadable too: it is failed, and counted delivered)
        if problem is not None:
            held.log.error("job %s: its input cannot be read (%s); failing it", job.Id, problem)
            self._nursery.start_soon(self._fail, held, f"unreadable job input: {problem}")
            return held
        held.log.info("job %s: pulled (miner %d, deadline %d, partitions %s, %d sectors, try %d)",
                      job.Id, job.Input.MinerId, job.DeadlineIdx,
                      format_partitions(job.Partitions),  # as `wdpost list` shows them
                      len(job.Input.Sectors or ()), job.TryNum)  # fmt: skip
        self._nursery.start_soon(self._prove, held)
        return held

    # -- one job ------------------------------------------------------------------------------

    async def _prove(self, held: HeldJob) -> None:
        output = None  # (none if the manager's stop cancelled the proof)
        # One scope for the proof and the delivery: the manager's stop cancels either.
        with held.scope:
            output, error = await proof_of(self, held, self._look_limiters)
            failed, now = held.prover_failed, trio.current_time()
            if not self.stopping and (pause := self._breaker.outcome(failed, now, error)):
                self.counters.pauses += 1  # prover failures in a row: no job for a while
                self._paused(PROVER_FAILURES, pause, self._breaker.paused_until)
                log.error("%s", pause)
            held.state, held.error = "finishing", error
            self.touch()
            job = held.job
            if (
                error
                and job.Lease is not None
                and deadline_reached(self.deadline_of(job), self._clock())
            ):
                # Our coordinator refuses any finish after the deadline and cancels the job: a
                # call to be refused, logged as a result given up, would only mislead. The
                # deadline is read on the coordinator's clock (`deadline_of`): this is its
                # deadline, or less than a second before it, and it cancels the job then.
                self.counters.given_up += 1
                held.log.warning("job %s: no proof before its deadline; nothing to deliver"
                                 " (the coordinator cancels the job at its deadline)",
                                 job.Id)  # fmt: skip
            else:
                await deliver(self, self._calls, held, output, error)
        self._release(held)
        if output is not None and output.faults and held.delivered and not self.stopping:
            await say_faults_seen(held, output.faults, self._fault_look_threads, self._fault_looks)
            self.touch()

    async def _fail(self, held: HeldJob, error: str) -> None:
        held.error = error
        with held.scope:
            await deliver(self, self._calls, held, None, error)
        self._release(held)

    # What a job's proof and delivery see of the worker (worker_jobs.Proving), besides its
    # public names.

    def prover_reached(self) -> None:
        if (line := self._unproved.reached(trio.current_time())) is not None:
            log.info("%s", line)

    def unanswered(self, exc: RpcClientError) -> None:  # no answer, or a proxy's 502 (said once)
        self._unreachable(str(exc), connect=manager_down(exc))

    def _release(self, held: HeldJob) -> None:
        if self.held.get(held.job.Id) is held:
            del self.held[held.job.Id]
        self.deferred_stops.pop(held.job.Id, None)
        # A slot is free: ask at once, no pause between jobs; unless the round that brought
        # the job ends with it, all its jobs failed before a prover ran, and the spell's burst
        # of such rounds is used up (worker_rules.UnprovedRounds: its own `until`, which a
        # release never lowers).
        unheld = not held.reached_prover and held.stop_reason is None  # (no prover, not stopped)
        why, now = f"job {held.job.Id}: {held.error}", trio.current_time()
        before = self._unproved.until
        line = self._unproved.ended(
            held.round, now, unproved=unheld and bool(held.error), why=why,
            url=self.manager_url, answered=unheld and not held.error, stopping=self.stopping,
        )  # fmt: skip
        if (until := self._unproved.until) > before:  # a wait begins (or grows)
            self.counters.unproved_pauses += 1
            wait = until - now
            paused = UNPROVED_PAUSED.format(n=self._unproved.spell, why=why, wait=wait)
            self._paused(UNPROVED_JOBS, paused, until)
        if line is not None:  # (a spell begun; or ended by a job's faults, or by a quiet stretch)
            log.log(logging.WARNING if self._unproved.said else logging.INFO, "%s", line)
        self._idle_until = -math.inf
        self.touch()

    def stop_job(self, job_id: str, reason: str, why: str) -> None:
        held = self.held.get(job_id)
        if held is None or held.stop_reason is not None:
            return
        held.stop_reason = why
        self.counters.count_stop(reason)
        done = held.state == "finishing"  # its result dropped, not only a proof cancelled
        held.log.log(logging.ERROR if done else logging.WARNING, "%s", taken_back_line(held, why))
        held.scope.cancel()
        self.touch()

    # -- heartbeats and pings -----------------------------------------------------------------

    # What the ping loop sees of the worker (worker_ping.Pinging), besides its public names.

    def slots(self) -> int:
        capacity = runnable_capacity([(c.capacity, c.locks) for c in self._pool()])
        return free_slots(capacity, 0, self.settings.max_jobs)

    def children_down(self) -> int:  # the SNARK children too: a GPU down is an error to show
        stages = child_stages("window_post")
        children = self.supervisor.statistics().children
        return sum(c.stage in stages and c.state not in UP for c in children)

    # What the heartbeats see of the worker (worker_beats.Beating), besides its public names.

    def now(self) -> float:
        return self._clock()

    def heard_clock(self, clock: AnswerClock | None) -> None:  # (pings, allocations, beats)
        self.clock_offset = manager_offset(clock, self._clock(), self.clock_offset)

    def deadline_of(self, job: PulledJob) -> float | None:
        """The job's deadline (its NotAfter, on the manager's clock) on this machine's clock,
        or None: it is compared with this clock, and is the supervisor's deadline."""
        return None if job.NotAfter is None else job.NotAfter - self.clock_offset

    def manager_unreachable(self, what: str) -> None:  # a call could not connect (or a 502)
        self._unreachable(what, connect=True)

    def beats_failed(self, what: str) -> None:  # sent and not answered, or failed by the manager
        self._unreachable(what, self._beats_failing)

    def beats_answered(self) -> None:
        self.answered(self._beats_failing)
        self.heard()
        self.touch()

    def beats_idle(self) -> None:
        self._beats_failing.idle(trio.current_time())

    # -- the manager's reachability, and its heartbeats' ----------------------------------------
    # Apart: a heartbeat sent and not answered (no answer in time, cut, a proxy's 502) is judged
    # by the heartbeats' outage alone. A manager whose heartbeat handler is stuck while its other
    # calls answer made the log alternate "unreachable" / "answers again"; the calls that begin
    # the manager's outage (allocations, finishes) go on until answered, and so end it. But a
    # heartbeat or a ping that cannot connect (refused, unreachable, DNS) is the manager's
    # outage: a worker whose slots all prove sends nothing else, and would never show it; such
    # an outage, or one during which a call could not connect (the manager went down, it is not
    # stuck), is ended by any whole answer, a heartbeat's or a ping's too (`heard`). Which it
    # was is the outage's own (Outage.unconnected), forgotten when it ends.

    def _unreachable(
        self, what: str, outage: Outage | None = None, *, connect: bool = False
    ) -> None:
        line = (outage or self._outage).failed(trio.current_time(), what, connect=connect)
        if line is not None:
            log.warning("%s", line)
            self.touch()  # (manager_reachable may have changed)

    def heard(self) -> None:
        """A heartbeat or a ping got a whole answer (or a JSON-RPC error): the manager's outage
        ends if a call could not connect during it (else only an allocation or a finish ends
        it; Outage.heard)."""
        if (line := self._outage.heard(trio.current_time())) is not None:
            log.info("%s", line)
            self._came_back()

    def answered(self, *outages: Outage) -> None:  # (a JSON-RPC error too; default: the manager's)
        for outage in outages or (self._outage,):
            # Back: the manager, from an outage in which a call could not connect (down, not
            # slow); or its heartbeats or allocations, after failing (its job store was down,
            # and the finishes failed on it too): the results waiting go now.
            was_down = outage is not self._outage or outage.unconnected
            if (line := outage.answered(trio.current_time())) is not None:
                log.info("%s", line)
                if was_down:
                    self._came_back()
                else:
                    self.touch()

    def _came_back(self) -> None:
        """The manager answers again after an outage in which it could not be reached, or its
        heartbeats or allocations are answered again after failing: the calls waiting out their
        backoff (`retry_wait`) go now."""
        self._comebacks += 1
        self.touch()

    # -- shutdown -----------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Stopping: proofs running get the grace; the rest are cancelled and left to the
        manager's heartbeat timeout; results being delivered get the grace again."""
        grace = self.settings.shutdown_grace
        with trio.move_on_after(grace):
            await self.wait_for(lambda: not any(h.state == "proving" for h in self.held.values()))
        proving = [h for h in self.held.values() if h.state == "proving"]
        if proving:
            log.warning(
                "stopping: %d proofs did not finish within %g s and are cancelled; the manager"
                " gives their jobs to another worker after its heartbeat timeout: %s",
                len(proving),
                grace,
                ", ".join(h.job.Id for h in proving),
            )
            for h in proving:
                h.stop_reason = "the worker is stopping"
                h.scope.cancel()
        with trio.move_on_after(grace):
            await self.wait_for(lambda: not self.held)
        if self.held:
            log.error(
                "stopping: the results of %d jobs could not be delivered within %g s and are"
                " lost: %s",
                len(self.held),
                grace,
                ", ".join(self.held),
            )
            for h in list(self.held.values()):
                h.scope.cancel()
