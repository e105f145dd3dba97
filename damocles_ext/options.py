"""`--option KEY=VALUE`: how PluginOptions travel on a plugin child's command line.

config.py writes them (format_option) and the child runtime reads them back (parse_options);
a value keeps its TOML type both ways ("123" stays a string, 123 an integer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable


def coerce_value(text: str) -> str | int | float | bool:
    """An option value from text: bool, int or float when unambiguous, else the string.

    A value in double quotes is a JSON string and stays a string (`K="123"`).
    """
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text, 10)
    except ValueError:
        pass
    if lowered.strip() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity"):
        return text  # float() accepts these, but nobody means them as numbers
    try:
        return float(text)
    except ValueError:
        return text


def parse_option(item: str) -> tuple[str, str | int | float | bool]:
    """Split one `KEY=VALUE`; ValueError with a message for a person if it is not one."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--option {item!r}: expected KEY=VALUE, e.g. --option seconds=1.5")
    return key, coerce_value(value)


def parse_options(items: Iterable[str]) -> dict[str, str | int | float | bool]:
    """Parse every `--option KEY=VALUE`; a repeated key is an error."""
    options: dict[str, str | int | float | bool] = {}
    for item in items:
        key, value = parse_option(item)
        if key in options:
            raise ValueError(f"--option {key!r} given twice; give each option once")
        options[key] = value
    return options


def format_option(key: str, value: str | float | bool) -> str:
    """`KEY=VALUE` that `parse_option` reads back as exactly (key, value); quotes if needed."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        plain = coerce_value(value) == value and type(coerce_value(value)) is str
        if not plain or (len(value) >= 2 and value[0] == '"' and value[-1] == '"'):
            text = json.dumps(value)
        else:
            text = value
    return f"{key}={text}"
