"""`damocles-ext verify <stage> --request TASK.json --output OUT.json`: check reference proofs.

Exit codes: 0 the output proves the task; 1 it does not (the reason on stderr); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from damocles_ext.stages import POST_STAGES

if TYPE_CHECKING:
    from damocles_ext.tasks import PoStOutput


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `verify`."""
    parser = subparsers.add_parser(
        "verify",
        help="verify a reference prover's output against its task",
        description=(
            "Check the proofs in OUT.json (damocles' output JSON, as `damocles-ext prove` writes "
            "it) against the public inputs of TASK.json: proof type, miner, seed, sector ids and "
            "comm_r. Exit code 0: valid; 1: invalid (the reason is printed); 2: bad input."
        ),
    )
    parser.add_argument("stage", choices=POST_STAGES, help="the stage of the task")
    parser.add_argument(
        "--request",
        required=True,
        metavar="TASK.json",
        help="the task in damocles' JSON form ('-' reads stdin)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="OUT.json",
        help="the prover's output in damocles' JSON form",
    )
    parser.add_argument(
        "--verifier",
        choices=("python", "native"),
        default="python",
        help="which verifier to run (default: python; native is the C one)",
    )
    return parser


def read_output(path: str, stage: str) -> PoStOutput:
    """The output in OUT.json; UsageError naming the file and what is wrong."""
    from damocles_ext.commands.inputs import read_input_file
    from damocles_ext.errors import UsageError
    from damocles_ext.protocol.jsonl import JsonLineError, output_from_json

    data = read_input_file(path, "output file", "output JSON file")
    try:
        return output_from_json(data, stage)
    except JsonLineError as exc:
        raise UsageError(f"{path}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """Verify; VerifyError (exit 1) with the reason when the proof does not check out."""
    from damocles_ext.commands.inputs import read_task
    from damocles_ext.errors import UsageError

    if args.request == args.output == "-":
        raise UsageError("--request and --output cannot both be - (stdin): give one as a file")
    task = read_task(args.request, args.stage, "verify")
    output = read_output(args.output, args.stage)
    if args.verifier == "native":
        from damocles_ext.post.native import NativeProver

        with NativeProver() as prover:
            prover.verify(task, output)
    else:
        from damocles_ext.post.verify import verify

        verify(task, output)
    proofs = len(output.proofs)
    print(
        f"valid: {proofs} proof{'s' if proofs != 1 else ''} for {len(task.replicas)} "
        f"sector{'s' if len(task.replicas) != 1 else ''} ({task.proof_type})",
        file=sys.stderr,
    )
    return 0
