"""damocles' WindowPoSt job record (`WdPoStJob`) and its deterministic id, plus what we add to it.

The damocles fields keep damocles' Go names and JSON forms, so a record we store reads exactly as
damocles-manager's own `Venus.WdPoStAllJobs` would show it: `[32]byte` as arrays of integers,
nil slices as `null`, proofs as base64, unix seconds with 0 for "unset". Our additions (a lease
token per allocation, a deadline, the time a job was cancelled) are lower-case fields of `JobRecord`
only; `JobRecord.damocles()` drops them.

The job id is damocles' own: xxHash64 of the exact Go JSON of the input, the 8 bytes
little-endian, base58 (Bitcoin alphabet). Go's encoder is not msgspec's (it escapes `<`, `>`, `&`,
U+2028 and U+2029, and spells `\\b` and `\\f` short), so `go_json` writes the input the way Go does:
the same input must give the same id here and in damocles-manager, or a producer and a worker of
the two would never meet on one job.

Sans-IO: no clock, no randomness, no database; the transitions are in `rules.py`.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import base58
import msgspec
import xxhash

READY: Final = "ready2run"
RUNNING: Final = "running"
FINISHED: Final = "finished"
STATES: Final = (READY, RUNNING, FINISHED)
State = Literal["ready2run", "running", "finished"]

#: ErrorReason damocles writes when a running job's worker stopped sending heartbeats.
HEARTBEAT_TIMEOUT_REASON: Final = "heartbeat timeout"

# The columns the store keeps as SQL BIGINT are signed 64-bit; damocles' ids and indices are
# far below that in practice, and a value past it is refused here with a clear message rather
# than by the database.
I64_MAX: Final = 2**63 - 1
U64 = Annotated[int, msgspec.Meta(ge=0)]
I64 = Annotated[int, msgspec.Meta(ge=0, le=I64_MAX)]
Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
Bytes32 = Annotated[tuple[Byte, ...], msgspec.Meta(min_length=32, max_length=32)]
# PostgreSQL's text cannot hold NUL: an input with one would be refused by the database only at
# the insert, where it reads as a store failure (and a producer retries it until its deadline).
_NO_NUL: Final = "^[^\\x00]*$"
Text = Annotated[str, msgspec.Meta(pattern=_NO_NUL)]


# A field these do not know is skipped, as damocles-worker (serde) and Go skip it: a newer
# damocles-manager may add one, and its jobs must still be read (the id is the manager's, never
# computed again from what was read).
class SectorAccessStores(msgspec.Struct, frozen=True):
    """Where a sector's files are: damocles store *names*, not paths."""

    SealedFile: Text
    CacheDir: Text


class WdPoStSectorInfo(msgspec.Struct, frozen=True):
    SectorId: U64
    CommR: Bytes32
    Upgrade: bool
    Accesses: SectorAccessStores


class WdPoStInput(msgspec.Struct, frozen=True):
    """One job's input; `Sectors` None is Go's nil slice (JSON `null`), `()` an empty one."""

    Sectors: tuple[WdPoStSectorInfo, ...] | None
    MinerId: I64
    ProofType: Text
    Seed: Bytes32


class JobOutput(msgspec.Struct, frozen=True):
    """A worker's result; proofs travel as base64 strings, as Go writes `[][]byte`. A field
    left out is Go's zero value, nil (`null`), as damocles-manager decodes it."""

    proofs: tuple[bytes, ...] | None = None
    faults: tuple[U64, ...] | None = None


class WdPoStJob(msgspec.Struct, frozen=True):
    """The record exactly as damocles keeps and shows it (field order is Go's)."""

    Id: str
    State: State
    DeadlineIdx: I64
    Partitions: tuple[U64, ...] | None
    Input: WdPoStInput
    Output: JobOutput | None
    TryNum: U64
    ErrorReason: str
    WorkerName: str
    StartedAt: I64
    HeartbeatAt: I64
    FinishedAt: I64
    CreatedAt: I64
    UpdatedAt: I64


class JobRecord(WdPoStJob, frozen=True):
    """damocles' record plus our fields.

    `lease`: the token of the current allocation (None when not allocated); heartbeats and
    finishes that carry a token must carry this one. A job finished by a worker keeps the token
    it was finished with, so that the same finish sent again is known.
    `not_after`: unix seconds after which the job is useless (its deadline closed); None = none.
    `cancelled_at`: unix seconds when the job was cancelled because `not_after` passed (0 = not);
    such a job is finished with an ErrorReason that says why, and is never retried.
    """

    lease: str | None = None
    not_after: float | None = None
    cancelled_at: I64 = 0

    def damocles(self) -> WdPoStJob:
        """The record without our fields, as damocles' RPC and CLI show it."""
        return WdPoStJob(**{f: getattr(self, f) for f in WdPoStJob.__struct_fields__})

    @property
    def cancelled(self) -> bool:
        return self.cancelled_at != 0

    @property
    def succeeded(self) -> bool:
        return self.State == FINISHED and self.ErrorReason == ""


