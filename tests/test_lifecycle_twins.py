"""Two request books in lockstep, one on the incremental scheduler and one on the full
recomputation, driven by seeded random events across two stages: WinningPoSt and WindowPoSt
children sharing GPU locks, Concurrent > 1 with queues offered, phases (pipelining), error and
wrong-stage answers (retries that avoid a child, the breaker), deadlines passed, near and far,
priorities at the signed 64-bit extremes, callers gone at every stage, children going down,
lost, FATAL and back, time that passes with and without the driver telling the book.

After every event: both books gave the same effects; every request is answered once; nothing
is sent to a child that is not ready; no lock is held by two live children; the scheduler holds
exactly the attempts of each live process; a request sent did not overtake one queued before
it that sorts first and could have gone to that child; no idle ready child leaves a request it
could take waiting. In the end every request is answered.
"""

from __future__ import annotations

import random

from helpers.child import window_task, winning_task

from damocles_ext.lifecycle import (
    ChildLimits,
    Kill,
    Note,
    ReportProgress,
    RequestBook,
    Resolve,
    Retry,
    Send,
    SendCancel,
)
from damocles_ext.scheduling.breaker import ChildBreaker
from damocles_ext.scheduling.policy import Scheduler
from damocles_ext.tasks import WindowPoStOutput, WinningPoStOutput

WD, WIN = "window_post", "winning_post"
OK = {WD: WindowPoStOutput(proofs=[b"p"], faults=[]), WIN: WinningPoStOutput(proofs=[b"p"])}

CONFIGS = {
    "locks": [
        ("wd0", WD, 2, {"gpu:0"}),
        ("wd1", WD, 1, {"gpu:1"}),
        ("win0", WIN, 1, {"gpu:0"}),
        ("win1", WIN, 1, {"gpu:1"}),
    ],
    "nolocks": [
        ("wd0", WD, 2, set()),
        ("wd1", WD, 1, set()),
        ("wd2", WD, 3, set()),
        ("win0", WIN, 1, set()),
        ("win1", WIN, 2, set()),
    ],
    "mixed": [
        ("wd0", WD, 1, {"gpu:0"}),
        ("wd1", WD, 2, set()),
        ("win0", WIN, 1, {"gpu:0"}),
        ("win1", WIN, 1, set()),
    ],
}


