"""Typed reads of damocles-worker.toml tables: each getter returns the value, or None and one
error naming the key's place (`processors.window_post[0].concurrent`), what was expected and what
was found. A key that is absent is None without an error: every key is optional in
damocles-worker but the few the loader asks for by name.

Sans-IO: TOML values in, values and messages out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..jobs.endpoint import HEADER_NAME, header_name_problem, header_value_problem
from .damocles_worker_keys import parse_humantime
from .messages import _show, _toml_key

MAX_U64 = 2**64 - 1
# RFC 9110's token: what an HTTP header name may be made of.


class TypedTable:
    """One TOML table of the file and the list its errors go to."""

    def __init__(self, raw: Mapping[str, Any], where: str, errors: list[str]) -> None:
        self.raw = raw
        self.where = where
        self.errors = errors

    @classmethod
    def of(cls, parent: Mapping[str, Any], key: str, where: str, errors: list[str]) -> TypedTable:
        """The sub-table `key` of `parent` (empty when absent; an error when not a table)."""
        value = parent.get(key, {})
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, found {_show(value)}")
            value = {}
        return cls(value, where, errors)

    def at(self, key: str) -> str:
        """Where `key` of this table is, for messages."""
        return f"{self.where}.{_toml_key(key)}" if self.where else _toml_key(key)

    def _bad(self, key: str, expected: str) -> None:
        self.errors.append(f"{self.at(key)}: expected {expected}, found {_show(self.raw[key])}")

    def string(self, key: str, *, nonempty: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self._bad(key, "a non-empty string" if nonempty else "a string")
            return None
        if "\x00" in value:
            self.errors.append(f"{self.at(key)}: contains a NUL character (\\u0000)")
            return None
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, bool):
            self._bad(key, "true or false")
            return None
        return value

    def integer(self, key: str, *, low: int, high: int, expected: str = "") -> int | None:
        """A whole number from `low` to `high`; `expected` says so in words when the bare
        range would not."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self._bad(key, expected or f"a whole number from {low} to {high}")
            return None
        return value

    def string_list(self, key: str) -> list[str] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self._bad(key, 'a list of strings, e.g. ["a", "b"]')
            return None
        bad = [i for i, v in enumerate(value) if not isinstance(v, str) or "\x00" in v]
        for i in bad:
            self.errors.append(f"{self.at(key)}[{i}]: expected a string, found {_show(value[i])}")
        return None if bad else value

    def u64_list(self, key: str) -> list[int] | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self._bad(key, "a list of miner actor ids, e.g. [1000, 1001]")
            return None
        bad = [
            i
            for i, v in enumerate(value)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_U64
        ]
        for i in bad:
            self.errors.append(
                f"{self.at(key)}[{i}]: expected a miner actor id (a whole number, 1000 for "
                f"t01000), found {_show(value[i])}"
            )
        return None if bad else value

    def duration(self, key: str) -> float | None:
        """Seconds from a humantime string ("15s", "1m")."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            hint = f' (write "{value}s" for seconds)' if isinstance(value, int) else ""
            self._bad(key, f'a duration string such as "15s" or "1m"{hint}')
            return None
        try:
            return parse_humantime(value)
        except ValueError as exc:
            self.errors.append(f"{self.at(key)}: {exc}")
            return None

    def _string_map(self, key: str, what: str) -> dict[str, str]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._bad(key, f'a table of {what}, e.g. {{ NAME = "value" }}')
            return {}
        good = {}
        for name, v in value.items():
            if not isinstance(v, str) or "\x00" in v:
                self.errors.append(
                    f"{self.at(key)}.{_toml_key(name)}: expected a string, found {_show(v)}"
                )
            else:
                good[name] = v
        return good

    def envs(self, key: str) -> dict[str, str]:
        """A table of environment variables."""
        envs = self._string_map(key, "environment variables")
        for name in envs:
            if not name or "=" in name or "\x00" in name:
                self.errors.append(
                    f"{self.at(key)}: environment variable name {_show(name)} must be non-empty "
                    f"and contain no '='"
                )
        return envs

    def headers(self, key: str) -> dict[str, str]:
        """A table of HTTP headers, each one that can be sent as written."""
        headers = self._string_map(key, "HTTP headers")
        for name, value in list(headers.items()):
            if not HEADER_NAME.fullmatch(name):
                self.errors.append(
                    f"{self.at(key)}: {_show(name)} is not an HTTP header name (letters, digits "
                    f"and -, no spaces)"
                )
            elif problem := header_name_problem(name) or header_value_problem(value):
                self.errors.append(f"{self.at(key)}.{_toml_key(name)}: {problem}")
            else:
                continue
            del headers[name]
        return headers

    def int_map(self, key: str) -> dict[str, int]:
        """A table of names to whole numbers (e.g. [processors.ext_locks])."""
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self._bad(key, "a table of names to whole numbers, e.g. { gpu0 = 1 }")
            return {}
        sub = TypedTable(value, self.at(key), self.errors)
        found = {name: sub.integer(name, low=0, high=MAX_U64) for name in value}
        return {name: n for name, n in found.items() if n is not None}

    def tables(self, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, table) for each [[key]] table."""
        value = self.raw.get(key)
        if value is None:
            return
        name = self.at(key)
        if isinstance(value, dict):
            self.errors.append(
                f"{name}: written as a single table [{name}]; write [[{name}]] (double brackets), "
                f"as damocles-worker reads it"
            )
            return
        if not isinstance(value, list):
            self._bad(key, f"tables written [[{name}]]")
            return
        for i, item in enumerate(value):
            if isinstance(item, dict):
                yield i, item
            else:
                self.errors.append(f"{name}[{i}]: expected a table [[{name}]], found {_show(item)}")
