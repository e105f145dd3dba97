"""The only package that spawns processes and does pipe I/O (trio)."""

from .core import ChildStats, Progress, StageStats, Supervisor, SupervisorStats

__all__ = ["ChildStats", "Progress", "StageStats", "Supervisor", "SupervisorStats"]
