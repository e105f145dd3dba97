"""The damocles task and output types (field names exactly as damocles-manager sends them).

These are the canonical in-memory types. The dext protocol carries them as msgpack maps (bytes
as msgpack bin); the damocles JSON-lines codec (`protocol.jsonl`) converts them to and from
damocles' JSON forms (`seed`/`comm_r` as arrays of 32 integers, proofs as base64 strings).

The task and output structs are tagged with their stage (`tag_field="stage"`) so a dext message
can carry either kind; decoding one type directly does not require the tag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Annotated, Literal, TypeGuard

import msgspec

# The stage names live in stages.py (light to import); kept importable from here for plugins.
from .stages import POST_STAGES, STAGES, WINDOW_POST_SPLIT  # noqa: F401
from .wording import some_and_more

# msgspec range-checks int64 only; msgpack and JSON decoding already refuse values past u64.
U64 = Annotated[int, msgspec.Meta(ge=0)]
Bytes32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]

SECTOR_SIZES = ("2KiB", "8MiB", "512MiB", "32GiB", "64GiB")

SECTOR_SIZE_BYTES = {
    "2KiB": 2 << 10,
    "8MiB": 8 << 20,
    "512MiB": 512 << 20,
    "32GiB": 32 << 30,
    "64GiB": 64 << 30,
}

#: Sectors per WindowPoSt partition, by sector size.
SECTORS_PER_PARTITION = {"2KiB": 2, "8MiB": 2, "512MiB": 2, "32GiB": 2349, "64GiB": 2300}

WINDOW_CHALLENGES_PER_SECTOR = 10
WINNING_CHALLENGES_PER_SECTOR = 66
WINNING_SECTOR_COUNT = 1

WindowProofType = Literal[
    "StackedDrgWindow2KiBV1",
    "StackedDrgWindow8MiBV1",
    "StackedDrgWindow512MiBV1",
    "StackedDrgWindow32GiBV1",
    "StackedDrgWindow64GiBV1",
    "StackedDrgWindow2KiBV1_2",
    "StackedDrgWindow8MiBV1_2",
    "StackedDrgWindow512MiBV1_2",
    "StackedDrgWindow32GiBV1_2",
    "StackedDrgWindow64GiBV1_2",
]
WinningProofType = Literal[
    "StackedDrgWinning2KiBV1",
    "StackedDrgWinning8MiBV1",
    "StackedDrgWinning512MiBV1",
    "StackedDrgWinning32GiBV1",
    "StackedDrgWinning64GiBV1",
]

WINDOW_PROOF_TYPES: tuple[str, ...] = WindowProofType.__args__  # type: ignore[attr-defined]
WINNING_PROOF_TYPES: tuple[str, ...] = WinningProofType.__args__  # type: ignore[attr-defined]


def is_window_proof_type(proof_type: str) -> TypeGuard[WindowProofType]:
    """True for a WindowPoSt proof type (what a WindowPoSt task's `proof_type` may hold)."""
    return proof_type in WINDOW_PROOF_TYPES


def is_winning_proof_type(proof_type: str) -> TypeGuard[WinningProofType]:
    """True for a WinningPoSt proof type (what a WinningPoSt task's `proof_type` may hold)."""
    return proof_type in WINNING_PROOF_TYPES


def sector_size_name(proof_type: str) -> str:
    """The sector size part of a proof type string, e.g. '32GiB'."""
    for size in SECTOR_SIZES:
        if size in proof_type:
            return size
    raise ValueError(f"unknown proof type {proof_type!r}")


def proof_types_for_sizes(sizes: Iterable[str]) -> tuple[str, ...]:
    """The proof types a damocles-worker with `allowed_sizes = sizes` asks for: each size's
    WinningPoSt V1, WindowPoSt V1 and V1_2 names (damocles' own list, WinningPoSt included).
    ValueError naming a size that is not a sector size."""
    types: dict[str, None] = {}
    for size in sizes:
        if size not in SECTOR_SIZES:
            raise ValueError(
                f"{size!r} is not a sector size; give one of {', '.join(SECTOR_SIZES)}"
            )
        for kind in ("Winning", "Window"):
            types[f"StackedDrg{kind}{size}V1"] = None
        types[f"StackedDrgWindow{size}V1_2"] = None
    return tuple(types)


def is_v1_2(proof_type: str) -> bool:
    """True for the grindability-fixed WindowPoSt types (challenge index is per sector)."""
    return proof_type.endswith("V1_2")


class PoStReplicaInfo(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One sector to prove. In dext frames it is a 4-element array, not a map: a 2349-replica
    request is 25% smaller and decodes about 30% faster (bench/bench_codec.py). Its fields are
    never containers, so the garbage collector need not track thousands of them per request."""

    sector_id: U64
    comm_r: Bytes32
    cache_dir: str
    sealed_file: str


class _WindowPoStFields(msgspec.Struct, frozen=True):
    """What a WindowPoSt and each of its split steps carry (no tag: not a wire type itself)."""

    miner_id: U64
    proof_type: WindowProofType
    replicas: list[PoStReplicaInfo]
    seed: Bytes32


class WindowPoSt(_WindowPoStFields, frozen=True, tag="window_post", tag_field="stage"):
    pass


class WinningPoSt(msgspec.Struct, frozen=True, tag="winning_post", tag_field="stage"):
    miner_id: U64
    proof_type: WinningProofType
    replicas: list[PoStReplicaInfo]
    seed: Bytes32


class WindowPoStOutput(msgspec.Struct, frozen=True, tag="window_post", tag_field="stage"):
    proofs: list[bytes]
    faults: list[U64]


class WinningPoStOutput(msgspec.Struct, frozen=True, tag="winning_post", tag_field="stage"):
    proofs: list[bytes]


# -- WindowPoSt split in two steps ----------------------------------------------------------
#
# A WindowPoSt partition is a vanilla step (CPU and disk: read the challenged leaves and their
# Merkle paths from the sectors) and a SNARK step (GPU: prove those vanilla proofs). Split, the two
# run on different children, so the vanilla proofs of the next partitions are ready while a GPU
# is busy, and each SNARK goes to whichever GPU frees first (see docs/SIMULATION.md).
# The supervisor chains them (`split_window_post`, `snark_task`, `join_window_post`); a caller
# still sends one `WindowPoSt` and gets one `WindowPoStOutput`.


class WindowPoStVanilla(
    _WindowPoStFields, frozen=True, tag="window_post_vanilla", tag_field="stage"
):
    """The vanilla step of a WindowPoSt: the same fields, answered with vanilla proofs."""


class WindowPoStSnark(_WindowPoStFields, frozen=True, tag="window_post_snark", tag_field="stage"):
    """The SNARK step of a WindowPoSt: the task and the vanilla step's answer."""

    vanilla_proofs: list[bytes]
    faults: list[U64]


class WindowPoStVanillaOutput(
    msgspec.Struct, frozen=True, tag="window_post_vanilla", tag_field="stage"
):
    vanilla_proofs: list[bytes]
    faults: list[U64]


class WindowPoStSnarkOutput(
    msgspec.Struct, frozen=True, tag="window_post_snark", tag_field="stage"
):
    proofs: list[bytes]


Task = WindowPoSt | WinningPoSt | WindowPoStVanilla | WindowPoStSnark
Output = WindowPoStOutput | WinningPoStOutput | WindowPoStVanillaOutput | WindowPoStSnarkOutput
#: The outputs that report faulty sectors (`faults`).
OUTPUTS_WITH_FAULTS = (WindowPoStOutput, WindowPoStVanillaOutput)
#: The tasks and outputs of damocles-manager's own two stages (no split step): what its JSON
#: lines carry and what a caller submits and gets back.
PoStTask = WindowPoSt | WinningPoSt
PoStOutput = WindowPoStOutput | WinningPoStOutput

TASK_TYPES: dict[str, type] = {
    "window_post": WindowPoSt,
    "winning_post": WinningPoSt,
    "window_post_vanilla": WindowPoStVanilla,
    "window_post_snark": WindowPoStSnark,
}
OUTPUT_TYPES: dict[str, type] = {
    "window_post": WindowPoStOutput,
    "winning_post": WinningPoStOutput,
    "window_post_vanilla": WindowPoStVanillaOutput,
    "window_post_snark": WindowPoStSnarkOutput,
}


#: The range of a request's deadline (unix seconds): a day inside the years a datetime can show in
#: any time zone. NaN would sort before every deadline and never expire; inf never expires.
DEADLINE_MIN = -62135510400.0  # 0001-01-02T00:00:00+00:00
DEADLINE_MAX = 253402214400.0  # 9999-12-31T00:00:00+00:00


def over_64_bits(task: Task) -> str | None:
    """What in `task` does not fit in 64 bits (its miner id, sector ids: damocles' uint64s, and
    what the dext codec sends), e.g. "miner_id 18446744073709551616"; None when all fit. The
    typed fields stop at 0, not at 2**64 - 1: the codecs' bounds cannot go past int64."""
    too_big = [f"miner_id {task.miner_id}"] if task.miner_id >= 2**64 else []
    too_big += [
        f"sector_id {r.sector_id}" for r in getattr(task, "replicas", ()) if r.sector_id >= 2**64
    ]
    if not too_big:
        return None
    shown = some_and_more(too_big[:3], len(too_big))
    return f"{shown} does not fit in 64 bits (the largest is {2**64 - 1})"


def replicas_problem(task: Task) -> str | None:
    """What makes `task`'s replicas unprovable by any prover, known before one is asked (none;
    a sector twice; a path with a NUL byte, which no file system names), or None."""
    replicas = getattr(task, "replicas", None)
    if replicas is None:
        return None
    if not replicas:
        return "the task has no replicas: give at least one sector"
    # Run per request (Supervisor.submit): the common case at C speed, then the slow walk.
    ids = [r.sector_id for r in replicas] if len(replicas) > 1 else ()  # (one: no sector twice)
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        for sector in ids:
            if sector in seen:
                return f"sector {sector} appears twice in the task: give each sector once"
            seen.add(sector)
    for r in replicas:  # (a plain loop: no generator to resume per replica)
        name = (
            "cache_dir" if "\0" in r.cache_dir else "sealed_file" if "\0" in r.sealed_file else ""
        )
        if name:
            return f"sector {r.sector_id}'s {name} holds a NUL byte: no file has that name"
    return None


def deadline_problem(deadline: object) -> str | None:
    """Why `deadline` cannot be a request's deadline (a unix time in seconds, or None), or None."""
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
        return f"is a {type(deadline).__name__}, not a number of seconds since the epoch"
    if isinstance(deadline, float) and not math.isfinite(deadline):
        return "is not a finite number"
    if not DEADLINE_MIN <= deadline <= DEADLINE_MAX:
        return "is not a time between the years 0001 and 9999"
    return None


def request_problem(task: object, deadline: object, priority: object) -> str | None:
    """Why a caller's request cannot be taken (after "request N "), or None: a task that is
    none, a deadline that is no time, a priority no dext frame carries (a float killed the
    child, whose decoder refused it; a string stopped the stage's queue)."""
    if not isinstance(task, Task):
        return (
            f"refused: {type(task).__name__} is not a task; give a WindowPoSt or a WinningPoSt"
            " (damocles_ext.tasks)"
        )
    if deadline is not None and (problem := deadline_problem(deadline)) is not None:
        # A NaN deadline would sort before every other one and never expire; inf never expires.
        return (
            f"({stage_of(task)}) refused: its deadline {deadline!r} {problem}; give a unix time"
            " in seconds (e.g. time.time() + 600), or no deadline"
        )
    if isinstance(priority, bool) or not isinstance(priority, int):
        return f"({stage_of(task)}) refused: its priority {priority!r} is not a whole number"
    if not -(2**63) <= priority < 2**63:
        return f"({stage_of(task)}) refused: its priority {priority} is beyond a signed 64 bits"
    return None


#: How task_check says a task cannot be encoded at all (an id over 64 bits, a path that is no
#: text): where a worker builds the task, its own paths' fault, not the job's (worker_jobs).
UNSENDABLE = "cannot be sent"

_task_encoder = msgspec.msgpack.Encoder()
_task_decoders: dict[type, msgspec.msgpack.Decoder[Task]] = {}


def task_problem(task: Task) -> str | None:
    """`task_check`'s problem with `task`, or None."""
    checked = task_check(task)
    return checked if isinstance(checked, str) else None


def task_check(task: Task) -> str | bytes:
    """Why a caller's task cannot be sent (after "request N "): what in it, a Struct the caller
    built, its child could not read (msgspec checks a Struct's fields when it decodes one, not
    when it is built: a 31-byte seed, a negative miner id or an unknown proof type killed every
    child it was sent to) or what cannot be encoded at all (an id over 64 bits). The check is
    the child's: the task encoded and decoded as its type. Then what no prover can prove
    (replicas_problem: no replicas, a sector twice), which every child refused in turn, each
    refusal counted as the child's failure. With nothing wrong, the task as the check encoded
    it: the msgpack a dext frame carries as it is (`dext.RawRequest`), not encoded again."""
    kind = type(task)
    decoder = _task_decoders.get(kind)
    if decoder is None:
        decoder = _task_decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        encoded = _task_encoder.encode(task)
    except (msgspec.MsgspecError, TypeError, OverflowError, UnicodeEncodeError) as exc:
        # Said here, not where a child's frame is made: the supervisor made it only once a
        # child was free, and failed the request then as the prover's error.
        return (
            f"{UNSENDABLE}: {exc}; ids go from 0 to 2**64 - 1 and paths must be text (no lone"
            " surrogates): build the task with valid fields"
        )
    try:
        decoder.decode(encoded)
    except msgspec.ValidationError as exc:
        return (
            f"({stage_of(task)}) refused: its task is not valid: {exc}; build it with valid fields"
        )
    return replicas_refusal(task) or encoded


def replicas_refusal(task: Task) -> str | None:
    """replicas_problem's refusal of `task` (after "request N "), or None."""
    if (problem := replicas_problem(task)) is not None:
        return f"({stage_of(task)}) refused: {problem}"
    return None


def output_problem(task: Task, output: Output) -> str | None:
    """How `output`, of `task`'s stage, cannot be its answer, or None (`result_problem`). The
    native prover's ABI says the same of a library's result; this holds every child to it."""
    proofs = output.vanilla_proofs if isinstance(output, WindowPoStVanillaOutput) else output.proofs
    faults: Sequence[int] = getattr(output, "faults", ())
    if not faults and proofs and all(proofs):  # the common answer (per request): nothing wrong
        return None
    sectors = [r.sector_id for r in getattr(task, "replicas", ())] if faults else ()
    return result_problem(proofs, faults, sectors)


def result_problem(
    proofs: Sequence[bytes], faults: Sequence[int], sectors: Iterable[int]
) -> str | None:
    """How a result cannot be a task's answer, or None: nothing in it (neither proofs nor
    faults: every task has a sector or a vanilla proof), an empty proof, faults for sectors the
    task (of `sectors`, read only when there are faults) does not have (damocles-manager would
    declare them faulty)."""
    if faults:
        unknown = sorted(set(faults).difference(sectors))
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            return f"faults for sectors not in the task: {unknown[:10]}{more}"
        return None
    if not proofs:
        return "neither proofs nor faults"
    for i, proof in enumerate(proofs):
        if not proof:  # no proof system's proof is empty: damocles-manager would submit it
            return f"proof {i} of 0 bytes"
    return None


def stage_of(obj: Task | Output) -> str:
    """The stage ('window_post', 'winning_post', or a split step) a task or output belongs to."""
    tag = type(obj).__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{type(obj).__name__} is not a task or an output")
    return tag


def split_window_post(task: WindowPoSt) -> WindowPoStVanilla:
    """The vanilla step of `task`."""
    return WindowPoStVanilla(task.miner_id, task.proof_type, task.replicas, task.seed)


def snark_task(task: WindowPoSt, vanilla: WindowPoStVanillaOutput) -> WindowPoStSnark:
    """The SNARK step of `task`, given its vanilla step's answer."""
    return WindowPoStSnark(
        task.miner_id,
        task.proof_type,
        task.replicas,
        task.seed,
        vanilla.vanilla_proofs,
        vanilla.faults,
    )


def join_window_post(
    vanilla: WindowPoStVanillaOutput, snark: WindowPoStSnarkOutput
) -> WindowPoStOutput:
    """The answer to the whole WindowPoSt: the SNARK step's proofs, the vanilla step's faults."""
    return WindowPoStOutput(proofs=snark.proofs, faults=vanilla.faults)
