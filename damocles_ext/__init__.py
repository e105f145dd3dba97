"""damocles-ext: a supervisor for Filecoin PoSt prover processes."""

__version__ = "0.1.0"
