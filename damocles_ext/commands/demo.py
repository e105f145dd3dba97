"""`damocles-ext demo`: fixtures, an embedded supervisor, real proofs, a fault, verification."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `demo`."""
    parser = subparsers.add_parser(
        "demo",
        help="prove and verify real sector fixtures through an embedded supervisor",
        description=(
            "In a temporary directory: create 8MiB sector fixtures, start two WindowPoSt children "
            "(GPUs 0 and 1, own TMPDIRs) and one WinningPoSt child with the native reference "
            "prover, prove a 2-partition WindowPoSt and a WinningPoSt, corrupt a sector and show "
            "the fault, verify every proof, clean up."
        ),
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when every proof verified and the fault was found."""
    from damocles_ext.demo import run_demo

    run_demo(keep=args.keep)
    return 0
