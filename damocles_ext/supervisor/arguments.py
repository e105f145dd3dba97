"""The `Supervisor`'s constructor arguments, checked: a caller's mistake is a UsageError at once,
not a failure at shutdown or a stage that serves nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from ..config import ChildSpec, Config
from ..config.keys import converts
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
            check_numbers(item)
        return list(config)
    children = getattr(config, "children", None)
    if children is None:
        raise TypeError(f"expected a Config or a list of ChildSpec, got {type(config).__name__}")
    for item in children:  # (a Config read from a file was checked as read; one made by hand not)
        check_numbers(item)
    return list(children)


#: ChildSpec's fields that are numbers (a whole number, or seconds), as msgspec checks them.
_NUMBERS = [
    (f.name, f.type)
    for f in msgspec.structs.fields(ChildSpec)
    if f.type in (int, float, int | None, float | None)
]


def check_numbers(spec: ChildSpec) -> None:
    """UsageError for a ChildSpec built by hand (a msgspec Struct is not checked as it is made)
    with a number of the wrong kind (a whole number given as 2.0 or True, seconds as "5"): the
    request book takes them as they are typed (it runs compiled, damocles_ext/compiled.py), and
    a config file's are checked as it is read."""
    for name, kind in _NUMBERS:
        value = getattr(spec, name)
        if not converts(value, kind):
            what = "a whole number" if kind in (int, int | None) else "a number of seconds"
            raise UsageError(
                f"ChildSpec {spec.name!r}: its {name} {value!r} is not {what}"
                f"{' or None' if kind in (int | None, float | None) else ''}"
            )


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
