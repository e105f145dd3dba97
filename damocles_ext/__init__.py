"""damocles-ext: a supervisor for Filecoin PoSt prover processes."""

from .compiled import use_sources_if_stale as _use_sources_if_stale

__version__ = "0.1.0"

# Before any compiled module is imported: a source edited since the build runs, not its stale
# extension (compiled.py).
_use_sources_if_stale()
