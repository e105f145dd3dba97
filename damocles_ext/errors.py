"""Exception types that reach people, and the exit codes they map to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROVER_ERROR = 1
EXIT_USAGE = 2

#: What a plugin's code (a hook, a sector provider) may raise that is reported and survived: any
#: Exception, and SystemExit too, since a `sys.exit()` in a plugin or in a library it calls must
#: not end the supervisor, a worker or a coordinator. KeyboardInterrupt and trio's cancellation
#: pass through.
PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


class DextError(Exception):
    """Base class of damocles-ext's own errors; the message is written for a person."""

    exit_code = EXIT_PROVER_ERROR


class UsageError(DextError):
    """Bad input from the user (arguments, files, config, task JSON): exit code 2."""

    exit_code = EXIT_USAGE


class OutputError(DextError):
    """stdout took no more output (a full disk, a descriptor closed at start): exit code 1."""


class ProverError(DextError):
    """A proof could not be produced (prover failed, child died, deadline passed): exit code 1."""

    exit_code = EXIT_PROVER_ERROR
