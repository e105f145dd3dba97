"""The `Supervisor`'s constructor arguments, checked: a caller's mistake is a UsageError at once,
not a failure at shutdown or a stage that serves nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import ChildSpec, Config
from ..errors import UsageError
from ..stages import STAGES


def coerce_children(config: Config | Sequence[ChildSpec]) -> list[ChildSpec]:
    """The children of a Config, or the list of ChildSpec given."""
    if isinstance(config, (list, tuple)):
        for item in config:
            if not isinstance(item, ChildSpec):
                # Else an AttributeError ('str' object has no attribute 'name') from deep inside.
                hint = " (give a config file's path itself, not in a list)"
                raise TypeError(
                    f"expected a Config or a list of ChildSpec, got a {type(config).__name__}"
                    f" holding {item!r:.80}{hint if isinstance(item, str) else ''}"
                )
        return list(config)
    children = getattr(config, "children", None)
    if children is None:
        raise TypeError(f"expected a Config or a list of ChildSpec, got {type(config).__name__}")
    return list(children)


def check_arguments(stages: Iterable[str] | None, **seconds: object) -> list[str] | None:
    """`stages` as a list (an iterator is read once), or None; UsageError for stages that are
    not stage names (a string would be taken letter by letter) and for durations (`seconds`, by
    keyword) that are not numbers of seconds >= 0."""
    if isinstance(stages, str):
        raise UsageError(f"Supervisor(stages={stages!r}): give a list of stages, e.g. [{stages!r}]")
    stages = None if stages is None else list(stages)
    unknown = sorted(set(stages or ()) - set(STAGES))
    if unknown:
        raise UsageError(
            f"Supervisor(stages=...): unknown stage {unknown[0]!r}; the stages are"
            f" {', '.join(STAGES)}"
        )
    for name, value in seconds.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise UsageError(f"Supervisor({name}={value!r}): give a number of seconds >= 0")
    return stages
