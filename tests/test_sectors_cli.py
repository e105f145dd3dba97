"""`damocles-ext sectors find`, run as a real process against the damocles source node
look-alike: the table and --json, not-found sectors, exit codes, and every bad input as a clear
message with exit code 2."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
import trio
from helpers.damocles_source import DamoclesSource
from helpers.frontend import DEXT, CoordinatorProcess, dext_env, dext_run_async

from damocles_ext.commands.common import parse_duration

MINER = 1000


def find(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEXT, "sectors", "find", *args],
        check=False,
        capture_output=True,
        text=True,
        env=dext_env(),
        timeout=60,
    )


@pytest.fixture
def source():
    with DamoclesSource() as server:
        yield server


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store-a"
    for n in (5, 6):
        (root / "sealed").mkdir(parents=True, exist_ok=True)
        (root / "sealed" / f"s-t0{MINER}-{n}").write_bytes(b"replica")
        (root / "cache" / f"s-t0{MINER}-{n}").mkdir(parents=True)
    return root


def test_find_prints_each_sector_its_paths_provider_and_freshness(source, store):
    source.put(MINER, 5, "a")
    result = find(f"f0{MINER}", "5", "7", "--proxy", f"127.0.0.1:{source.port}", "--attached",
                  f"a={store}")  # fmt: skip
    assert result.returncode == 1, result.stderr
    header, five, seven = result.stdout.splitlines()
    assert header.split() == ["SECTOR", "STATUS", "SEALED", "FILE", "CACHE", "DIR", "PROVIDER",
                              "FRESHNESS"]  # fmt: skip
    assert five.split()[:4] == [f"f0{MINER}/5", "found", f"{store}/sealed/s-t0{MINER}-5",
                                f"{store}/cache/s-t0{MINER}-5"]  # fmt: skip
    assert f"source 127.0.0.1:{source.port}" in five and five.endswith("fresh")
    assert seven.split()[:3] == [f"f0{MINER}/7", "not", "found"]
    assert f"sector 7 of miner {MINER} is not known to any provider" in result.stderr
    assert "Traceback" not in result.stderr


def test_find_json_gives_one_object_per_sector_and_exit_0_when_all_are_found(source, store):
    source.put(MINER, 5, "a")
    source.put(MINER, 6, "a")
    result = find(str(MINER), "5-6", "--proxy", source.url, "--attached", f"a={store}", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["number"], r["status"], r["sealed_store"], r["cached"]) for r in rows] == [
        (5, "found", "a", False),
        (6, "found", "a", False),
    ]


def test_find_reads_the_stores_from_the_conf_dir_sector_manager_cfg(source, store, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "sector-manager.cfg").write_text(
        f'[[Common.PersistStores]]\nName = "a"\nPath = "{store}"\n'
    )
    source.put(MINER, 6, "a", upgrade=False)
    result = find(str(MINER), "6", "--proxy", source.url, "--conf-dir", str(conf), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cache_dir"] == f"{store}/cache/s-t0{MINER}-6"


def test_find_without_a_source_scans_the_attached_stores(store):
    result = find(str(MINER), "5", "--attached", f"a={store}", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["provider"] == "scan of 1 store" and row["sealed_store"] == "a"


def test_an_unknown_store_from_the_source_is_reported_with_the_store_and_the_sector(source, store):
    source.put(MINER, 5, "other")
    source.put(MINER, 7, "other")
    result = find(str(MINER), "5", "7", "--proxy", source.url, "--attached", f"a={store}")
    # 5 is found by the scan of store a all the same; 7 is nowhere.
    assert result.returncode == 1
    five, seven = result.stdout.splitlines()[1:]
    assert "found" in five and "scan of 1 store" in five and "error" in seven
    for n in (5, 7):
        assert f"sector {n} of miner {MINER}: the source node" in result.stderr
    assert "store 'other' is not known here" in result.stderr and "Traceback" not in result.stderr


def test_a_source_refusing_the_token_is_said_once_with_exit_code_2(store):
    with DamoclesSource(headers={"Authorization": "Bearer right"}) as source:
        result = find(str(MINER), "5-7", "--proxy", source.url, "--attached", f"a={store}",
                      "--header", "Authorization: Bearer wrong")  # fmt: skip
    assert result.returncode == 2, result.stderr  # sector 7, on no store, left unanswered
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "HTTP 401" in error and "it does not take the token sent" in error
    # Said once (beside the locator's own warning), not in each sector's detail line; what was
    # found is still printed.
    said = [x for x in result.stderr.splitlines() if "it does not take the token sent" in x]
    assert said[1:] == [error] and said[0].startswith("sector provider source"), said
    assert "Traceback" not in result.stderr
    assert "s-t01000-5" in result.stdout and "s-t01000-6" in result.stdout, result.stdout
    # Every sector found by another provider: the refusal is said, and the exit code is 0.
    with DamoclesSource(headers={"Authorization": "Bearer right"}) as source:
        found = find(str(MINER), "5-6", "--proxy", source.url, "--attached", f"a={store}",
                     "--header", "Authorization: Bearer wrong")  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert "warning: source" in found.stderr and "it does not take the token sent" in found.stderr


async def test_our_coordinator_refusing_the_token_is_said_once_with_exit_code_2(store, tmp_path):
    """A damocles-ext coordinator with --token-file refuses a lookup without the token with HTTP
    401 and a JSON-RPC error body (not a bare 401 as go-jsonrpc's auth answers): a refusal all
    the same, said once, exit code 2, not one error per sector with exit code 1."""
    token = tmp_path / "token"
    token.write_text("right\n")
    token.chmod(0o600)
    coordinator = CoordinatorProcess(f"sqlite:///{tmp_path}/jobs.db", "--token-file", str(token))
    async with trio.open_nursery() as nursery:
        await coordinator.start(nursery)
        try:
            result = await dext_run_async("sectors", "find", str(MINER), "5-7", "--proxy",
                                          f"127.0.0.1:{coordinator.port}", "--attached",
                                          f"a={store}")  # fmt: skip
        finally:
            coordinator.stop()
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr  # sector 7, on no store, left unanswered
    [error] = [line for line in stderr.splitlines() if "error:" in line]
    assert "requires a bearer token" in error, stderr
    # The coordinator's own words name its --token-file and a worker's; how this command sends
    # the token is said after them.
    assert error.endswith(
        "; give the one it takes as the header 'Authorization: Bearer TOKEN' (--header; a"
        " worker's --proxy-header)"
    ), error
    said = [x for x in stderr.splitlines() if "requires a bearer token" in x]
    assert said[1:] == [error] and said[0].startswith("sector provider source"), said
    assert "Traceback" not in stderr
    assert b"s-t01000-5" in result.stdout and b"s-t01000-6" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x1000", "5", "--attached", "a=/x"], "is not a miner"),
        (["1000", "five", "--attached", "a=/x"], "is not a sector number"),
        # ASCII digits only: re's \d took these for miner 1, sector 3.
        (["\uff10\uff11", "5", "--attached", "a=/x"], "is not a miner"),
        (["1000", "\u0663", "--attached", "a=/x"], "is not a sector number"),
        (["1000", "1-\u0663", "--attached", "a=/x"], "is not a sector number"),
        (["1000", "9-3", "--attached", "a=/x"], "ends before it starts"),
        # Thousands of digits: int()'s own "Exceeds the limit (4300 digits)" words, or all of
        # them echoed back.
        (["1000", "9" * 5000, "--attached", "a=/x"], "a sector number is below 2^64"),
        (["1000", "1-" + "9" * 5000, "--attached", "a=/x"], "a sector number is below 2^64"),
        (["9" * 5000, "1", "--attached", "a=/x"], "is not a miner"),
        (["1000", "5"], "nothing to find sectors with"),
        (["1000", "5", "--proxy", "127.0.0.1:1"], "no store is known here"),
        (["1000", "5", "--proxy", "ftp://x", "--attached", "a=/x"], "only http://"),
        (["1000", "5", "--attached", "nonsense"], "expected NAME=PATH"),
        (["1000", "5", "--attached", "a=./x"], "'a=./x': PATH must be absolute"),
        (["1000", "5", "--attached", "a=/x", "--attached", "a=/y"], "given twice"),
        (["1000", "5", "--conf-dir", "/nonexistent/conf"], "does not exist"),
        # Without --proxy there is no source node to send it to: it was ignored, silently.
        (
            ["1000", "5", "--attached", "a=/x", "--header", "Authorization: Bearer t"],
            "--header goes with --proxy ADDR: it is sent to that source node",
        ),
        # Headers the HTTP client sets itself: before, every call failed and the exit was 0.
        *(
            (
                ["1000", "5", "--attached", "a=/x", "--header", f"{name}: {value}"],
                f"argument --header: {name} is a header the HTTP client sets itself",
            )
            for name, value in (
                ("Host", "x"),
                ("Content-Length", "0"),
                ("Transfer-Encoding", "chunked"),
                ("connection", "close"),
            )
        ),
    ],
)
def test_bad_input_is_a_clear_message_and_exit_code_2(args, message):
    result = find(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_store_path_with_a_nul_character_is_exit_code_2_naming_the_file(tmp_path):
    # It was a traceback (ValueError: embedded null byte) out of the check of the files.
    (tmp_path / "sector-manager.cfg").write_text(
        '[[Common.PersistStores]]\nName = "a"\nPath = "/x\\u0000y"\n'
    )
    result = find("1000", "5", "--conf-dir", str(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "has a NUL character" in result.stderr and "sector-manager.cfg" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_conf_dir_without_sector_manager_cfg_is_exit_code_2(tmp_path):
    result = find("1000", "5", "--conf-dir", str(tmp_path))
    assert result.returncode == 2 and "no sector-manager.cfg" in result.stderr


def test_a_sector_found_where_its_files_are_not_says_so_and_is_exit_1(source, store, tmp_path):
    """The source says the sector is in store b (moved there, say), but its files are not there
    on this machine: `sectors find` says so, as it does for a sector whose files are gone,
    instead of a plain "found" and exit 0 for a sector a prover here would answer faulty."""
    other = tmp_path / "store-b"
    other.mkdir()
    source.put(MINER, 5, "b")  # its files are in a
    source.put(MINER, 6, "a")
    where = ("--proxy", f"127.0.0.1:{source.port}", "--attached", f"a={store}", "--attached",
             f"b={other}")  # fmt: skip
    result = find(f"f0{MINER}", "5", "6", *where)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"{other}/sealed/s-t0{MINER}-5 does not exist" in result.stderr
    assert f"sector 5 of miner {MINER}" in result.stderr and "sector 6" not in result.stderr
    assert "Traceback" not in result.stderr
    five, six = map(json.loads, find(f"f0{MINER}", "5", "6", "--json", *where).stdout.splitlines())
    assert five["status"] == "found" and "does not exist" in five["detail"]
    assert six["status"] == "found" and six["detail"] == ""


class SlowSource(DamoclesSource):
    """A source node that takes `delay` seconds over each lookup (a loaded one, a long way off)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def _find(self, index_type, sid):
        time.sleep(self.delay)
        return super()._find(index_type, sid)


def test_sectors_the_source_had_no_time_to_be_asked_for_are_said_with_the_timeout_to_give(
    tmp_path,
):
    """More sectors than a source answers in its share of --timeout: the ones it was never
    asked for each said "no answer in the time this lookup had (at most 5 s)", as if each lookup
    had timed out (`sectors find 0-23489` on the default 30s: 6,400 such rows), and nothing said
    what to do. Now each says it was not asked, the count is said once with the --timeout that
    would do, and that --timeout does."""
    store = tmp_path / "store-a"  # the files are not here: the scan finds none of them
    store.mkdir()
    with SlowSource(delay=0.02) as source:  # 8 connections: at most 400 lookups a second
        for n in range(300):
            source.put(MINER, n, "a")
        where = ("--proxy", source.url, "--attached", f"a={store}")
        # 1 s: the source's share is half of three quarters of it, about 0.4 s.
        short = find(str(MINER), "0-299", *where, "--timeout", "1s", "--json")
        rows = [json.loads(line) for line in short.stdout.splitlines()]
        [said] = [line for line in short.stderr.splitlines() if "share of --timeout" in line]
        advice = re.search(r"give --timeout (\w+) or more", said)
        assert advice is not None, said
        advised = parse_duration(advice.group(1))
        # Four times what it said: the pace of the first run is no promise on a loaded machine.
        longer = f"{math.ceil(4 * advised)}s"
        enough = find(str(MINER), "0-299", *where, "--timeout", longer, "--json")
    assert short.returncode == 1, short.stderr
    never = [r for r in rows if "not asked" in r["detail"]]
    cut = [r for r in rows if "no answer in the time this lookup had" in r["detail"]]
    found = [r for r in rows if r["status"] == "found"]
    assert never and found and len(never) + len(cut) + len(found) == 300, short.stderr
    assert all(r["status"] == "error" for r in never + cut)
    assert not any("no answer in the time" in r["detail"] for r in never)
    assert said.startswith(
        f"damocles-ext sectors find: error: source 127.0.0.1:{source.port}: its share of"
        " --timeout 1s ("
    ), said
    assert (
        f") ran out before it was asked for {len(never)} of the 300 sectors (it answered"
        f" {len(found)} in that time); give --timeout {advice.group(1)} or more (in"
        " proportion to the sectors, at the pace it answered), or ask for fewer sectors per call"
    ) in said, said
    # Each sector not asked says so, and what to do in this command's words.
    assert never[0]["detail"].startswith(
        f"source 127.0.0.1:{source.port}: sector {never[0]['number']} of miner {MINER}: not"
        " asked: the 0.4 s this provider had of the lookup's time ran out before its turn;"
        f" {len(never)} of 300 sectors were not asked"
    ), never[0]["detail"]
    assert f"give --timeout {advice.group(1)} or more" in never[0]["detail"]
    assert "Traceback" not in short.stderr
    # What it said is in proportion to the sectors at the pace the source answered, and a
    # --timeout long enough finds every sector (whose files are on other machines).
    assert advised >= 300 / len(found), said
    assert [json.loads(line)["status"] for line in enough.stdout.splitlines()] == ["found"] * 300
    assert "not asked" not in enough.stderr and "share of --timeout" not in enough.stderr


def test_a_store_not_mounted_is_named_when_sectors_are_not_found(store, tmp_path):
    # It said only "not known to any provider (asked: scan of 2 stores)": not that one of the
    # stores it scanned is not there at all.
    gone = tmp_path / "not-mounted"
    result = find(str(MINER), "5", "7", "--attached", f"a={store}", "--attached", f"b={gone}")
    assert result.returncode == 1, result.stderr
    assert (
        f"damocles-ext sectors find: warning: store 'b': {gone} does not exist: is the store"
        " mounted, and given at the right path (--attached, or --conf-dir's"
        " [[Common.PersistStores]])? No sector is found in it\n"
    ) in result.stderr
    assert "store 'a'" not in result.stderr and "Traceback" not in result.stderr
    # Every sector found: nothing to explain.
    result = find(str(MINER), "5", "--attached", f"a={store}", "--attached", f"b={gone}")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_a_relative_store_path_in_sector_manager_cfg_is_warned_of(tmp_path):
    # damocles-manager makes it absolute from its own working directory; it was read from this
    # process's one, silently.
    (tmp_path / "sector-manager.cfg").write_text(
        '[[Common.PersistStores]]\nName = "a"\nPath = "stores/a"\n'
    )
    result = find(str(MINER), "5", "--conf-dir", str(tmp_path))
    assert (
        "[[Common.PersistStores]] #1: Path 'stores/a' is relative: damocles-manager reads it from"
        " its own working directory, and damocles-ext from this one ("
    ) in result.stderr, result.stderr
    assert "write it absolute" in result.stderr and "Traceback" not in result.stderr


HOSTILE_PLUGIN = """
import asyncio, os
from damocles_ext.hookspecs import hookimpl

class PluginStop(BaseException):
    pass

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")

RAISED = {"asyncio-cancelled": asyncio.CancelledError, "own-base-exception": PluginStop,
          "unprintable": Unprintable}[os.environ["HOSTILE_RAISES"]]

class Provider:
    name = "hostile"

    async def find(self, sector):
        raise RAISED()

    async def find_batch(self, sectors):
        raise RAISED()

@hookimpl
def dext_sector_providers(settings):
    if os.environ.get("HOSTILE_IN") == "hook":
        raise RAISED()
    return [Provider()]
"""


@pytest.mark.parametrize("raised", ["asyncio-cancelled", "own-base-exception", "unprintable"])
def test_a_plugin_provider_raising_a_base_exception_or_an_unprintable_one_is_asked_past(
    store, tmp_path, raised
):
    """A plugin provider's asyncio.CancelledError, BaseException of its own or exception whose
    str() raises ended `sectors find` with a traceback: the next provider answers instead; out
    of the hook itself, it is exit 2 naming it."""
    from helpers.child import make_plugin_dist

    plugins = make_plugin_dist(
        tmp_path / "plugins", dist="hostile-sectors", module="hostile_sectors",
        source=HOSTILE_PLUGIN,
    )  # fmt: skip
    env = {**dext_env(), "PYTHONPATH": str(plugins), "HOSTILE_RAISES": raised}
    command = [*DEXT, "sectors", "find", str(MINER), "5", "--attached", f"a={store}", "--json"]

    def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=60, env=env
        )

    result = run(env)
    assert result.returncode == 0, result.stderr
    [row] = map(json.loads, result.stdout.splitlines())
    assert row["status"] == "found" and row["provider"] == "scan of 1 store"
    assert "hostile: sector 5 of miner 1000:" in row["detail"], row["detail"]
    assert "Traceback" not in result.stderr
    result = run({**env, "HOSTILE_IN": "hook"})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "plugin 'hostile_sectors': its dext_sector_providers failed" in result.stderr
    assert "Traceback" not in result.stderr
