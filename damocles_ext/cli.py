"""The `damocles-ext` command line: parse arguments, call the library, map errors to exit codes.

Each subcommand lives in `damocles_ext/commands/<name>.py` and exposes
`add_parser(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`. Command modules keep
their imports light at module level (heavy imports go inside `run`) so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from . import __version__
from .errors import EXIT_USAGE, DextError

# Order is the order shown in --help.
COMMANDS = (
    "check_config",
    "serve",
    "run",
    "prove",
    "status",
    "child",
    "plugins",
    "sectors",
    "verify",
    "demo",
    "simulate",
    "wdpost",
    "coordinator",
    "worker",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 already; keep its wording short
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="damocles-ext",
        description="Supervise Filecoin PoSt prover processes (a drop-in ext-prover for damocles).",
    )
    parser.add_argument("--version", action="version", version=f"damocles-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"damocles_ext.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"damocles_ext.commands.{name}":
                continue  # not built yet
            raise
        command_parser = module.add_parser(sub)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (0, 1 when it failed, 2 for usage or input errors)."""
    try:
        code = _main(argv)
        # Output still buffered would otherwise meet a closed pipe at interpreter exit, where
        # the BrokenPipeError can no longer be caught.
        sys.stdout.flush()
        return code
    except BaseException as exc:
        if not _only(exc, BrokenPipeError):
            raise
        # The reader went away (`| head`): nothing more can be said there, and no traceback.
        # Point stdout at /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """`exc` is a `kind`, or a group (from a trio nursery) holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, kind)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DextError as exc:
        print(f"damocles-ext {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:
        # Ctrl-C, also when trio raises it out of a nursery, inside a group.
        if _only(exc, KeyboardInterrupt):
            return 130
        raise
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
