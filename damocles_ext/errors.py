"""Exception types that reach people, and the exit codes they map to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROVER_ERROR = 1
EXIT_USAGE = 2


class DextError(Exception):
    """Base class of damocles-ext's own errors; the message is written for a person."""

    exit_code = EXIT_PROVER_ERROR


class UsageError(DextError):
    """Bad input from the user (arguments, files, config, task JSON): exit code 2."""

    exit_code = EXIT_USAGE


class ProverError(DextError):
    """A proof could not be produced (prover failed, child died, deadline passed): exit code 1."""

    exit_code = EXIT_PROVER_ERROR