def summary(effects):
    out = []
    for e in effects:
        if isinstance(e, Send):
            out.append(("send", e.request.rid, e.child, e.child_rid))
        elif isinstance(e, Resolve):
            out.append(("resolve", e.request.rid, e.error, e.outcome))
        elif isinstance(e, Kill):
            out.append(("kill", e.child, e.reason))
        elif isinstance(e, SendCancel):
            out.append(("cancel", e.child, e.child_rid))
        elif isinstance(e, Retry):
            out.append(("retry", e.request.rid, e.what, e.attempt))
        elif isinstance(e, Note):
            out.append(("note", e.level, e.message))
        elif isinstance(e, ReportProgress):
            out.append(("progress", e.request.rid, e.phase))
    return out


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = rng = random.Random(seed)
        self.cfg = CONFIGS[rng.choice(sorted(CONFIGS))]
        self.books = []
        for incremental in (True, False):
            sched = Scheduler(
                incremental=incremental,
                quick_run=2,
                quick_answer=4.0,
                take_back_after=3.0,
                breaker=ChildBreaker(errors=2, first=4.0, longest=12.0),
            )
            self.books.append(RequestBook(sched))
        limits = {}
        for name, stage, cap, locks in self.cfg:
            limits[name] = ChildLimits(
                max_attempts=rng.randint(1, 3),
                request_timeout=rng.choice([0.0, 5.0, 20.0]),
                cancel_grace=rng.choice([0.0, 2.0, 10.0]),
                heartbeat_timeout=rng.choice([0.0, 8.0]),
                stdin_timeout=0.0,
            )
            for b in self.books:
                b.add_child(name, stage, capacity=cap, locks=locks, limits=limits[name])
        self.stage_of = {n: s for n, s, _, _ in self.cfg}
        self.locks_of = {n: locks for n, _, _, locks in self.cfg}
        self.cap = {n: c for n, _, c, _ in self.cfg}
        self.now = 0.0
        self.rid = 1
        self.up: dict[str, str] = {}
        self.pid = 0
        self.pids: dict[str, int] = {}  # each child's current process
        self.exiting: list[tuple[str, int]] = []  # processes killed or down, not reported exited
        self.protocol: dict[str, str] = {}
        self.sent: dict[str, list[int]] = {}
        self.resolved: dict[int, Resolve] = {}
        self.reqs = {}
        self.shut = False
        self.before: set[int] = set()  # requests queued before the event being told
        self.catching_up = False

    @property
    def book(self):
        return self.books[0]

    def tell(self, method, *args, **kw):
        sched = self.book.scheduler
        self.before = {
            r.rid
            for r in self.book._requests.values()
            if r.attempt_id is not None and sched.is_queued(r.attempt_id)
        }
        results = [getattr(b, method)(*args, **kw) for b in self.books]
        if method == "submit":
            results = [r[1] for r in results]
        a, b = (summary(r) for r in results)
        assert a == b, (method, args, a, b)
        self.apply(results[0], method)
        if method != "grace_over" and not self.catching_up and self.rng.random() < 0.5:
            self.catching_up = True
            try:
                for _ in range(5):
                    w = self.book.next_wakeup()
                    if w is None or w > self.now:
                        break
                    self.tell("advance", self.now)
            finally:
                self.catching_up = False

    def apply(self, effects, method):
        sends = []
        for e in effects:
            if isinstance(e, Resolve):
                rid = e.request.rid
                assert rid not in self.resolved, f"{rid} resolved twice"
                self.resolved[rid] = e
                if e.output is not None and e.request.deadline is not None:
                    assert self.now <= e.request.deadline
            elif isinstance(e, Send):
                assert e.request.rid not in self.resolved
                assert self.up.get(e.child) == "ready", (e.child, self.up.get(e.child))
                self.sent.setdefault(e.child, []).append(e.child_rid)
                sends.append(e)
            elif isinstance(e, Kill):
                if self.up.get(e.child) == "ready":
                    self.exiting.append((e.child, self.pids[e.child]))
                self.up[e.child] = "down"
        self.check(sends, method)

    def check(self, sends, method):
        book = self.book
        sched = book.scheduler
        # locks never double-held among live processes, nor with one killed and not yet exited
        kept = sched.holds.by_name
        for lock in {lock for locks in self.locks_of.values() for lock in locks}:
            holders = {hold for hold, h in kept.items() if lock in h.locks}
            for name, ls in self.locks_of.items():
                if lock in ls and self.up.get(name) == "ready" and book.in_flight(name):
                    holders.add(name)
            assert len(holders) <= 1, (lock, holders, method)
        for name in self.stage_of:
            proc = book._children[name].process
            held = set(sched.running_on(name))
            if proc is None or proc.down:
                assert not held, (name, held, method)
            else:
                ids = {a.attempt_id for a in proc.attempts.values()}
                assert held == ids, (name, held, ids, method)
        open_reqs = list(book._requests.values())
        queued = [
            r for r in open_reqs if r.attempt_id is not None and sched.is_queued(r.attempt_id)
        ]
        # EDF: a request sent now was not preferred over a queued one that sorts before it
        for s in sends:
            r = s.request
            for q in queued:
                if q.rid not in self.before:
                    continue
                if q.stage != r.stage or (q.avoid and s.child in q.avoid):
                    continue
                kq = (q.deadline if q.deadline is not None else float("inf"), -q.priority)
                kr = (r.deadline if r.deadline is not None else float("inf"), -r.priority)
                if kq < kr:
                    raise AssertionError(("overtaken", q.rid, kq, r.rid, kr, s.child, method))
        # no idle ready child while a request it could take waits
        win_waiting = any(q.stage == WIN for q in queued)
        for name, state in self.up.items():
            if state != "ready" or book.in_flight(name):
                continue
            stage = self.stage_of[name]
            if sched._children[name].pipelined:
                continue
            if sched.breaker.leaves_out(name, self.now):
                continue
            locks = self.locks_of[name]
            if any(
                other != name
                and lock in self.locks_of[other]
                and self.up.get(other) == "ready"
                and book.in_flight(other)
                for lock in locks
                for other in self.locks_of
            ):
                continue
            # held by a process going down, or gone down and not exited yet
            if any(
                other != name
                and lock in self.locks_of[other]
                and other in sched._children
                and sched._children[other].running
                for lock in locks
                for other in self.locks_of
            ) or any(lock in h.locks for h in kept.values() for lock in locks):
                continue
            if locks and stage != WIN and win_waiting:
                continue
            for q in queued:
                if q.stage == stage and not (q.avoid and name in q.avoid):
                    raise AssertionError(("idle", name, q.rid, q.avoid, method, self.now))

    def step(self):
        rng = self.rng
        r = rng.random()
        names = [n for n, *_ in self.cfg]
        if r < 0.25:
            if self.shut:
                return
            stage = rng.choice([WD, WD, WIN])
            rel = rng.choice([None, None, -1.0, 0.0, 0.5, 5.0, 30.0, 1e6])
            deadline = None if rel is None else self.now + rel
            prio = rng.choice([0, 0, 1, -1, 2**63 - 1, -(2**63)])
            miner = rng.choice([1, 2, 3])
            task = window_task(miner=miner) if stage == WD else winning_task(miner=miner)
            rid = self.rid
            self.rid += 1
            self.tell("submit", rid, task, self.now, deadline=deadline, priority=prio)
        elif r < 0.35:
            idle = [n for n in names if n not in self.up]
            if idle:
                n = rng.choice(idle)
                self.up[n] = "ready"
                self.sent[n] = []
                proto = rng.choice(["dext", "jsonl"])
                self.protocol[n] = proto
                q = rng.choice([0, 0, 2])
                self.pid += 1
                self.pids[n] = self.pid
                self.tell("child_ready", n, self.now, protocol=proto, pid=self.pid, queue=q)
        elif r < 0.39:
            live = sorted(n for n, s in self.up.items() if s == "ready")
            if live:
                n = rng.choice(live)
                self.up[n] = "down"
                exited = rng.random() < 0.3  # seen exited (reaped) first: nothing is kept
                if not exited:
                    self.exiting.append((n, self.pids[n]))
                self.tell("child_down", n, self.now, charge_all=rng.random() < 0.5, exited=exited)
        elif r < 0.41 and self.exiting:
            n, pid = self.exiting.pop(rng.randrange(len(self.exiting)))
            self.tell("child_exited", n, self.now, pid=pid)
        elif r < 0.44:
            if self.up:
                n = rng.choice(sorted(self.up))
                del self.up[n]
                self.sent.pop(n, None)
                self.tell("child_lost", n, self.now, "exited")
        elif r < 0.46:
            n = rng.choice(names)
            if n not in self.up or self.up[n] == "down":
                self.tell("child_gave_up", n, self.now, fatal=True, last_exit="exited 1")
        elif r < 0.68:
            choices = [(c, x) for c, xs in self.sent.items() for x in xs]
            if choices:
                c, x = rng.choice(sorted(choices))
                self.sent[c].remove(x)
                kind = rng.random()
                if kind < 0.6:
                    kw = {"output": OK[self.stage_of[c]]}
                elif kind < 0.9:
                    kw = {"error": "boom"}
                else:
                    kw = {"output": OK[WIN if self.stage_of[c] == WD else WD]}
                self.tell("answered", c, x, self.now, **kw)
        elif r < 0.76:
            choices = [(c, x) for c, xs in self.sent.items() for x in xs]
            if choices:
                c, x = rng.choice(sorted(choices))
                phase = rng.choice(["vanilla", "snark", "post"])
                self.tell("progress", c, x, self.now, phase=phase, done=rng.randint(0, 3), total=3)
        elif r < 0.82:
            open_ids = sorted(self.book._requests)
            if open_ids:
                self.tell("caller_gone", rng.choice(open_ids), self.now)
        elif r < 0.92:
            self.now += rng.choice([0.0, 0.3, 1.0, 3.0, 7.0])
            if rng.random() < 0.5:
                self.tell("advance", self.now)
        elif r < 0.97:
            w = self.book.next_wakeup()
            if w is not None:
                self.now = max(self.now, w)
                self.tell("advance", self.now)
        elif r < 0.9705 and not self.shut:
            self.shut = True
            self.tell("shutdown", self.now)

    def finish(self):
        self.tell("shutdown", self.now)
        for n in sorted(self.up):
            self.tell("child_lost", n, self.now, "stopped")
        self.up.clear()
        while self.exiting:  # every lock kept for a process is freed when it exits
            n, pid = self.exiting.pop()
            self.tell("child_exited", n, self.now, pid=pid)
        assert not self.book.scheduler.holds, self.book.scheduler.holds.by_name
        self.tell("grace_over", self.now + 30, 30.0)
        assert sorted(self.resolved) == list(range(1, self.rid)), set(range(1, self.rid)) - set(
            self.resolved
        )
        sizes = self.book.sizes()
        assert sizes["requests"] == sizes["attempts"] == sizes["running"] == 0, sizes
        assert sizes["queued"] == 0, sizes


def test_two_stages_sharing_locks_keep_the_books_promises_and_decide_as_the_full_recomputation():
    for seed in range(200):
        run = Run(seed)
        for _ in range(300):
            run.step()
        run.finish()
