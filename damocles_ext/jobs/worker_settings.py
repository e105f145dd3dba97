"""Everything `damocles-ext worker` is told, in one plain value.

The command builds it from its options; a reader of damocles-worker.toml builds the same value
from that file, so the worker itself never knows where its settings came from. Sans-IO: the
checks here read no file and no network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .endpoint import Endpoint, parse_endpoint
from .rpc import worker_name_problem
from .rules import DEFAULT_JOB_LIFETIME

if TYPE_CHECKING:
    from ..config import ChildSpec

#: damocles-worker's heartbeat period for a wdpost job.
DEFAULT_HEARTBEAT_INTERVAL: Final = 3.0
#: How long to wait after the manager had no job. damocles-worker's `recover_interval` defaults
#: to 60 s, and damocles' docs advise 15 s for wdpost threads: a job waits at most this long.
DEFAULT_IDLE_POLL: Final = 15.0
#: damocles-worker's `[worker] ping_interval` default: how often Venus.WorkerPing is sent.
DEFAULT_PING_INTERVAL: Final = 30.0
#: Running proofs get this long to finish after SIGTERM.
DEFAULT_SHUTDOWN_GRACE: Final = 30.0
#: The first wait before calling an unreachable manager again, and the longest.
DEFAULT_RETRY_BASE: Final = 1.0
DEFAULT_RETRY_CAP: Final = 30.0
#: A call without an answer by then counts as the manager being unreachable. Below damocles'
#: 15 s heartbeat timeout, so that one slow call does not cost a job its lease.
DEFAULT_RPC_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """The worker's inputs. `manager` is any address `endpoint.parse_endpoint` reads; `name`
    None means the address of the local interface that reaches the manager (damocles-worker's
    default); empty filters mean any miner, any proof type; `attached` maps store names (as the
    jobs carry them) to local paths."""

    manager: str
    children: tuple[ChildSpec, ...]
    name: str | None = None
    token: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    allowed_miners: tuple[int, ...] = ()
    allowed_proof_types: tuple[str, ...] = ()
    attached: Mapping[str, str] = field(default_factory=dict)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    ping_interval: float = DEFAULT_PING_INTERVAL
    idle_poll: float = DEFAULT_IDLE_POLL
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    retry_base: float = DEFAULT_RETRY_BASE
    retry_cap: float = DEFAULT_RETRY_CAP
    rpc_timeout: float = DEFAULT_RPC_TIMEOUT
    #: A result not delivered this long after its job was allocated is given up (logged): past
    #: damocles' JobLifetime the manager has forgotten the job anyway.
    result_lifetime: float = DEFAULT_JOB_LIFETIME
    #: At most this many jobs held at once (None: as many as the children have slots). From a
    #: damocles-worker.toml: one per wdpost thread, at most its window_post limit.
    max_jobs: int | None = None
    #: Where these settings came from, for messages ("the command line", a file's path).
    source: str = "the command line"

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "ping_interval", "idle_poll", "retry_base",
                     "retry_cap", "rpc_timeout", "result_lifetime"):  # fmt: skip
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{self.source}: {name} must be > 0 seconds, not {value!r}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError(f"{self.source}: max_jobs must be at least 1, not {self.max_jobs!r}")
        if self.shutdown_grace < 0:
            raise ValueError(f"{self.source}: shutdown_grace must be >= 0 seconds")
        if not self.children:
            raise ValueError(f"{self.source}: the worker has no WindowPoSt child to run jobs on")
        if (problem := worker_name_problem(self.name or "")) is not None:
            raise ValueError(f"{self.source}: {problem}; use a shorter --name")
        for name, path in self.attached.items():
            if not name or not path:
                raise ValueError(
                    f"{self.source}: an attached store needs a name and a path, got"
                    f" {name!r}={path!r}"
                )

    @property
    def endpoint(self) -> Endpoint:
        """The manager's address (ValueError naming it when it is not one)."""
        return parse_endpoint(self.manager)
