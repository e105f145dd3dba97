"""Built-in test provers: `echo` and `sleep`, the supervisor's test workhorses.

Registered through the `damocles_ext` entry point `testing`, exactly as a third-party plugin is.
Both serve both stages and answer with a deterministic output derived from the task, so a test
can check that the answer belongs to its request:

    proofs = [sha256(seed || miner_id as 8 little-endian bytes || sector ids as 8 LE bytes each)]

`sleep` options (`PluginOptions`, or `--option K=V` to `damocles-ext child`):

    seconds            float >= 0, default 1: how long each request works
    fail               never (default) | always | every:N (each Nth request of this child) |
                       crash (os._exit(3) half-way through a request) |
                       hang (ignores cancel, never answers, stops reporting progress)
    progress_interval  float > 0, default 0.5: seconds between progress reports and cancel checks
    load_delay         float >= 0, default 0: seconds the factory takes (delays the ready message)
    load_fail          bool, default false: the factory raises (the child exits 2 before ready)
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from damocles_ext.hookspecs import CancelToken, Options, ProgressCallback, ProverSpec, hookimpl
from damocles_ext.stages import STAGES  # the PoSt stages and the split WindowPoSt steps

if TYPE_CHECKING:
    from damocles_ext import tasks
    from damocles_ext.tasks import Output, Task
else:
    tasks = None  # imported by the first echo_output


def echo_proof(task: Task) -> bytes:
    """The one proof `echo` and `sleep` return for `task` (tests recompute it)."""
    h = hashlib.sha256()
    h.update(bytes(task.seed))
    h.update(int(task.miner_id).to_bytes(8, "little"))
    for replica in task.replicas:
        h.update(int(replica.sector_id).to_bytes(8, "little"))
    return h.digest()


def _import_tasks() -> None:
    """Import the task types when first needed: not at module level (listing the plugins stays
    light), nor per call (an import statement costs a call into importlib each time)."""
    global tasks
    from damocles_ext import tasks


def echo_output(task: Task) -> Output:
    """The output `echo` returns for `task`: one proof, no faults. A split WindowPoSt's steps
    answer with that proof as the vanilla proof, then as the proof: the joined answer is a whole
    WindowPoSt's."""
    if tasks is None:
        _import_tasks()
    t = tasks
    if isinstance(task, t.WindowPoSt):
        return t.WindowPoStOutput(proofs=[echo_proof(task)], faults=[])
    if isinstance(task, t.WindowPoStVanilla):
        return t.WindowPoStVanillaOutput(vanilla_proofs=[echo_proof(task)], faults=[])
    if isinstance(task, t.WindowPoStSnark):
        if list(task.vanilla_proofs) != [echo_proof(task)]:
            raise ValueError("window_post_snark: the vanilla proofs are not this task's")
        return t.WindowPoStSnarkOutput(proofs=[echo_proof(task)])
    return t.WinningPoStOutput(proofs=[echo_proof(task)])


class EchoProver:
    name = "echo"
    stages = STAGES
    version = "1"

    def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output:
        cancel.check()
        return echo_output(task)


def _no_options(name: str):
    def validate(options: Options) -> list[str]:
        return [
            f"{name}: unknown option {key!r}; {name} takes no options" for key in sorted(options)
        ]

    return validate


MAX_SECONDS = 86400.0


def _number(
    options: Options,
    key: str,
    default: float,
    minimum: float,
    problems: list[str],
    strict: bool = False,
) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"sleep: option {key!r} must be a number, got {value!r}")
        return default
    if value < minimum or (strict and value == minimum) or math.isnan(value):
        bound = ">" if strict else ">="
        problems.append(f"sleep: option {key!r} must be {bound} {minimum}, got {value!r}")
        return default
    if value > MAX_SECONDS:  # a day is more than any test needs; 1e308 overflowed at each request
        problems.append(f"sleep: option {key!r} must be at most {MAX_SECONDS:g}, got {value!r}")
        return default
    return float(value)


