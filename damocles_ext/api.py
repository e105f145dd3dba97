"""The Python API: run a supervisor inside your own trio program.

    from damocles_ext.api import open_supervisor

    async with open_supervisor("ext-prover.cfg") as sup:
        await sup.wait_ready("window_post")
        output = await sup.submit(task)          # raises ProverError when no proof came

Leaving the block requests a graceful shutdown (in-flight requests get `shutdown_grace`
seconds) and waits until every child process is gone.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import trio

from .supervisor.core import Supervisor

if TYPE_CHECKING:
    from .config import ChildSpec, Config

#: What open_supervisor starts from: a Config, its children, or a config file or conf dir.
ConfigSource: TypeAlias = "Config | Sequence[ChildSpec] | str | os.PathLike[str]"


def _load(config_or_path: ConfigSource) -> Config | Sequence[ChildSpec]:
    if isinstance(config_or_path, (str, os.PathLike)):
        from .config import load_conf_dir, load_config

        if os.path.isdir(config_or_path):
            return load_conf_dir(config_or_path)
        return load_config(config_or_path)
    return config_or_path


@asynccontextmanager
async def open_supervisor(config_or_path: ConfigSource, **kwargs: Any) -> AsyncIterator[Supervisor]:
    """Start a Supervisor from a Config, a ChildSpec list, a config file or a conf dir.

    Keyword arguments go to `Supervisor` (plugin_manager, stages, shutdown_grace, ...). The
    children have been launched (not necessarily ready) when the block starts.
    """
    sup = Supervisor(_load(config_or_path), **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        try:
            yield sup
        finally:
            sup.request_shutdown()


__all__ = ["Supervisor", "open_supervisor"]