_damocles_encoder = msgspec.json.Encoder()
_job_encoder = msgspec.json.Encoder()


def damocles_json(job: JobRecord | WdPoStJob) -> bytes:
    """The record as damocles' JSON (Go field names and order, our fields left out)."""
    if isinstance(job, JobRecord):
        job = job.damocles()
    return _damocles_encoder.encode(job)


def job_json(job: JobRecord) -> bytes:
    """The whole record, our fields included (what the store keeps and our own API shows)."""
    return _job_encoder.encode(job)


def check_input(job_input: WdPoStInput) -> WdPoStInput:
    """The input checked against its declared bounds (msgspec checks them when it decodes JSON,
    not when a Struct is built in Python); raises ValueError naming the field."""
    try:
        return msgspec.convert(msgspec.to_builtins(job_input), WdPoStInput)
    except msgspec.ValidationError as e:
        why = str(e).replace(f"matching regex {_NO_NUL!r}", "without a NUL character")
        raise ValueError(f"bad job input: {why}") from None


def decode_input(data: bytes | str) -> WdPoStInput:
    """A job input from its JSON (damocles' form); raises msgspec.ValidationError / DecodeError."""
    return msgspec.json.decode(data, type=WdPoStInput)


def decode_output(data: bytes | str) -> JobOutput | None:
    return msgspec.json.decode(data, type=JobOutput | None)


def decode_job(data: bytes | str) -> JobRecord:
    return msgspec.json.decode(data, type=JobRecord)


# --- damocles' job id ---------------------------------------------------------------------------

_HEX = "0123456789abcdef"
# Go's encoding/json (with HTML escaping on, as json.Marshal has it) since Go 1.22.
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _go_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif code < 0x20 or ch in "<>&":
            out.append("\\u00" + _HEX[code >> 4] + _HEX[code & 0xF])
        elif code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            # A lone surrogate is not UTF-8: Go writes the replacement character for it.
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_bytes32(value: tuple[int, ...]) -> str:
    return "[" + ",".join(str(b) for b in value) + "]"


def _go_sector(sector: WdPoStSectorInfo) -> str:
    return (
        f'{{"SectorId":{sector.SectorId},"CommR":{_go_bytes32(sector.CommR)},'
        f'"Upgrade":{"true" if sector.Upgrade else "false"},'
        f'"Accesses":{{"SealedFile":{_go_string(sector.Accesses.SealedFile)},'
        f'"CacheDir":{_go_string(sector.Accesses.CacheDir)}}}}}'
    )


def go_json(job_input: WdPoStInput) -> bytes:
    """`json.Marshal(input)` as damocles-manager computes it, byte for byte."""
    if job_input.Sectors is None:
        sectors = "null"
    else:
        sectors = "[" + ",".join(_go_sector(s) for s in job_input.Sectors) + "]"
    text = (
        f'{{"Sectors":{sectors},"MinerId":{job_input.MinerId},'
        f'"ProofType":{_go_string(job_input.ProofType)},"Seed":{_go_bytes32(job_input.Seed)}}}'
    )
    return text.encode()


def job_id_of_json(raw_input: bytes) -> str:
    """damocles' GenJobID: base58 of the little-endian xxHash64 of the raw JSON."""
    return base58.b58encode(xxhash.xxh64_intdigest(raw_input).to_bytes(8, "little")).decode()


def job_id(job_input: WdPoStInput) -> str:
    """The id damocles-manager gives a job with this input."""
    return job_id_of_json(go_json(job_input))


# --- how damocles' CLI shows a job --------------------------------------------------------------


def display_state(job: WdPoStJob) -> str:
    """`ReadyToRun`, `Running`, `Succeed`, `Faults(N)` or `Failed`, as damocles' CLI prints."""
    if job.State == READY:
        return "ReadyToRun"
    if job.State == RUNNING:
        return "Running"
    if job.ErrorReason == "":
        faults = len(job.Output.faults or ()) if job.Output is not None else 0
        return "Succeed" if faults == 0 else f"Faults({faults})"
    return "Failed"
