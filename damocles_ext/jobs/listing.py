"""`wdpost list` as damocles-manager prints it (`util worker wdpost list`), character for character.

damocles writes through Go's text/tabwriter (minimum cell width 2, padding 2, spaces): every
tab-terminated cell is padded to its column's widest cell plus 2; the last cell of a line (the
error) is not. Dates are local `MM-DD hh:mm:ss`, `-` for unset; durations are Go's
`time.Duration.String()` (`6m38s`, `1h0m5s`, `2.517s`, `517ms`). Sans-IO: the jobs, the time and
the time zone come from the caller.

The rows come from the store's records, or from the briefs `Venus.WdPoStAllJobs` sends (`JobBrief`:
the input zeroed but for the miner, the output emptied, the sector and fault counts beside); damocles' own CLI
prints its table from the briefs, and both give the same table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, tzinfo
from typing import Any

import msgspec

from .model import FINISHED, READY, RUNNING, WdPoStJob, display_state

LIST_COLUMNS = ("JobID", "MinerID", "DDL", "Partitions", "Sectors", "Worker", "State", "Try",
                "CreateAt", "Elapsed", "Heartbeat", "Error")  # fmt: skip
DETAIL_COLUMNS = ("JobID", "Prefix", "Miner", "DDL", "Partitions", "Sectors", "Worker", "State",
                  "Try", "CreateAt", "StartedAt", "HeartbeatAt", "FinishedAt", "UpdatedAt",
                  "Error")  # fmt: skip


class BriefInput(msgspec.Struct, frozen=True):
    """What a brief keeps of the input (damocles zeroes the rest)."""

    MinerId: int = 0


class JobBrief(msgspec.Struct, frozen=True):
    """damocles' WdPoStJobBrief as `Venus.WdPoStAllJobs` sends it: the record without its input's
    sectors and its output, and their counts."""

    Id: str
    State: str
    DeadlineIdx: int = 0
    Partitions: tuple[int, ...] | None = None
    Input: BriefInput = BriefInput()
    TryNum: int = 0
    ErrorReason: str = ""
    WorkerName: str = ""
    StartedAt: int = 0
    HeartbeatAt: int = 0
    FinishedAt: int = 0
    CreatedAt: int = 0
    UpdatedAt: int = 0
    Sectors: int = 0
    Faults: int = 0


def decode_all_jobs(result: Any) -> tuple[list[JobBrief], int | None]:
    """The briefs and JobMaxTry from a `Venus.WdPoStAllJobs` result: `{"Jobs", "MaxTry"}`, or
    the bare list damocles-manager sent before it added MaxTry (None then); raises
    msgspec.ValidationError when it is neither."""
    if isinstance(result, list):
        return msgspec.convert(result, list[JobBrief]), None
    answer = msgspec.convert(result, _AllJobs)
    return answer.Jobs or [], answer.MaxTry  # Go's nil slice is null


class _AllJobs(msgspec.Struct):
    Jobs: list[JobBrief] | None
    MaxTry: int


def brief_display_state(brief: JobBrief) -> str:
    """damocles' WdPoStJobBrief.DisplayState: the state from the brief's fault count."""
    if brief.State == READY:
        return "ReadyToRun"
    if brief.State == RUNNING:
        return "Running"
    if brief.State == FINISHED:
        if brief.ErrorReason != "":
            return "Failed"
        return "Succeed" if brief.Faults == 0 else f"Faults({brief.Faults})"
    return brief.State


def _counts(job: WdPoStJob | JobBrief) -> tuple[str, str, int]:
    """The Sectors cell, the State cell and the miner of a record or a brief."""
    if isinstance(job, JobBrief):
        return str(job.Sectors), brief_display_state(job), job.Input.MinerId
    return str(len(job.Input.Sectors or ())), display_state(job), job.Input.MinerId


# Cells come from clients (a worker's name and error text, a server's briefs): a tab or newline
# would break the table, and a terminal escape sequence has no business on the operator's screen:
# C0 and C1 controls (U+009B is CSI, as ESC [ is) and the bidirectional controls, which turn the
# rest of a line around (U+202E) and would make it say something else.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` from a client (a worker's name, a job id from a server) with each control
    character (C0, C1, bidirectional) written as a space, so it cannot move the cursor, send
    escapes to a terminal, or reorder what the line shows."""
    return _CONTROL.sub(" ", text)


