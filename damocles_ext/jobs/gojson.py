"""What Go's encoding/json lets through, for the params go-jsonrpc hands to damocles-manager.

go-jsonrpc decodes each positional param with `json.Unmarshal` into the method's Go type, and
Go is lenient where msgspec is strict. `go_shaped(value, kind)` rewrites a decoded JSON value so
that `msgspec.convert(shaped, kind)` reads it as Go would read it into the matching Go type:

- **Keys of an object match a struct's fields without regard to case**: the field named exactly
  by the key, else the one equal to it under Go's case folding (ASCII letters, plus U+017F, the
  long s, for S and U+212A, the Kelvin sign, for K, which Go folds with them), so
  `allowedminers` fills `AllowedMiners`. Keys matching no field are dropped (Go ignores them),
  unless the struct forbids unknown fields. A field named by several keys (`"AllowedMiners":[1],
  "allowedMiners":[2]`) takes them in order, so the last one wins, as in Go; a `null` among
  them leaves the one before it, unless the field may be nil.
- **`null`** is Go's nil where the type may be nil (a slice, a pointer: `X | None` here, or a
  list). Anywhere else Go leaves the value as it was: its zero value for a param or an element
  of a list (`""`, `0`, `false`, a struct with every field at its default); for a field, as if
  the key were absent (its default, or msgspec's "missing required field").

Everything else (a wrong type, a number out of range, an unknown field a strict struct forbids)
is left as it is, for msgspec to refuse with its own message. Sans-IO.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec.inspect as mi

#: The two non-ASCII letters Go's case folding (unicode.SimpleFold) puts with ASCII ones.
_GO_FOLDS = {"\u017f": "S", "\u212a": "K"}


def go_fold(key: str) -> str:
    """`key` as Go's encoding/json compares it with an ASCII field name (its `foldName`):
    equal for two keys it takes for the same field."""
    return "".join(ch.upper() if ch.isascii() else _GO_FOLDS.get(ch, ch) for ch in key)


def go_shaped(value: Any, kind: Any) -> Any:
    """`value` (decoded JSON) as msgspec must see it to convert it to `kind` the way Go's
    json.Unmarshal would read it (module docstring)."""
    return _shaper_of(kind)(value)


Shaper = Callable[[Any], Any]


@functools.cache
def _shaper_of(kind: Any) -> Shaper:
    # Made once per type: msgspec's description of a type takes hundreds of microseconds to
    # make, and the maps of a struct's keys are made once with it, not at every call.
    return _compile(mi.type_info(kind))


def _nilable(info: mi.Type) -> bool:
    return isinstance(info, mi.NoneType | mi.AnyType) or (
        isinstance(info, mi.UnionType) and any(isinstance(t, mi.NoneType) for t in info.types)
    )


def _compile(info: mi.Type) -> Shaper:
    """The shaper of values of `info`: `null` as Go takes it there, the keys of a struct
    matched as Go matches them, lists item by item; anything else left as it is."""
    none = None if _nilable(info) else _zero(info)
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        inner = _compile(others[0]) if len(others) == 1 else _as_is
        return lambda value: none if value is None else inner(value)
    if isinstance(info, mi.StructType):
        return _struct_shaper(info, none)
    if isinstance(info, mi.ListType | mi.VarTupleType):
        item_info = info.item_type
        item = _compile(item_info)
        if not isinstance(item_info, _NESTED):  # items change only where one is null

            def scalars(value: Any) -> Any:
                if value is None:
                    return none
                if not isinstance(value, list) or None not in value:
                    return value
                return [item(v) for v in value]

            return scalars

        def items(value: Any) -> Any:
            if value is None:
                return none
            return [item(v) for v in value] if isinstance(value, list) else value

        return items
    return lambda value: none if value is None else value


_NESTED = (mi.StructType, mi.ListType, mi.VarTupleType, mi.UnionType)


def _as_is(value: Any) -> Any:
    return value


def _struct_shaper(info: mi.StructType, none: Any) -> Shaper:
    # key -> (the field's name, its shaper, whether it may be nil), by exact name and folded
    exact = {
        f.encode_name: (f.encode_name, _compile(f.type), _nilable(f.type)) for f in info.fields
    }
    folded = {go_fold(name): entry for name, entry in exact.items()}
    forbid = info.forbid_unknown_fields

    def struct(value: Any) -> Any:
        if value is None:
            return none
        if not isinstance(value, dict):
            return value
        shaped: dict[str, Any] = {}
        for key, item in value.items():
            entry = exact.get(key) or folded.get(go_fold(key))
            if entry is None:
                if forbid:
                    shaped[key] = item  # for msgspec to name
                continue
            name, shape, nilable = entry
            if item is None and not nilable:
                continue  # Go: no effect on the field
            shaped[name] = shape(item)
        return shaped

    return struct


def _zero(info: mi.Type) -> Any:
    """Go's zero value of a type that cannot be nil, as msgspec reads it (None where there is
    none to give: msgspec then says what it expected)."""
    if isinstance(info, mi.StrType | mi.BytesType):
        return ""
    if isinstance(info, mi.IntType):
        return 0
    if isinstance(info, mi.FloatType):
        return 0.0
    if isinstance(info, mi.BoolType):
        return False
    if isinstance(info, mi.ListType | mi.VarTupleType):
        return []
    if isinstance(info, mi.StructType):
        return {}
    return None
