"""`damocles-ext sectors create`: write sector fixtures (sealed files, cache dirs, manifest);
`damocles-ext sectors find`: where sectors are (sectors_find.py)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sectors` and its `create` and `find` subcommands."""
    from .sectors_find import add_find_parser

    parser = subparsers.add_parser(
        "sectors",
        help="create sector fixtures; find where sectors are (proxy node mode)",
        description="Tools for sectors: the PoSt miniature's fixtures, and where sectors are.",
    )
    sub = parser.add_subparsers(
        dest="sectors_command", metavar="SUBCOMMAND", parser_class=type(parser)
    )
    sub.required = True
    create = sub.add_parser(
        "create",
        help="write random sealed sectors, their cache dirs and DIR/manifest.json",
        description=(
            "Write COUNT random sealed replicas of the proof type's sector size to DIR/sealed, "
            "their cache dirs (p_aux and the tree-r-last file, built by the native reference "
            "prover) to DIR/cache, and DIR/manifest.json listing them. WinningPoSt tasks use the "
            "same sectors: only the size part of the proof type matters."
        ),
    )
    create.add_argument(
        "--proof-type",
        required=True,
        metavar="TYPE",
        help="e.g. StackedDrgWindow2KiBV1_2 or StackedDrgWindow8MiBV1",
    )
    create.add_argument("--count", required=True, type=int, metavar="N", help="sectors to write")
    create.add_argument(
        "--miner", required=True, type=int, metavar="ID", help="the miner's actor id (f0<ID>)"
    )
    create.add_argument("--out", required=True, metavar="DIR", help="output directory")
    create.add_argument(
        "--first-sector-id",
        type=int,
        default=1,
        metavar="N",
        help="sector id of the first sector (default: 1)",
    )
    create.add_argument(
        "--rows-to-discard",
        type=int,
        default=2,
        metavar="N",
        help="tree rows above the data not stored in the tree file (default: 2)",
    )
    create.add_argument(
        "--random-seed",
        type=int,
        default=None,
        metavar="N",
        help="make the sector contents reproducible",
    )
    add_find_parser(sub)
    return parser


class _Reporter:
    """Feeds create_sectors' progress to a ProgressRenderer: a bar on a terminal, else lines."""

    def __init__(self, count: int) -> None:
        from damocles_ext.progress import ProgressRenderer

        self.renderer = ProgressRenderer(sys.stderr, interval=1.0)
        self.count = count
        self.done = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "sectors":
            self.done = done
            self.renderer.update("sectors", done, total)
        elif phase == "build_tree":
            # Trees of big sectors take a while: show which sector, and how far its tree got.
            self.renderer.update(f"sector {self.done + 1}/{self.count} tree", done, total)


def run(args: argparse.Namespace) -> int:
    """Create the fixtures and print the manifest's path, or find sectors."""
    from damocles_ext.errors import UsageError

    if args.sectors_command == "find":
        from .sectors_find import run_find

        return run_find(args)
    from damocles_ext.errors import not_utf8
    from damocles_ext.post.fixtures import create_sectors

    if not 0 <= args.miner < 2**64:
        raise UsageError(f"--miner must be an actor id from 0 to 2**64 - 1, got {args.miner}")
    last = args.first_sector_id + max(args.count, 1) - 1
    if args.first_sector_id < 0 or last >= 2**64:
        raise UsageError(
            f"--first-sector-id {args.first_sector_id} with --count {args.count}: sector ids"
            " go from 0 to 2**64 - 1 (damocles' uint64)"
        )
    # The manifest, and the tasks made from it, carry the fixtures' real paths as JSON text.
    out = os.path.realpath(args.out)
    if (bad := not_utf8(out)) is not None:
        shown = out.encode("utf-8", "replace").decode()
        raise UsageError(
            f"--out: the path {shown!r} is not UTF-8 text: {bad} is not; the manifest and"
            " damocles' tasks carry it as text, so choose a directory whose path is UTF-8"
        )
    reporter = _Reporter(args.count)
    try:
        manifest = create_sectors(
            args.out,
            args.proof_type,
            args.count,
            args.miner,
            progress=reporter,
            rows_to_discard=args.rows_to_discard,
            first_sector_id=args.first_sector_id,
            random_seed=args.random_seed,
        )
    except OSError as exc:
        raise UsageError(f"cannot write fixtures under {args.out}: {exc}") from None
    finally:
        reporter.renderer.close()
    print(manifest)
    return 0
