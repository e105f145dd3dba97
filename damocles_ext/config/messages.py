"""The wording of config errors: values shown as TOML, 'did you mean', TOML syntax errors."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time
from typing import Any

_TABLE_ALIASES = {
    "wdpost": "WdPost",
    "windowpost": "WdPost",
    "window": "WdPost",
    "wdposts": "WdPost",
    "winpost": "WinPost",
    "winningpost": "WinPost",
    "winning": "WinPost",
    "winposts": "WinPost",
}


def normal_key(name: str) -> str:
    """`name` without case, `-`, `_` or blanks: how two spellings of one key or option compare."""
    return re.sub(r"[_\-\s]", "", name).lower()


def closest(
    word: str,
    choices: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
    containing: bool = False,
    cutoff: float = 0.6,
    by_key: bool = True,
) -> str | None:
    """The one of `choices` that `word` was likely meant for, or None: the one that is the same
    but for case, `-`, `_` and blanks (`normal_key`); else its alias (keyed by normal_key); else,
    with `containing`, the one choice whose key holds the word's (3 characters or more); else
    one spelt alike (difflib at `cutoff`), and with `by_key` one whose key is spelt alike.
    Config keys and command-line options both ask it ('did you mean ...?')."""
    by_normal = {normal_key(c): c for c in choices}
    key = normal_key(word)
    match = by_normal.get(key) or (aliases or {}).get(key)
    if match is not None:
        return match
    if containing:
        holding = [c for c in choices if len(key) >= 3 and key in normal_key(c)]
        if len(holding) == 1:
            return holding[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    if not close and by_key:
        close = [by_normal[c] for c in difflib.get_close_matches(key, list(by_normal), 1, cutoff)]
    return close[0] if close else None


def _suggest(word: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
    """'did you mean ...?' for a misspelt key, or '' when nothing is close."""
    match = closest(word, choices, aliases=aliases)
    return f"did you mean '{match}'?" if match else ""


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    """A value as it would be written in TOML, shortened for messages."""
    text = _toml(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _toml(value: Any, limit: int = 60, depth: int = 0) -> str:
    # `limit` and `depth` bound the work: a value may be a huge or deeply nested list.
    if depth > 8:
        return "[...]" if isinstance(value, list) else "{...}" if isinstance(value, dict) else "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 13_000:  # str() refuses more than 4300 digits
            return "(a number of thousands of digits)"
        text = str(value)
        return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} digits)"
    if isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        parts: list[str] = []
        size = 0
        for k, v in items:
            if size > limit:
                parts.append("...")
                break
            part = _toml(v, limit, depth + 1)
            if k is not None:
                part = f"{_toml_key(k)} = {part}"
            parts.append(part)
            size += len(part) + 2
        inner = ", ".join(parts)
        return f"[{inner}]" if isinstance(value, list) else "{" + inner + "}"
    if isinstance(value, (datetime, date, time)):
        return f"{value.isoformat()} (a date/time)"
    return repr(value)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _syntax_error(text: str, source: str, exc: Exception) -> str:
    message = str(exc)
    m = _TOML_POSITION.search(message)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        message = message[: m.start()]
    else:
        lines = text.split("\n")
        line, col = len(lines), len(lines[-1]) + 1
        message = _TOML_END.sub("", message)
        message += " (at end of file)"
    message = message[:1].lower() + message[1:]
    for known, hint in _SYNTAX_HINTS.items():
        if message.startswith(known):
            message += f" ({hint})"
            break
    return f"{source}:{line}:{col}: invalid TOML: {message}"


# tomllib's wording for the mistakes people make most, and what they usually mean.
_SYNTAX_HINTS = {
    "cannot overwrite a value": "is a key given twice in one table?",
    "cannot declare": "is a table header given twice? use [[...]] for one table per child",
    "illegal character '\\n'": "is a string missing its closing quote?",
    "unterminated string": "is a string missing its closing quote?",
    "expected '=' after a key": "write Key = value",
}
