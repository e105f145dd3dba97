"""The status document of a running supervisor (`damocles-ext status`), and its table.

The document is versioned (`"schema": "damocles-ext/status/1"`, every field is described in
docs/STATUS.md): fields may be added within a schema version, never renamed, removed or given
another meaning. It is built inside `damocles-ext run` from `Supervisor.statistics()` (states,
counters, queues, the scheduler's locks), psutil (memory and CPU of each child's whole process
tree, and of the supervisor process alone) and bellperson's lock files in each child's TMPDIR
(`gpulock.lock_state`).

Process trees are read in a worker thread: walking /proc is a few milliseconds of blocking
system calls the supervisor's trio thread should not wait for. CPU% needs two readings; they
are `cpu_interval` seconds apart (0.25 s by default), so a status request takes that long.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

# (Not imported when first asked: a status at the limit of open files could not read them.)
from .errors import DextError
from .gpulock import lock_dir, lock_state
from .jobs.worker_status import WorkerPart, render_worker
from .logs import controls_escaped
from .protocol.control import STATUS_SCHEMA
from .threads import NoThreadError, run_in_thread

if TYPE_CHECKING:
    from .supervisor import ChildStats, Supervisor, SupervisorStats

SCHEMA = STATUS_SCHEMA
DEFAULT_CPU_INTERVAL = 0.25


class LockFiles(msgspec.Struct, frozen=True):
    """bellperson's lock files in a child's TMPDIR: held (True), free (False), absent (None).

    `problems` says why a file was not probed (then its field is None): e.g. a FIFO someone put
    under that name in /tmp, which is reported, never opened.
    """

    dir: str
    gpu: bool | None
    priority: bool | None
    problems: list[str] = []


class Exiting(msgspec.Struct, frozen=True):
    """A process of a child killed and not exited yet, and the locks held for it until it is."""

    pid: int | None
    locks: list[str]
    since: float  # unix seconds: when it went down
    since_in: float  # `since - time` (negative)


class ChildStatus(msgspec.Struct, frozen=True):
    """One child (see docs/STATUS.md for every field)."""

    name: str
    stage: str
    index: int
    pid: int | None
    gpu: str | None
    state: str
    next_start_in: float | None
    in_flight: int
    capacity: int
    done: int
    failed: int
    restarts: int
    last_exit: str | None
    started_at: float | None
    uptime: float | None
    protocol: str | None
    processes: int | None
    rss_bytes: int | None
    cpu_percent: float | None
    locks: list[str]
    locks_held: list[str]
    lock_files: LockFiles | None
    benched_for: float | None = None  # absent from a supervisor older than the breaker
    on_probation: bool = False  # (idem)
    exiting: list[Exiting] = []  # absent from a supervisor older than it


class StageStatus(msgspec.Struct, frozen=True):
    """One stage: its queue and its children taken together."""

    stage: str
    queued: int
    nearest_deadline: float | None
    nearest_deadline_in: float | None
    waiting_for_lock: list[str]
    children: int
    ready: int
    in_flight: int
    capacity: int


class SupervisorStatus(msgspec.Struct, frozen=True):
    """The supervisor process itself."""

    pid: int
    version: str
    started_at: float
    uptime: float
    requests: int
    shutting_down: bool
    socket: str | None
    metrics: str | None
    rss_bytes: int | None
    cpu_percent: float | None


class StatusDocument(msgspec.Struct, frozen=True):
    """What `damocles-ext status --json` prints."""

    schema: str
    time: float
    supervisor: SupervisorStatus
    children: list[ChildStatus]
    stages: list[StageStatus]
    worker: WorkerPart | None = None  # `damocles-ext worker`'s part; None from `run`


class StatusError(Exception):
    """A status reply this version cannot read (another schema, a malformed document)."""


def parse_document(data: Mapping[str, Any]) -> StatusDocument:
    """Validate plain data (a StatusReply's `status`) as a status document; StatusError if not."""
    schema = data.get("schema") if isinstance(data, Mapping) else None
    if schema != SCHEMA:
        raise StatusError(
            f"the supervisor sent a status document of schema {schema!r}; this damocles-ext"
            f" reads {SCHEMA!r} (run the same version of damocles-ext as the supervisor)"
        )
    try:
        return msgspec.convert(data, StatusDocument)
    except msgspec.ValidationError as exc:
        raise StatusError(f"malformed status document from the supervisor: {exc}") from None


def to_json(doc: StatusDocument) -> bytes:
    """The document as indented JSON, ending with a newline."""
    return msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n"


# -- process trees ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeSample:
    """A process tree at one moment: CPU seconds so far, resident memory, process count."""

    cpu_seconds: float
    rss_bytes: int
    processes: int
    taken: float  # time.monotonic()


def _children_map() -> dict[int, list[int]]:
    """{ppid: [pid, ...]} of every process, from /proc/PID/stat.

    Read directly rather than through psutil.process_iter: a scrape walks every process on the
    host, and psutil's per-process objects and pid-reuse checks make that several times slower.
    """
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{entry.name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # it exited
        try:
            data = os.read(fd, 4096)  # the whole line: a few hundred bytes
        except OSError:
            continue
        finally:
            os.close(fd)
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ')'
        fields = data[data.rfind(b")") + 2 :].split(b" ", 2)
        try:
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
        except (IndexError, ValueError):
            continue
    return kids


def sample_trees(roots: Mapping[str, int]) -> dict[str, TreeSample]:
    """Sample the process tree under each root pid (key: any name); gone roots are left out.

    CPU seconds of a tree are user + system time of its live processes plus the time of the
    children they reaped, so a grandchild that exits does not make the sum go back.
    """

    if not roots:
        return {}
    kids = _children_map()
    out: dict[str, TreeSample] = {}
    for name, root in roots.items():
        cpu = 0.0
        rss = 0
        count = 0
        stack = [root]
        seen: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            got = _read_process(pid)
            if got is None:
                if pid == root:
                    break
                continue
            cpu += got[0] + got[1]
            rss += got[2]
            count += 1
            stack.extend(kids.get(pid, ()))
        if count:
            out[name] = TreeSample(cpu, rss, count, time.monotonic())
    return out


def sample_process(pid: int) -> TreeSample | None:
    """One process alone, without its descendants; None if it is gone.

    For the supervisor itself: its tree holds the children, whose memory and CPU are reported
    per child, and its reaped-children CPU time holds every child process that ever ended.
    """
    got = _read_process(pid)
    return None if got is None else TreeSample(got[0], got[2], 1, time.monotonic())


def _read_process(pid: int) -> tuple[float, float, int] | None:
    """(own CPU seconds, CPU seconds of the children it reaped, RSS bytes); None if gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            t = proc.cpu_times()
            mem = proc.memory_info()
    except psutil.Error:
        return None
    return t.user + t.system, t.children_user + t.children_system, mem.rss


def cpu_percent(before: TreeSample | None, after: TreeSample | None) -> float | None:
    """CPU use between two samples, in percent of one core (None without both)."""
    if before is None or after is None:
        return None
    wall = after.taken - before.taken
    if wall <= 0:
        return None
    return round(max(0.0, after.cpu_seconds - before.cpu_seconds) / wall * 100.0, 1)


def measure(
    roots: Mapping[str, int],
    lock_dirs: Mapping[str, str],
    interval: float,
    own_pid: int | None = None,
) -> tuple[dict[str, TreeSample], dict[str, float | None], dict[str, LockFiles]]:
    """Blocking: two tree samples `interval` apart (CPU%), and the lock files of each dir.

    With `own_pid`, that process alone (sample_process) is measured too, under the key "".
    """

    def sample() -> dict[str, TreeSample]:
        trees = sample_trees(roots)
        own = sample_process(own_pid) if own_pid is not None else None
        if own is not None:
            trees[""] = own
        return trees

    first = sample()
    if interval > 0:
        time.sleep(interval)  # the measuring window of CPU%, in a worker thread
    second = sample()
    cpu = {name: cpu_percent(first.get(name), second.get(name)) for name in second}
    locks = {}
    for name, directory in lock_dirs.items():
        try:
            state = lock_state(directory)
        except OSError:
            continue  # unreadable: say nothing rather than something wrong
        # A string is why that file was not probed: null in its field, said in `problems`.
        problems = [v for v in state.values() if isinstance(v, str)]
        known = {k: None if isinstance(v, str) else v for k, v in state.items()}
        locks[name] = LockFiles(directory, known["gpu"], known["priority"], problems)
    return second, cpu, locks


# -- building the document ----------------------------------------------------------------------


def child_lock_dir(tmpdir: str | None) -> str:
    """Where a child's bellperson keeps its lock files: the TMPDIR it runs with (ChildStats'
    tmpdir: its Envs', else the supervisor's unless InheritEnvs = false), else /tmp."""
    return str(lock_dir({"TMPDIR": tmpdir} if tmpdir else {}))


def assemble(
    stats: SupervisorStats,
    trees: Mapping[str, TreeSample],
    cpu: Mapping[str, float | None],
    lock_files: Mapping[str, LockFiles],
    *,
    now: float,
    supervisor_started: float,
    socket: str | None = None,
    metrics: str | None = None,
    pid: int | None = None,
) -> StatusDocument:
    """The document from a SupervisorStats and the measurements (keys: child names, "")."""
    from . import __version__

    children = []
    per_stage: dict[str, list[ChildStats]] = {}
    for c in stats.children:
        tree = trees.get(c.name) if c.pid is not None else None
        children.append(
            ChildStatus(
                name=c.name,
                stage=c.stage,
                index=c.index,
                pid=c.pid,
                gpu=c.gpu,
                state=c.state,
                next_start_in=None if c.next_start_in is None else round(c.next_start_in, 3),
                in_flight=c.in_flight,
                capacity=c.capacity,
                done=c.done,
                failed=c.failed,
                restarts=c.restarts,
                last_exit=c.last_exit,
                started_at=c.started_at,
                uptime=(
                    round(max(0.0, now - c.started_at), 3)
                    if c.pid is not None and c.started_at is not None
                    else None
                ),
                protocol=c.protocol,
                processes=tree.processes if tree else None,
                rss_bytes=tree.rss_bytes if tree else None,
                cpu_percent=cpu.get(c.name) if tree else None,
                locks=list(getattr(c, "locks", ())),
                locks_held=list(getattr(c, "locks_held", ())),
                lock_files=lock_files.get(c.name),
                benched_for=None if c.benched_for is None else round(c.benched_for, 3),
                on_probation=c.on_probation,
                exiting=[
                    Exiting(e.pid, list(e.locks), e.since, round(e.since - now, 3))
                    for e in getattr(c, "exiting", ())
                ],
            )
        )
        per_stage.setdefault(c.stage, []).append(c)
    stages = []
    for name, s in sorted(stats.stages.items()):
        members = per_stage.get(name, [])
        stages.append(
            StageStatus(
                stage=name,
                queued=s.queued,
                nearest_deadline=s.nearest_deadline,
                nearest_deadline_in=(
                    None if s.nearest_deadline is None else round(s.nearest_deadline - now, 3)
                ),
                waiting_for_lock=list(getattr(s, "waiting_for_lock", ())),
                children=len(members),
                ready=sum(1 for c in members if c.state in ("ready", "busy")),
                in_flight=sum(c.in_flight for c in members),
                capacity=sum(c.capacity for c in members),
            )
        )
    own = trees.get("")
    return StatusDocument(
        schema=SCHEMA,
        time=now,
        supervisor=SupervisorStatus(
            pid=os.getpid() if pid is None else pid,
            version=__version__,
            started_at=supervisor_started,
            uptime=round(max(0.0, now - supervisor_started), 3),
            requests=stats.requests,
            shutting_down=stats.shutting_down,
            socket=socket,
            metrics=metrics,
            rss_bytes=own.rss_bytes if own else None,
            cpu_percent=cpu.get("") if own else None,
        ),
        children=children,
        stages=stages,
    )


class StatusSource:
    """Builds status documents for one supervisor (what `run`'s control socket answers with)."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        socket: str | None = None,
        metrics: Callable[[], str | None] | None = None,
        cpu_interval: float = DEFAULT_CPU_INTERVAL,
    ) -> None:
        import psutil

        self.supervisor = supervisor
        self.socket = socket
        self._metrics = metrics
        self.cpu_interval = cpu_interval
        self.started_at = psutil.Process().create_time()

    async def document(self) -> StatusDocument:
        """A fresh document; takes about `cpu_interval` seconds (the CPU% window).
        NoThreadError when no thread can be started to measure the children."""
        stats = self.supervisor.statistics()
        roots = {c.name: c.pid for c in stats.children if c.pid is not None}
        lock_dirs = {c.name: child_lock_dir(getattr(c, "tmpdir", None)) for c in stats.children}
        try:
            trees, cpu, lock_files = await run_in_thread(
                measure, roots, lock_dirs, self.cpu_interval, os.getpid()
            )
        except NoThreadError as exc:  # at the limit of tasks: said here and to the asker
            error = NoThreadError(f"cannot measure the children for the status: {exc}")
            logging.getLogger("damocles_ext.control").warning("%s", error)
            raise error from None
        except OSError as exc:  # /proc unread: at the limit of open files, say
            from .supervisor.process import os_reason  # (loaded: a supervisor runs)

            failed = DextError(f"cannot measure the children for the status: {os_reason(exc)}")
            logging.getLogger("damocles_ext.control").warning("%s", failed)
            raise failed from None
        # Counters and states as they are at the end of the CPU window, not its start.
        stats = self.supervisor.statistics()
        return assemble(
            stats,
            trees,
            cpu,
            lock_files,
            now=time.time(),
            supervisor_started=self.started_at,
            socket=self.socket,
            metrics=self._metrics() if self._metrics else None,
        )

    async def as_data(self, **parts: Any) -> dict[str, Any]:
        """The document as plain data, for a StatusReply: paths whose bytes are not UTF-8 (a
        --socket, a TMPDIR) with those bytes as escapes (\\udcff), since the reply can only
        carry UTF-8 text. `parts` replace fields of the document (a worker's `worker`)."""
        doc = await self.document()
        if parts:
            doc = msgspec.structs.replace(doc, **parts)
        data: dict[str, Any] = reply_data(doc)
        return data


def reply_data(value: Any) -> Any:
    """`value` (a Struct of the document, or a part of it) as plain data a StatusReply carries."""
    return utf8_text(msgspec.to_builtins(value))


def utf8_text(value: Any) -> Any:
    """`value` (plain data) with each lone surrogate of its strings written as an escape."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
        return value
    if isinstance(value, dict):
        return {utf8_text(k): utf8_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [utf8_text(v) for v in value]
    return value


# -- the table ----------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """'45s', '12m30s', '2h03m', '3d04h'; '-' for None."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_bytes(n: int | None) -> str:
    """'512.0 MiB'; '-' for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable; keeps type checkers calm


def _state(c: ChildStatus) -> str:
    state = c.state
    if c.state == "backoff" and c.next_start_in is not None:
        state = f"backoff {format_duration(c.next_start_in)}"
    elif c.state == "fatal" and c.next_start_in is not None:
        state = f"fatal, retry {format_duration(c.next_start_in)}"
    if c.benched_for is not None:
        state += f", benched {format_duration(c.benched_for)}"
    elif c.on_probation:
        state += ", on probation"
    return state


def _locks(c: ChildStatus) -> str:
    parts = list(c.locks_held)
    for e in c.exiting:  # killed, not exited yet: the locks wait for it
        parts.append(
            f"{'+'.join(e.locks)} held for pid {e.pid} (down {format_duration(-e.since_in)}, not exited)"
        )
    lf = c.lock_files
    if lf is not None:
        held = [n for n, v in (("gpu", lf.gpu), ("priority", lf.priority)) if v]
        if held:
            parts.append("bellperson:" + "+".join(held))
    return ",".join(parts) or "-"


def _deadline(stage: StageStatus) -> str:
    if stage.nearest_deadline is None or stage.nearest_deadline_in is None:
        return "-"
    # Shown in the reader's local time, as the rest of the table.
    at = (
        _dt.datetime.fromtimestamp(stage.nearest_deadline, _dt.UTC)
        .astimezone()
        .strftime("%H:%M:%S")
    )
    left = stage.nearest_deadline_in
    when = f"in {format_duration(left)}" if left >= 0 else f"{format_duration(-left)} ago"
    return f"{when} ({at})"


def _table(headers: list[str], rows: Iterable[list[str]], right: set[int]) -> list[str]:
    rows = [[controls_escaped(cell) for cell in row] for row in rows]  # (a child's own words)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def render_table(doc: StatusDocument) -> str:
    """The document as `damocles-ext status` prints it for people."""
    sup = doc.supervisor
    head = (
        f"damocles-ext {sup.version}, pid {sup.pid}, up {format_duration(sup.uptime)},"
        f" {sup.requests} request{'s' if sup.requests != 1 else ''} open"
    )
    if sup.shutting_down:
        head += ", SHUTTING DOWN"
    if sup.metrics:
        head += f", metrics on {sup.metrics}"
    lines = [head, ""]
    headers = [
        "CHILD",
        "PID",
        "GPU",
        "STATE",
        "REQS",
        "DONE",
        "FAILED",
        "RESTARTS",
        "UPTIME",
        "RSS",
        "CPU%",
        "LOCKS",
    ]
    rows = []
    for c in doc.children:
        rows.append(
            [
                c.name,
                str(c.pid) if c.pid is not None else "-",
                c.gpu if c.gpu is not None else "-",
                _state(c),
                f"{c.in_flight}/{c.capacity}",
                str(c.done),
                str(c.failed),
                str(c.restarts),
                format_duration(c.uptime),
                format_bytes(c.rss_bytes),
                f"{c.cpu_percent:.1f}" if c.cpu_percent is not None else "-",
                _locks(c),
            ]
        )
    lines += _table(headers, rows, right={1, 4, 5, 6, 7, 8, 9, 10})
    exits = [c for c in doc.children if c.last_exit]
    if exits:
        lines.append("")
        lines += [f"last exit of {c.name}: {c.last_exit}" for c in exits]
    odd = [(c.name, p) for c in doc.children if c.lock_files for p in c.lock_files.problems]
    if odd:
        lines.append("")
        lines += [f"lock files of {name}: {problem}" for name, problem in odd]
    lines.append("")
    stage_rows = [
        [
            s.stage,
            f"{s.ready}/{s.children}",
            f"{s.in_flight}/{s.capacity}",
            str(s.queued),
            _deadline(s),
            ",".join(s.waiting_for_lock) or "-",
        ]
        for s in doc.stages
    ]
    lines += _table(
        ["STAGE", "READY", "REQS", "QUEUED", "NEAREST DEADLINE", "WAITING FOR"],
        stage_rows,
        right={1, 2, 3},
    )
    if doc.worker is not None:
        lines += render_worker(doc.worker, format_duration)
    # What children and managers said (a last exit, a stop reason) goes to a terminal: its
    # control characters escaped, none can move the cursor or forge a row.
    return "\n".join(controls_escaped(line) for line in lines) + "\n"
