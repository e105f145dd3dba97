"""The files a command reads its input from (`prove`'s task JSON, `verify`'s output JSON, the
comm_r file of `prove --comm-r`, or stdin for '-'): read bounded, each error naming the file
and what to do; a task read is checked as a prover child would take it (`read_task`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from damocles_ext.errors import UsageError

if TYPE_CHECKING:
    from damocles_ext.tasks import PoStTask, Task


#: The most an input file may hold: four times a dext frame's limit. A task's JSON is larger than
#: its dext form (each comm_r byte a number), and a task that could still be sent must be read,
#: or one too large told how many replicas it has.
MAX_INPUT_BYTES = 256 * 1024 * 1024


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def read_input_file(source: str, label: str, kind: str) -> bytes:
    """The bytes of `source` ('-': stdin), MAX_INPUT_BYTES at most; UsageError saying which
    `label` could not be read, or is too long to be one."""
    from damocles_ext.errors import UsageError

    try:
        if source == "-":
            if sys.stdin.isatty():  # else it waits for the typing, and says nothing
                print(f"reading the {label} from the terminal: end it with Ctrl-D", file=sys.stderr)
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            # Bounded: /dev/zero, or a sealed sector given by mistake, must not fill the memory.
            with Path(source).open("rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            where = "stdin" if source == "-" else source
            raise UsageError(
                f"{label} {where} holds over {MAX_INPUT_BYTES // 2**20} MiB, more than any"
                f" {kind}: is it the right file?"
            )
        return data
    except FileNotFoundError:
        raise UsageError(f"{label} {source} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{label} {source} is a directory, not {_a(kind)}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {label} {source}: {exc.strerror}") from None


def read_task(source: str, stage: str, command: str = "prove") -> PoStTask:
    """The task in TASK.json ('-': stdin); UsageError naming the file and what is wrong.

    `command` is the subcommand a task of the other stage is pointed to (prove, verify).
    """
    from damocles_ext.errors import UsageError
    from damocles_ext.protocol.jsonl import JsonLineError, task_from_json

    name = "stdin" if source == "-" else source
    data = read_input_file(source, "request file", "task JSON file")
    try:
        task = task_from_json(data, stage)
    except JsonLineError as exc:
        raise UsageError(
            f"{name}: {_with_line_column(str(exc), data)}{_stage_hint(data, stage, command)}"
        ) from None
    check_request_size(task, name)
    return task


def check_request_size(task: Task, where: str) -> None:
    """UsageError when the task does not fit in one dext frame (no child could take it), or
    no prover could prove it (no replicas, a sector twice, a path no file has)."""
    from damocles_ext.protocol import dext
    from damocles_ext.tasks import over_64_bits, replicas_problem

    if (too_big := over_64_bits(task)) is not None:
        raise UsageError(f"{where}: {too_big}")
    if (problem := replicas_problem(task)) is not None:
        raise UsageError(f"{where}: {problem}")
    size = len(dext.encode(dext.Request(0, task))) - dext.HEADER_SIZE
    if size > dext.DEFAULT_MAX_FRAME_SIZE:
        raise UsageError(
            f"{where}: the task is {size / 2**20:.1f} MiB as a request ({len(task.replicas)}"
            f" replicas), over the {dext.DEFAULT_MAX_FRAME_SIZE / 2**20:.0f} MiB a prover"
            " child takes in one message; split it into smaller tasks"
        )


_BYTE_POS = re.compile(r"\(byte (\d+)\)")


def _with_line_column(message: str, data: bytes) -> str:
    # msgspec reports a byte offset; people look for a line and a column.
    def repl(match: re.Match[str]) -> str:
        offset = int(match.group(1))
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        return f"(line {line}, column {column})"

    return _BYTE_POS.sub(repl, message)


def _stage_hint(data: bytes, stage: str, command: str) -> str:
    import msgspec

    from damocles_ext.tasks import WINDOW_PROOF_TYPES, WINNING_PROOF_TYPES

    try:
        proof_type = msgspec.json.decode(data).get("proof_type")
    except (msgspec.DecodeError, AttributeError, RecursionError):  # not JSON, not an object
        return ""
    if stage == "window_post" and proof_type in WINNING_PROOF_TYPES:
        return f"; {proof_type} is a WinningPoSt proof type: use `{command} winning_post`"
    if stage == "winning_post" and proof_type in WINDOW_PROOF_TYPES:
        return f"; {proof_type} is a WindowPoSt proof type: use `{command} window_post`"
    return ""