class SleepConfig:
    __slots__ = ("every", "fail", "load_delay", "load_fail", "progress_interval", "seconds")

    def __init__(self, options: Options, problems: list[str]) -> None:
        known = {"seconds", "fail", "progress_interval", "load_delay", "load_fail"}
        for key in sorted(set(options) - known):
            problems.append(
                f"sleep: unknown option {key!r}; known options: {', '.join(sorted(known))}"
            )
        self.seconds = _number(options, "seconds", 1.0, 0.0, problems)
        self.progress_interval = _number(options, "progress_interval", 0.5, 0.0, problems, True)
        self.load_delay = _number(options, "load_delay", 0.0, 0.0, problems)
        load_fail = options.get("load_fail", False)
        if not isinstance(load_fail, bool):
            problems.append(f"sleep: option 'load_fail' must be true or false, got {load_fail!r}")
            load_fail = False
        self.load_fail = load_fail
        fail = str(options.get("fail", "never"))
        self.every = 0
        if fail.startswith("every:"):
            try:
                self.every = int(fail[len("every:") :])
            except ValueError:
                self.every = 0
            if self.every < 1:
                problems.append(f"sleep: option 'fail' = {fail!r}: N in every:N must be >= 1")
        elif fail not in ("never", "always", "crash", "hang"):
            problems.append(
                f"sleep: option 'fail' = {fail!r} is not one of never, always, every:N, crash, hang"
            )
        self.fail = fail


class SleepProver:
    name = "sleep"
    stages = STAGES
    version = "1"

    def __init__(self, config: SleepConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._count = 0

    def prove(self, task: Task, progress: ProgressCallback, cancel: CancelToken) -> Output:
        cfg = self.config
        with self._lock:
            self._count += 1
            number = self._count
        if cfg.fail == "hang":
            progress("hang", 0, 1)
            threading.Event().wait()  # never set: ignores cancel on purpose
        steps = max(1, math.ceil(cfg.seconds / cfg.progress_interval)) if cfg.seconds else 0
        crash_at = steps // 2 if cfg.fail == "crash" else -1
        start = time.monotonic()
        for step in range(steps):
            progress("sleep", step, steps)
            if step == crash_at:
                os._exit(3)
            # Sleep to the step's scheduled end so drift does not accumulate.
            remaining = start + min(cfg.seconds, (step + 1) * cfg.progress_interval)
            cancel.wait(max(0.0, remaining - time.monotonic()))
            cancel.check()
        if cfg.fail == "crash":  # seconds=0: no loop ran
            os._exit(3)
        progress("sleep", steps, steps)
        if cfg.fail == "always" or (cfg.every and number % cfg.every == 0):
            raise RuntimeError(
                f"sleep prover failing as configured (fail={cfg.fail}, request "
                f"#{number} of this child)"
            )
        return echo_output(task)


def _validate_sleep(options: Options) -> list[str]:
    problems: list[str] = []
    SleepConfig(options, problems)
    return problems


def _make_sleep(options: Options) -> SleepProver:
    problems: list[str] = []
    config = SleepConfig(options, problems)
    if problems:
        raise ValueError("; ".join(problems))
    if config.load_delay:
        time.sleep(config.load_delay)
    if config.load_fail:
        raise RuntimeError("sleep prover failing to load as configured (load_fail=true)")
    return SleepProver(config)


@hookimpl
def dext_provers() -> list[ProverSpec]:
    return [
        ProverSpec(
            name="echo",
            stages=STAGES,
            description="answers at once with sha256(seed, miner, sectors) as the only proof",
            factory=lambda options: EchoProver(),
            validate_options=_no_options("echo"),
        ),
        ProverSpec(
            name="sleep",
            stages=STAGES,
            description="works `seconds` per request with progress and cancel; can fail, crash "
            "or hang on purpose",
            factory=_make_sleep,
            validate_options=_validate_sleep,
        ),
    ]
