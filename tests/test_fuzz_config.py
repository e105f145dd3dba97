"""Fuzzing ext-prover.cfg: random text, random TOML documents built from the real keys
with values of every type, and random mutations of the seed configs. The config reader must
either return a config that keeps the ChildSpec invariants or raise ConfigError (a UsageError:
exit 2) with a message naming the file; nothing else, ever. A few mutated files also go through
`damocles-ext check-config` in a subprocess: exit 0 or 2, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from pathlib import Path

import pytest
from helpers.frontend import dext_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damocles_ext import config as config_mod
from damocles_ext.config import VALID_KEYS, ConfigError, parse_config
from damocles_ext.errors import UsageError

SOURCE = "/etc/damocles-ext/ext-prover.cfg"
SEEDS = sorted((Path(__file__).parent / "configs").glob("*.cfg"))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_or_refuse(text: str) -> None:
    """Parse `text`; a returned config must be usable, a refusal must be a clear ConfigError."""
    with pytest.MonkeyPatch.context() as mp:
        two_gpus = config_mod.GpuProbe([0, 1], [], answered=True)
        mp.setattr(
            config_mod.machine, "probe_gpus", lambda: two_gpus
        )  # Gpus = "all", no nvidia-smi
        try:
            cfg = parse_config(text, SOURCE, tmp_root="/tmp/damocles-ext")
        except ConfigError as exc:
            assert isinstance(exc, UsageError) and exc.exit_code == 2
            assert exc.errors and all(isinstance(e, str) and e.strip() for e in exc.errors)
            assert SOURCE in str(exc)
            return
    check_invariants(cfg)


def check_invariants(cfg) -> None:
    names = [c.name for c in cfg.children]
    assert len(set(names)) == len(names)
    for c in cfg.children:
        assert c.stage in ("window_post", "winning_post")
        assert c.argv and all(isinstance(a, str) and "\0" not in a for a in c.argv)
        assert all("\0" not in k + v and "=" not in k for k, v in c.envs.items())
        assert 1 <= c.concurrent <= config_mod.MAX_CONCURRENT
        assert 1 <= c.weight <= config_mod.MAX_WEIGHT
        assert 1 <= c.max_attempts <= config_mod.MAX_ATTEMPTS
        assert 0 < c.ready_timeout <= config_mod.MAX_SECONDS
        assert c.protocol in ("auto", "dext", "jsonl")
        assert c.kind in ("bin", "plugin", "damocles-worker")
        assert 0 <= c.cancel_grace <= config_mod.MAX_SECONDS
        assert c.request_timeout is None or 0 < c.request_timeout <= config_mod.MAX_SECONDS
        for t in (c.heartbeat_timeout, c.stdin_timeout):  # 0: off
            assert t is None or 0 <= t <= config_mod.MAX_SECONDS
        assert c.cpuset is None or all(0 <= n <= config_mod.MAX_CPU for n in c.cpuset)
        assert all("\0" not in k + str(v) for k, v in c.plugin_options.items())
        assert all(isinstance(lock, str) for lock in c.locks)


# -- TOML rendering of generated documents ------------------------------------------------------


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)  # JSON escapes are TOML basic-string escapes
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 10**18, 2**64, 10**400, 1024, 1025, 86400, 86401]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "dext", "jsonl", "all", "0-3,5", "echo", "sleep", "/bin/true", ""]),
    st.sampled_from(["0-99999999999", "8191", "8192", "0-" + "9" * 5000, "a\x00b"]),
    st.dates(),
    st.datetimes(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4),
    ),
    max_leaves=8,
)
keys = st.one_of(
    st.sampled_from(VALID_KEYS), st.sampled_from(["bin", "Args ", "Gpu", "Concurency"]), st.text()
)
blocks = st.dictionaries(keys, values, max_size=8)


@st.composite
def documents(draw) -> str:
    lines = []
    for key, value in draw(st.dictionaries(st.text(max_size=6), values, max_size=2)).items():
        lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for _ in range(draw(st.integers(0, 4))):
        table = draw(st.sampled_from(["WdPost", "WinPost", "WdPost", "WinPost", "Other"]))
        lines.append(f"[[{table}]]")
        for key, value in draw(blocks).items():
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.text(max_size=300))
def test_random_text_is_a_config_or_a_clear_config_error(text):
    parse_or_refuse(text)


@settings(FUZZ, max_examples=150)  # each document is parsed whole: ~15 ms an example
@given(documents())
def test_random_toml_with_the_real_keys_is_a_config_or_a_clear_config_error(text):
    parse_or_refuse(text)


# -- mutations of the seed configs -------------------------------------------------------------

REPLACEMENTS = [
    "-1", "0", "1", "1e308", "-0.0", "nan", "inf", "true", '""', '"\\u0000"', "[]", "[1, 2]",
    '["a", 1]', "{}", "{ a = 1 }", "1979-05-27", '"all"', '"0-3,,5"', '"99999-1"', "[[1]]",
    "9223372036854775808", '"' + "x" * 5000 + '"', "1" + "0" * 30, '"0-99999999999"',
    "[" * 400 + "]" * 400, '{ "a\\u0000" = "b" }',
]  # fmt: skip


def mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        i = rng.randrange(len(lines)) if lines else 0
        if kind == 0 and lines:
            del lines[i]
        elif kind == 1 and lines:
            lines.insert(i, lines[i])
        elif kind == 2 and lines and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {rng.choice(REPLACEMENTS)}"
        elif kind == 3:
            blob = "".join(rng.choice("[]{}=\"'#,.\n \\0aZ\x00\u00e9") for _ in range(5))
            joined = "\n".join(lines)
            at = rng.randrange(len(joined) + 1)
            lines = (joined[:at] + blob + joined[at:]).splitlines()
        elif kind == 4:
            joined = "\n".join(lines)
            lines = joined[: rng.randrange(len(joined) + 1)].splitlines()
        elif lines:
            lines[i] = lines[i].replace("WdPost", "WinPost").replace("Concurrent", "Concurent")
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 2**32))
def test_mutated_seed_configs_are_a_config_or_a_clear_config_error(seed_file, seed):
    parse_or_refuse(mutate(seed_file.read_text(), random.Random(seed)))


def test_the_seed_configs_are_there_to_mutate():
    assert len(SEEDS) >= 4
    for seed_file in SEEDS:
        parse_or_refuse(seed_file.read_text())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_check_config_on_a_mutated_file_exits_0_or_2_without_a_traceback(tmp_path, seed):
    rng = random.Random(seed)
    text = mutate(rng.choice(SEEDS).read_text(), rng)
    path = tmp_path / "ext-prover.cfg"
    path.write_text(text)
    result = dext_run("check-config", "-c", str(path))
    assert result.returncode in (0, 2), result.stderr.decode()
    assert b"Traceback" not in result.stderr
    if result.returncode == 2:
        assert str(path).encode() in result.stderr
