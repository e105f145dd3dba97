"""How PluginOptions reach a plugin child: in its environment, or `--option KEY=VALUE`.

The supervisor passes a child's PluginOptions in the environment variable `OPTIONS_ENV`, a JSON
object (options_env_value), not on its command line: every local user can read a process's
command line (`ps`), only its own user and root its environment, and an option may be a secret
(a remote prover's API key). The child runtime reads it (options_from_env) and removes it from
its environment, so that what its prover starts does not inherit it. A person running
`damocles-ext child` by hand gives `--option KEY=VALUE` (parse_options); a value keeps its TOML
type both ways ("123" stays a string, 123 an integer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, MutableMapping

#: The environment variable that carries a plugin child's PluginOptions, a JSON object.
OPTIONS_ENV = "DAMOCLES_EXT_PLUGIN_OPTIONS"

OptionValue = str | int | float | bool


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


def options_env_value(options: Mapping[str, OptionValue]) -> str:
    """`options` as OPTIONS_ENV's value: JSON, ASCII only (any locale can pass it to exec)."""
    return json.dumps(dict(options), ensure_ascii=True, separators=(",", ":"))


def _json_type(value: object) -> str:
    return {list: "array", dict: "object", type(None): "null"}.get(type(value), "value")


def options_from_env(text: str) -> dict[str, OptionValue]:
    """OPTIONS_ENV's value read back; ValueError saying what is wrong if it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (nested deeper than the parser goes)
        raise ValueError(
            f"{OPTIONS_ENV} is not JSON ({exc}); it is set by the supervisor"
        ) from None
    problem = None
    if not isinstance(value, dict):
        problem = f"holds a JSON {_json_type(value)}, not an object of plugin options"
    else:
        for key, item in value.items():
            if not isinstance(item, str | int | float | bool):
                problem = (
                    f"option {key!r} is a JSON {_json_type(item)}; a plugin option is a"
                    " string, a number or true/false"
                )
                break
    if problem is not None:
        raise ValueError(f"{OPTIONS_ENV} {problem}")
    return value


def child_options(items: Iterable[str], env: MutableMapping[str, str]) -> dict[str, OptionValue]:
    """A plugin child's options: OPTIONS_ENV's, taken out of `env` (the child's os.environ),
    and its `--option` items; an option given both ways is an error."""
    options = parse_options(items)
    text = env.pop(OPTIONS_ENV, None)
    if text is None:
        return options
    passed = options_from_env(text)
    for key in passed.keys() & options.keys():
        raise ValueError(
            f"--option {key!r} is given on the command line and in {OPTIONS_ENV}; give it once"
        )
    return {**passed, **options}