def removed_line(job_id: str) -> str:
    """What `wdpost remove-all` prints for each job, as damocles' CLI does."""
    return f"wdpost job {printable(job_id)} removed"


def tabwrite(rows: Sequence[Sequence[str]], *, minwidth: int = 2, padding: int = 2) -> str:
    """Rows of cells as Go's tabwriter lays them out when every line ends with its last cell;
    a control character in a cell is written as a space."""
    rows = [[printable(cell) for cell in row] for row in rows]
    columns = max((len(r) for r in rows), default=0) - 1
    widths = [
        max(minwidth, max(len(r[i]) for r in rows if len(r) > i) + padding) for i in range(columns)
    ]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("".join(cells) + row[-1] + "\n")
    return "".join(lines)


def go_duration(seconds: float) -> str:
    """Go's Duration.String() of a duration truncated to milliseconds."""
    millis = int(seconds * 1000)  # truncation toward zero, as Duration.Truncate does
    sign = "-" if millis < 0 else ""
    millis = abs(millis)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{sign}{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def format_time(unix_seconds: int, tz: tzinfo | None = None) -> str:
    if unix_seconds == 0:
        return "-"
    try:
        return datetime.fromtimestamp(unix_seconds, tz).strftime("%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):  # a server's uint64 past year 9999: as it is
        return str(unix_seconds)


def format_partitions(partitions: Sequence[int] | None) -> str:
    return "[" + ", ".join(str(p) for p in partitions or ()) + "]"


def _try(job: WdPoStJob | JobBrief, max_try: int) -> str:
    return f"{job.TryNum}(Max)" if job.TryNum >= max_try else str(job.TryNum)


def render_list(jobs: Sequence[WdPoStJob | JobBrief], *, max_try: int, now: float, show_all: bool = False,
                detail: bool = False, tz: tzinfo | None = None) -> str:  # fmt: skip
    """The table `wdpost list` prints; `jobs` in the order to show (newest first).

    Without `show_all`, jobs that finished without an error (`Succeed`, `Faults(N)`) are left
    out, as damocles does."""
    rows: list[list[str]] = [list(DETAIL_COLUMNS if detail else LIST_COLUMNS)]
    for job in jobs:
        if not show_all and job.State == "finished" and job.ErrorReason == "":
            continue
        sectors, state, miner = _counts(job)
        if detail:
            rows.append([
                job.Id, job.State, str(miner), str(job.DeadlineIdx),
                format_partitions(job.Partitions), sectors, job.WorkerName, state,
                _try(job, max_try), format_time(job.CreatedAt, tz), format_time(job.StartedAt, tz),
                format_time(job.HeartbeatAt, tz), format_time(job.FinishedAt, tz),
                format_time(job.UpdatedAt, tz), job.ErrorReason,
            ])  # fmt: skip
            continue
        if job.StartedAt == 0:
            elapsed = heartbeat = "-"
        elif job.FinishedAt == 0:
            elapsed = go_duration(int(now - job.StartedAt))
            heartbeat = go_duration(now - job.HeartbeatAt)
        else:
            elapsed = go_duration(job.FinishedAt - job.StartedAt) + "(done)"
            heartbeat = "-"
        rows.append([
            job.Id, str(miner), str(job.DeadlineIdx),
            format_partitions(job.Partitions), sectors, job.WorkerName, state,
            _try(job, max_try), format_time(job.CreatedAt, tz), elapsed, heartbeat,
            job.ErrorReason,
        ])  # fmt: skip
    return tabwrite(rows)
