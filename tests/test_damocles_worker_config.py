"""damocles-worker.toml read as is: what `damocles-ext worker` takes from it, what it reports,
and the errors for bad values.

The realistic file is tests/configs/damocles-worker.toml (modelled on damocles' own example);
the bad ones are written here, each next to the message it must give.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from helpers.races import deleted_as_it_is_opened
from helpers.supervisor import jsonl_child, who, window_task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damocles_ext.api import open_supervisor
from damocles_ext.config import ConfigError, check_startable
from damocles_ext.config.damocles_worker import (
    ENV_CGROUP_CPUSET,
    ENV_CGROUP_NAME,
    ENV_NUMA_PREFERRED,
    AttachedStore,
    load_damocles_worker_config,
    parse_damocles_worker_config,
)
from damocles_ext.config.damocles_worker_keys import (
    ATTACHED,
    PROCESSOR,
    SCHEMA,
    THREAD,
    parse_humantime,
    sector_size,
)
from damocles_ext.config.spec import MAX_CONCURRENT
from damocles_ext.errors import EXIT_USAGE, UsageError
from damocles_ext.jobs.endpoint import parse_endpoint
from damocles_ext.tasks import WindowPoStOutput

FIXTURE = Path(__file__).parent / "configs" / "damocles-worker.toml"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig"  # the fixture's bearer token


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory holding the fixture's ./persist stores, as the working directory."""
    for store in ("persist/store1", "persist/store2"):
        (tmp_path / store).mkdir(parents=True)
    shutil.copy(FIXTURE, tmp_path / "damocles-worker.toml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(text: str, tmp_path: Path, **kwargs):
    return parse_damocles_worker_config(text, str(tmp_path / "damocles-worker.toml"), **kwargs)


# A small valid file; the bad-value tests change one thing in it.
BASE = """
[sector_manager]
rpc_client.addr = "/ip4/127.0.0.1/tcp/1789"

[[sealing_thread]]
plan = "wdpost"

[[attached]]
name = "s1"
location = "{store}"
"""


def base(tmp_path: Path, extra: str = "", **replace: str) -> str:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    text = BASE.replace("{store}", str(store))
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text + extra


def test_the_realistic_file_gives_the_worker_its_manager_name_and_token(site):
    cfg = load_damocles_worker_config("damocles-worker.toml")
    assert cfg.manager == "/ip4/10.0.0.2/tcp/1789"
    assert parse_endpoint(cfg.manager).url == "http://10.0.0.2:1789/rpc/v0"
    assert cfg.name == "gpu-box-07"
    # The bearer token is the token; the other headers are sent as written.
    assert cfg.token == TOKEN
    assert cfg.headers == {"User-Agent": "jsonrpc-core-client"}
    assert TOKEN not in repr(cfg)


def test_the_realistic_file_gives_each_wdpost_thread_its_merged_filters(site):
    cfg = load_damocles_worker_config("damocles-worker.toml")
    first, second = cfg.threads
    # Its own sealing.* keys win over [sealing]...
    assert (first.index, first.allowed_miners, first.allowed_sizes) == (2, (10123,), ("32GiB",))
    assert first.allowed_proof_types == (
        "StackedDrgWinning32GiBV1",
        "StackedDrgWindow32GiBV1",
        "StackedDrgWindow32GiBV1_2",
    )
    assert first.recover_interval == 15.0
    # ...and a thread without them takes [sealing]'s.
    assert second.allowed_miners == (10123, 10124)
    assert second.allowed_sizes == ("32GiB", "64GiB")
    assert second.recover_interval == 15.0
    # Threads of other plans are counted (a thread without plan is a sealer), not read.
    assert cfg.other_threads == {"sealer": 1, "snapup": 1}
    # What one worker pulling for both threads asks for.
    assert cfg.allowed_miners == (10123, 10124)
    assert cfg.allowed_sizes == ("32GiB", "64GiB")
    assert cfg.idle_poll == 15.0
    assert cfg.window_post_limit == 2 and cfg.max_jobs == 2


def test_the_realistic_file_attaches_its_stores_named_as_damocles_names_them(site):
    cfg = load_damocles_worker_config("damocles-worker.toml")
    store2 = os.path.realpath(site / "persist" / "store2")
    assert cfg.attached == (
        AttachedStore("persist-store1", os.path.realpath(site / "persist" / "store1"), False),
        AttachedStore(store2, store2, True),  # no name: its absolute path
    )


def test_the_realistic_file_turns_window_post_processors_into_children(site):
    cfg = load_damocles_worker_config("damocles-worker.toml")
    builtin, own = cfg.children
    assert [c.name for c in cfg.children] == ["window_post#0", "window_post#1"]
    # No bin: damocles-worker's own processor, as damocles-worker runs it.
    assert builtin.argv == ("damocles-worker", "processor", "window_post")
    assert builtin.kind == "damocles-worker"
    assert builtin.envs[ENV_CGROUP_NAME] == f"vc-worker/sub-window_post-{os.getpid()}-0"
    assert builtin.envs[ENV_CGROUP_CPUSET] == "16-23"
    assert builtin.cpuset == frozenset(range(16, 24))
    assert builtin.envs["TMPDIR"] == "/var/tmp/wdpost0/"
    assert builtin.ready_timeout == 10.0  # stable_wait
    # No concurrent: as many proofs as damocles-worker would send it (2 threads, limit 2), but
    # its lock gpu0 has one holder: damocles-worker runs one proof at a time under it.
    assert builtin.concurrent == 1
    assert builtin.auto_restart and builtin.inherit_envs
    assert builtin.locks == ("gpu0", "gpu:0") and builtin.gpu == "0"
    assert own.argv == (
        "/usr/local/bin/damocles-worker-wdpost-optimized",
        "processor",
        "window_post",
        "--fast",
    )
    assert own.envs[ENV_CGROUP_NAME] == f"wdpost/sub-window_post-{os.getpid()}-1"
    assert own.envs[ENV_NUMA_PREFERRED] == "1"
    assert own.concurrent == 1 and own.ready_timeout == 5.0
    assert not own.auto_restart and not own.inherit_envs
    assert cfg.to_config().children == list(cfg.children)


def test_every_key_the_worker_does_not_read_is_reported_with_file_and_table(site):
    cfg = load_damocles_worker_config("damocles-worker.toml")
    text = "\n".join(cfg.warnings)
    assert all(w.startswith("damocles-worker.toml: ") for w in cfg.warnings)
    for table, keys in [
        ("[worker]", "rpc_server"),
        ("[metrics]", "enable, http_listen"),
        ("[sector_manager]", "piece_token"),
        ("[sealing]", "enable_deals, max_retries, seal_interval"),
        ("[sealing_thread[3].sealing]", "seal_interval"),
        ("[processors]", "static_tree_d, pc1, pc2, c2"),
        ("[processors.limitation]", "staggered"),
        ("[processors.limitation.concurrent]", "pc1, pc2, c2"),
    ]:
        assert f"{table}: {keys}: damocles-worker settings" in text, table
    assert '1 of plan "sealer", 1 of plan "snapup": sealing work, not ours' in text


def test_a_misspelt_or_retired_key_is_reported_with_a_suggestion(tmp_path):
    text = base(
        tmp_path,
        '[remote_store]\nname = "x"\nlocation = "/x"\n',
        **{'plan = "wdpost"': 'plan = "wdpost"\nsealing.alowed_miners = [1000]'},
    )
    cfg = parse(text, tmp_path)
    assert cfg.threads[0].allowed_miners == ()  # damocles ignores the typo, and so do we...
    warnings = "\n".join(cfg.warnings)
    # ...but says so.
    assert (
        "[sealing_thread[0].sealing]: ignored: 'alowed_miners' (unknown to damocles-worker too; "
        "did you mean 'allowed_miners'?)" in warnings
    )
    assert "top level: ignored: 'remote_store' (damocles-worker no longer reads it" in warnings


def test_a_misspelt_plan_is_reported_with_a_suggestion(tmp_path):
    text = base(tmp_path, '[[sealing_thread]]\nplan = "WdPost"\n')
    cfg = parse(text, tmp_path)
    assert len(cfg.threads) == 1 and cfg.other_threads == {"WdPost": 1}
    assert any(
        'sealing_thread[1].plan: "WdPost" is no damocles-worker plan (it fails that thread); '
        "did you mean 'wdpost'?" in w
        for w in cfg.warnings
    ), cfg.warnings


def test_a_thread_made_wdpost_by_its_location_config_is_read(tmp_path):
    location = tmp_path / "thread0"
    location.mkdir()
    (location / "config.toml").write_text(
        'plan = "wdpost"\nsealing.allowed_miners = [7]\nsealing.recover_interval = "2m"\n'
    )
    text = base(tmp_path, **{'plan = "wdpost"': f'location = "{location}"\nplan = "sealer"'})
    cfg = parse(text, tmp_path)
    [thread] = cfg.threads
    assert (thread.allowed_miners, thread.recover_interval) == ((7,), 120.0)
    assert any("does not reload it" in w for w in cfg.warnings)


def test_a_threads_location_config_read_as_damocles_worker_reads_it(tmp_path, monkeypatch):
    # Not there (deleted as it is read): the thread as the main file gives it; there but not
    # readable (a directory in its place): an error naming it, as damocles-worker stops on it,
    # not the thread's own plan and filters passed over.
    location = tmp_path / "thread0"
    location.mkdir()
    hot = location / "config.toml"
    hot.write_text('plan = "wdpost"\n')
    text = base(tmp_path, **{'plan = "wdpost"': f'location = "{location}"\nplan = "wdpost"'})
    with monkeypatch.context() as m:
        deleted = deleted_as_it_is_opened(m, hot)
        cfg = parse(text, tmp_path)
    assert deleted and len(cfg.threads) == 1  # the main file's wdpost thread, without its file
    assert not any("does not reload" in w for w in cfg.warnings)
    hot.mkdir()
    with pytest.raises(ConfigError) as refused:
        parse(text, tmp_path)
    assert f"{hot}: is a directory" in str(refused.value)


def test_a_thread_at_a_location_already_loaded_is_skipped_as_damocles_worker_skips_it(tmp_path):
    # damocles-worker (sealing_thread/mod.rs) canonicalises each thread's location, creating a
    # missing one first, and skips a thread whose store is already loaded, whatever its plan; we
    # counted it as one more wdpost thread: one more job at once, one more proof per child.
    (tmp_path / "thread0").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "thread0")
    wdpost = '[[sealing_thread]]\nplan = "wdpost"\nlocation = "{}"\n'
    text = base(
        tmp_path,
        wdpost.format(tmp_path / "link")  # the first thread's store, by a symlink
        + wdpost.format(tmp_path / "new")  # not there yet: damocles-worker makes it
        + wdpost.format(f"{tmp_path}/new/")
        + '[[sealing_thread]]\nplan = "wdpost"\n',  # no location: no store to share
        **{'plan = "wdpost"': f'plan = "wdpost"\nlocation = "{tmp_path}/thread0/"'},
    )
    cfg = parse(text, tmp_path)
    assert [t.index for t in cfg.threads] == [0, 2, 4]
    assert cfg.max_jobs == 3 and cfg.children[0].concurrent == 3
    said = ' damocles-worker loads a location once and skips this thread ("store already loaded"),'
    said += " so it is skipped here too; give each thread its own location"
    source, real = tmp_path / "damocles-worker.toml", os.path.realpath(tmp_path)
    first = f'{source}: sealing_thread[1].location: "{tmp_path}/link" is sealing_thread[0]\'s'
    then = f'{source}: sealing_thread[3].location: "{tmp_path}/new/" is sealing_thread[2]\'s'
    assert [w for w in cfg.warnings if "already loaded" in w] == [
        f"{first} location too ({real}/thread0);{said}",
        f"{then} location too ({real}/new);{said}",
    ]
    # Whatever its plan: the wdpost thread at a sealer's location never runs.
    shared = base(
        tmp_path,
        '[[sealing_thread]]\nplan = "wdpost"\nlocation = "{}"\n'.format(tmp_path / "link"),
        **{'plan = "wdpost"': f'plan = "sealer"\nlocation = "{tmp_path}/thread0"'},
    )
    with pytest.raises(ConfigError) as refused:
        parse(shared, tmp_path)
    [error] = refused.value.errors
    assert error.startswith('no [[sealing_thread]] with plan = "wdpost"')
    assert error.endswith(" (sealing_thread[1] is skipped: its location is sealing_thread[0]'s)")


def test_scan_persist_stores_attaches_the_stores_it_finds(tmp_path):
    for d, meta in [("a", {"ID": "123", "Name": ""}), ("b", {"Name": "456"}), ("c", None)]:
        (tmp_path / "stores" / d).mkdir(parents=True)
        if meta is not None:
            (tmp_path / "stores" / d / "sectorstore.json").write_text(json.dumps(meta))
    text = base(tmp_path, f'[worker]\nscan_persist_stores = ["{tmp_path}/stores/*"]\n')
    cfg = parse(text, tmp_path)
    assert [s.name for s in cfg.attached] == ["s1", "123", "456"]  # c has no sectorstore.json


def test_a_scanned_sectorstore_json_deleted_as_it_is_read_skips_the_store(tmp_path, monkeypatch):
    # It was looked at (isfile) and then read by its name: deleted in between, the read's "no
    # such file" was an error (exit 2) where a directory without one is skipped.
    for d in ("a", "b"):
        (tmp_path / "stores" / d).mkdir(parents=True)
        (tmp_path / "stores" / d / "sectorstore.json").write_text(json.dumps({"Name": d}))
    deleted = deleted_as_it_is_opened(monkeypatch, tmp_path / "stores" / "a" / "sectorstore.json")
    text = base(tmp_path, f'[worker]\nscan_persist_stores = ["{tmp_path}/stores/*"]\n')
    cfg = parse(text, tmp_path)
    assert [s.name for s in cfg.attached] == ["s1", "b"]
    assert deleted == [str(tmp_path / "stores" / "a" / "sectorstore.json")]


def test_a_scanned_sectorstore_json_not_a_regular_file_skips_the_store_one_denied_is_an_error(
    tmp_path,
):
    # damocles-worker's scan_persist_stores skips a store whose sectorstore.json is not a file
    # (fs::metadata, `if !m.is_file() { continue; }`): a directory or a FIFO of that name was an
    # error here (exit 2), so the worker refused a machine damocles-worker starts on. One it may
    # not read stays an error, as there (File::open fails).
    from helpers.kept_out import said_when_kept_out

    (tmp_path / "stores" / "a" / "sectorstore.json").mkdir(parents=True)
    (tmp_path / "stores" / "f").mkdir()
    os.mkfifo(tmp_path / "stores" / "f" / "sectorstore.json")
    (tmp_path / "stores" / "b").mkdir()
    (tmp_path / "stores" / "b" / "sectorstore.json").write_text(json.dumps({"Name": "b"}))
    text = base(tmp_path, f'[worker]\nscan_persist_stores = ["{tmp_path}/stores/*"]\n')
    cfg = parse(text, tmp_path)
    assert [s.name for s in cfg.attached] == ["s1", "b"]
    assert not any("sectorstore.json" in w for w in cfg.warnings)

    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is in a 0700 directory
        root = Path(tmp)
        root.chmod(0o755)
        (root / "stores" / "c").mkdir(parents=True)
        (root / "stores" / "c" / "sectorstore.json").write_text(json.dumps({"Name": "c"}))
        (root / "stores" / "c" / "sectorstore.json").chmod(0)
        text = base(root, f'[worker]\nscan_persist_stores = ["{root}/stores/*"]\n')
        said = said_when_kept_out(lambda: parse(text, root))
    assert said.startswith("ConfigError: "), said
    assert f"{root}/stores/c/sectorstore.json: cannot read the store's sectorstore.json: " in said
    assert "permission denied" in said
    assert said.rstrip().endswith("(damocles-worker stops on it too), or narrow the pattern")


@pytest.mark.parametrize(
    ("store", "pattern"),
    [(".store2", "*"), ("a/deep", "**")],
    ids=["hidden", "any-depth"],
)
def test_scan_persist_stores_matches_as_damocles_workers_glob_crate(tmp_path, store, pattern):
    # damocles-worker globs with the glob crate's defaults (MatchOptions::new():
    # require_literal_leading_dot false), so "*" matches ".store2", and "**" is any depth of
    # directories; Python's glob skipped the first and read "**" as "*": the worker lacked a
    # store damocles-worker attaches.
    for d, name in [(store, "storage2"), ("store3", "storage3")]:
        (tmp_path / "fil" / d).mkdir(parents=True)
        (tmp_path / "fil" / d / "sectorstore.json").write_text(json.dumps({"Name": name}))
    text = base(tmp_path, f'[worker]\nScanPersistStores = ["{tmp_path}/fil/{pattern}"]\n')
    cfg = parse(text, tmp_path)
    assert [s.name for s in cfg.attached] == ["s1", "storage2", "storage3"]


def test_a_negative_numa_preferred_is_passed_on_as_libnuma_reads_it_no_preferred_node(tmp_path):
    # damocles-worker takes any C int and its child hands it to numa_set_preferred, for which a
    # negative node means local allocation: a config that writes -1 for "none" must start.
    cfg = parse(base(tmp_path, "[[processors.window_post]]\nnuma_preferred = -1\n"), tmp_path)
    assert cfg.children[0].envs[ENV_NUMA_PREFERRED] == "-1"
    with pytest.raises(ConfigError) as info:
        parse(base(tmp_path, "[[processors.window_post]]\nnuma_preferred = 2000\n"), tmp_path)
    assert (
        "processors.window_post[0].numa_preferred: expected a NUMA node number from 0 to 1023,"
        " or -1 for none" in str(info.value)
    )


def test_ext_locks_hold_the_processors_to_as_many_proofs_at_once_as_damocles_worker_does(
    tmp_path,
):
    # damocles-worker takes a lock per proof: N holders let N proofs at a time run under it,
    # whatever processors run them, and the worker runs one job per wdpost thread at most.
    def children(threads: int, locks: str, *processors: str):
        text = '[[sealing_thread]]\nplan = "wdpost"\n' * (threads - 1)
        text += f"[processors.ext_locks]\n{locks}\n" + "".join(
            f"[[processors.window_post]]\n{p}\n" for p in processors
        )
        return parse(base(tmp_path, text), tmp_path).children

    # A lock of 1 makes its processors take turns, one proof at a time, though each may be
    # given more: one child at a time under our lock, one proof in it.
    one, two = children(
        4, "gpu0 = 1", 'locks = ["gpu0"]\nconcurrent = 3', 'locks = ["gpu0"]\nconcurrent = 2'
    )
    assert (one.concurrent, two.concurrent, one.locks, two.locks) == (1, 1, ("gpu0",), ("gpu0",))
    # As many holders as they run proofs at once: none ever waits, and ours would make them
    # take turns: dropped.
    one, two = children(
        5, "shared = 5", 'locks = ["shared"]\nconcurrent = 3', 'locks = ["shared"]\nconcurrent = 2'
    )
    assert (one.concurrent, two.concurrent, one.locks, two.locks) == (3, 2, (), ())
    # ... counted as the worker runs them: 2 threads, 2 proofs at once, whatever concurrent.
    one, two = children(2, "shared = 2", 'locks = ["shared"]', 'locks = ["shared"]')
    assert (one.concurrent, two.concurrent, one.locks, two.locks) == (2, 2, (), ())
    # Named by one processor: its concurrent at most the holders, and the file told so.
    (alone,) = children(4, "wide = 2", 'locks = ["wide"]\nconcurrent = 4')
    assert (alone.concurrent, alone.locks) == (2, ("wide",))
    text = '[processors.ext_locks]\nwide = 2\n[[processors.window_post]]\nlocks = ["wide"]\n'
    warned = parse(base(tmp_path, text + "concurrent = 4\n"), tmp_path).warnings
    assert any(
        'processors.window_post[0]: concurrent 4 runs as 2: [processors.ext_locks] "wide" = 2' in w
        for w in warned
    ), warned
    unset = parse(base(tmp_path, text), tmp_path).warnings  # a default lowered says nothing
    assert not any("runs as" in w for w in unset), unset
    # A device's lock is ours, not the file's: it stays when the file's lock goes.
    same_gpu = 'locks = ["shared"]\nenvs = { CUDA_VISIBLE_DEVICES = "0" }'
    one, two = children(2, "shared = 2", same_gpu, same_gpu)
    assert one.locks == two.locks == ("gpu:0",)
    # A file's lock named like a device's is the file's only where it is named.
    one, two = children(2, '"gpu:0" = 1', 'locks = ["gpu:0"]\nconcurrent = 2', "concurrent = 2")
    assert (one.concurrent, two.concurrent, one.locks, two.locks) == (1, 2, ("gpu:0",), ())


def test_a_file_without_window_post_processors_runs_damocles_workers_own(tmp_path):
    cfg = parse(base(tmp_path), tmp_path)
    [child] = cfg.children
    assert child.argv == ("damocles-worker", "processor", "window_post")
    assert child.concurrent == 1  # one wdpost thread
    assert any("no [[processors.window_post]]" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15s", 15),
        ("1m", 60),
        ("1min", 60),
        ("5min", 300),
        ("1m 30s", 90),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("2 days", 172800),
        ("60sec", 60),
    ],
)
def test_durations_read_as_humantime_reads_them(text, seconds):
    assert parse_humantime(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("15", "15 has no unit"),
        ("1.5s", "whole numbers only"),
        ("15 fortnights", "unknown unit"),
        ("soon", "a number was expected"),
        ("", "expected a duration"),
    ],
)
def test_a_duration_humantime_refuses_is_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_humantime(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("32GiB", "32GiB"), ("32 GiB", "32GiB"), ("32gi", "32GiB"), ("8MiB", "8MiB"),
     ("2KiB", "2KiB"), ("512MiB", "512MiB"), ("64GiB", "64GiB"), ("34359738368", "32GiB")],
)  # fmt: skip
def test_sector_sizes_read_as_byte_unit_reads_them(text, size):
    assert sector_size(text) == size


@pytest.mark.parametrize("text", ["32GB", "32G", "33GiB", "32gib", "big", "32 GiB extra"])
def test_a_size_that_is_not_a_sector_size_is_refused(text):
    with pytest.raises(ValueError, match="sector size"):
        sector_size(text)


# Each bad file: what to change in BASE (or add to it), and what the message must say.
BAD = [
    pytest.param(
        {'[sector_manager]\nrpc_client.addr = "/ip4/127.0.0.1/tcp/1789"\n': ""},
        "",
        "no [sector_manager] table",
        id="no-manager",
    ),
    pytest.param(
        {"/ip4/127.0.0.1/tcp/1789": "https://manager:1789"},
        "",
        "sector_manager.rpc_client.addr: 'https://manager:1789': only http://",
        id="tls-manager",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nsealing.allowed_sizes = ["33GiB"]'},
        "",
        'sealing_thread[0].sealing.allowed_sizes[0]: "33GiB" is not a sector size',
        id="bad-size",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nlocation = "/var/wd\\u0000post"'},
        "",
        "sealing_thread[0].location: contains a NUL character (\\u0000)",
        id="thread-location-nul",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nlocation = 7'},
        "",
        "sealing_thread[0].location: expected a string, found 7",
        id="thread-location-number",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nlocation = ""'},
        "",
        "sealing_thread[0].location: empty: damocles-worker cannot make a store there",
        id="thread-location-empty",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nsealing.allowed_miners = ["t01000"]'},
        "",
        'sealing_thread[0].sealing.allowed_miners[0]: expected a miner actor id (a whole number, '
        '1000 for t01000), found "t01000"',
        id="miner-address",
    ),
    pytest.param(
        {},
        "[sealing]\nrecover_interval = 15\n",
        'sealing.recover_interval: expected a duration string such as "15s" or "1m" (write "15s"',
        id="duration-number",
    ),
    pytest.param(
        {},
        "[sealing]\nseal_interval = 30\n",
        'sealing.seal_interval: expected a duration string such as "15s" or "1m" (write "30s"',
        id="unused-duration-number",  # not ours, but damocles-worker refuses the file
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "wdpost"\nsealing.enable_deals = "yes"'},
        "",
        'sealing_thread[0].sealing.enable_deals: expected true or false, found "yes"',
        id="unused-bool",
    ),
    pytest.param(
        {},
        "[sealing]\nmax_retries = -1\n",
        "sealing.max_retries: expected a whole number from 0 to 4294967295, found -1",
        id="unused-u32",
    ),
    pytest.param(
        {},
        '[sealing]\nrecover_interval = "0s"\n',
        'sealing.recover_interval: must be longer than 0, e.g. "60s"',
        id="duration-zero",
    ),
    pytest.param(
        {},
        '[[processors.window_post]]\nconcurrent = 0\n',
        "processors.window_post[0].concurrent: expected a whole number from 1 to 1024, found 0",
        id="concurrent-0",
    ),
    pytest.param(
        {},
        "[processors.limitation.concurrent]\nwindow_post = -1\n",
        "processors.limitation.concurrent.window_post: expected a whole number from 1",
        id="limit-negative",
    ),
    pytest.param(
        {},
        '[[processors.window_post]]\ncgroup.cpuset = "8-a"\n',
        'processors.window_post[0].cgroup.cpuset: "8-a" in "8-a" is not a CPU number',
        id="cpuset",
    ),
    pytest.param(
        {},
        '[[processors.window_post]]\nlocks = ["gpu9"]\n',
        'processors.window_post[0].locks[0]: lock "gpu9" is not declared in [processors.ext_locks]',
        id="undeclared-lock",
    ),
    pytest.param(
        {},
        '[[sealing_thread]]\nplan = "wdpost"\n[[sealing_thread]]\nplan = "wdpost"\n'
        '[processors.ext_locks]\ngpu = 2\n[[processors.window_post]]\nlocks = ["gpu"]\n'
        'concurrent = 2\n[[processors.window_post]]\nlocks = ["gpu"]\n',
        "[processors.ext_locks] \"gpu\" = 2, and the processors that name it run up to 3 proofs"
        " at once (processors.window_post[0] 2, processors.window_post[1] 3 (unset: one per"
        " thread)): damocles-ext's locks have one holder",
        id="lock-shared-by-counts",
    ),
    pytest.param(
        {},
        '[processors.ext_locks]\ngpu = 0\n[[processors.window_post]]\nlocks = ["gpu"]\n',
        '[processors.ext_locks] "gpu" = 0: the processors that name it'
        " (processors.window_post[0]) would never run a proof; give it 1 or more",
        id="lock-of-no-holder",
    ),
    pytest.param(
        {},
        '[[processors.window_post]]\nstable_wait = "0s"\n',
        "processors.window_post[0].stable_wait: expected more than 0s",
        id="stable-wait-0",
    ),
    pytest.param(
        {},
        "[processors.window_post]\nconcurrent = 1\n",
        "processors.window_post: written as a single table [processors.window_post]; write "
        "[[processors.window_post]]",
        id="single-table",
    ),
    pytest.param(
        {},
        '[[attached]]\nlocation = "/nonexistent/store"\n',
        'attached[1].location: "/nonexistent/store" does not exist',
        id="missing-store",
    ),
    pytest.param(
        {},
        '[[attached]]\nname = "s1"\nlocation = "/"\n',
        'attached[1]: store name "s1" is also the name of attached[0]',
        id="duplicate-store",
    ),
    pytest.param(
        {'plan = "wdpost"': 'plan = "sealer"'},
        "",
        'no [[sealing_thread]] with plan = "wdpost"',
        id="no-wdpost-thread",
    ),
    pytest.param(
        {},
        '[sector_manager.rpc_client.headers]\n"X Bad" = "1"\n',
        'sector_manager.rpc_client.headers: "X Bad" is not an HTTP header name',
        id="header-name",
    ),
    pytest.param(
        {},
        '[sector_manager.rpc_client.headers]\n"X-Site\\n" = "1"\n',
        'sector_manager.rpc_client.headers: "X-Site\\n" is not an HTTP header name',
        id="header-name-newline",  # `$` matched before a final newline
    ),
    pytest.param(
        {},
        '[sector_manager.rpc_client.headers]\nHost = "x"\n',
        "sector_manager.rpc_client.headers.Host: Host is a header the HTTP client sets itself",
        id="header-the-client-sets",
    ),
    pytest.param(
        {},
        "[worker]\nname = \n",
        "damocles-worker.toml:12:8: invalid TOML",
        id="toml-syntax",
    ),
    pytest.param(
        {'rpc_client.addr = "/ip4/127.0.0.1/tcp/1789"': 'rpc_client.addr = "/ip4/127.0.0.1/'
         'tcp/1789"\nrpc_client.headers = { X-Trace = "a\\nb" }'},
        "",
        "sector_manager.rpc_client.headers.X-Trace: a header value cannot hold a line break",
        id="header-newline",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("replace", "extra", "message"), BAD)
def test_a_bad_value_is_a_usage_error_naming_file_and_key(tmp_path, replace, extra, message):
    text = base(tmp_path, extra, **replace)
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    error = info.value
    assert isinstance(error, UsageError) and error.exit_code == EXIT_USAGE
    assert str(tmp_path / "damocles-worker.toml") in str(error)
    assert message in str(error)


def test_every_bad_value_in_a_file_is_reported_at_once(tmp_path):
    text = base(
        tmp_path,
        '[sealing]\nallowed_sizes = ["1TiB"]\nrecover_interval = "soon"\n'
        "[[processors.window_post]]\nconcurrent = 0\n",
    )
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    assert len(info.value.errors) == 3, info.value.errors


def test_what_keeps_a_processor_from_starting_is_named_by_its_table_and_key_in_the_file(
    tmp_path, monkeypatch
):
    # `worker --worker-config` checks the children can start, as run does; the messages named
    # ext-prover.cfg's WdPost[0].Bin, .Cpuset and "set Bin or Plugin", none of which is in a
    # damocles-worker.toml.
    monkeypatch.setenv("PATH", str(tmp_path))  # no damocles-worker here
    missing = base(tmp_path, '[[processors.window_post]]\nbin = "/nonexistent/prover"\n'
                   'cgroup.cpuset = "0-1023"\n[[processors.window_post]]\n')  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_startable(parse(missing, tmp_path).to_config())
    bin_, cpuset, default = info.value.errors
    assert bin_.startswith("processors.window_post[0].bin: ")
    assert cpuset.startswith("processors.window_post[0].cgroup.cpuset: CPUs ")
    assert default.startswith("processors.window_post[1]: no bin, so the child runs ")
    assert default.endswith("; set bin, or put damocles-worker on PATH")
    assert not [e for e in info.value.errors if "WdPost" in e or "Bin" in e or "Cpuset" in e]


def test_a_bin_written_with_a_tilde_as_damocles_docs_write_it_says_no_shell_expands_it(
    tmp_path, monkeypatch
):
    # damocles' docs (09.poster-node.md) write `bin="~/my_algorithm"`: neither damocles-worker
    # nor we run a shell, so it is a file named "~" there; "does not exist" left the operator,
    # whose ~/my_algorithm exists, to guess why.
    monkeypatch.setenv("HOME", str(tmp_path))
    prover = tmp_path / "my_algorithm"
    prover.write_text("#!/bin/sh\n")
    prover.chmod(0o755)
    text = base(tmp_path, '[[processors.window_post]]\nbin="~/my_algorithm"\nconcurrent = 1\n')
    with pytest.raises(ConfigError) as info:
        check_startable(parse(text, tmp_path).to_config())
    [error] = info.value.errors
    assert error == (
        "processors.window_post[0].bin: \"~/my_algorithm\" does not exist: '~' is a shell's"
        " shorthand, and no shell runs the program (nor in damocles); write the full path, e.g."
        f' "{prover}"'
    )


def test_a_table_written_in_another_case_as_damocles_docs_write_it_is_named_in_the_error(
    tmp_path,
):
    # damocles' docs (zh/19, the sector store configuration) attach a store with [[Attached]],
    # which damocles-worker does not read (serde matches "attached" only, and ignores the rest):
    # the error said to add [[attached]] to a file that seemed to have it.
    store = tmp_path / "fil-storage2"
    store.mkdir()
    text = base(tmp_path).split("[[attached]]")[0] + (
        "# /path/to/damocles-worker.toml\n"
        "# ...\n"
        "[[Attached]]\n"
        'name = "storage2" # 必须与 damocles-manager 配置中的 PersistStore 名称一致\n'
        f'location = "{store}"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    [error] = info.value.errors
    assert error.startswith("no [[attached]] store: ")
    assert error.endswith(
        " (the file's [[Attached]] is not read: key names are lower-case, and damocles-worker"
        " ignores [[Attached]] too; write [[attached]])"
    )
    manager = text.replace("[sector_manager]", "[Sector_Manager]")
    with pytest.raises(ConfigError, match=r"the file's \[Sector_Manager\] is not read"):
        parse(manager, tmp_path)


def test_a_missing_file_is_a_usage_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_damocles_worker_config(tmp_path / "damocles-worker.toml")


ENV_PROBE = """
import base64
seen = {k: os.environ.get(k) for k in ("VC_CG_NAME", "VC_CG_CPUSET", "SITE")}
seen["affinity"] = sorted(os.sched_getaffinity(0))
proof = base64.b64encode(json.dumps(seen).encode()).decode()
msg = {"id": req["id"], "err_msg": None, "output": {"proofs": [proof], "faults": []}}
sys.stdout.write(json.dumps(msg) + "\\n")
sys.stdout.flush()
"""


async def test_a_window_post_processor_of_the_file_proves_under_the_supervisor(tmp_path):
    # The child is a real damocles-style processor (JSON lines); it reports what it was given.
    cpu = min(os.sched_getaffinity(0))
    program, *args = jsonl_child(ENV_PROBE)
    text = base(
        tmp_path,
        f"[[processors.window_post]]\nbin = {json.dumps(program)}\nargs = {json.dumps(args)}\n"
        f'cgroup.cpuset = "{cpu}"\nenvs = {{ SITE = "rack7" }}\n',
    )
    cfg = parse(text, tmp_path, pid=4242)
    async with open_supervisor(cfg.to_config()) as sup:
        output = await sup.submit(window_task())
    assert isinstance(output, WindowPoStOutput)
    seen = json.loads(output.proofs[0])  # the JSON lines' base64, decoded
    assert seen == {
        "VC_CG_NAME": "vc-worker/sub-window_post-4242-0",
        "VC_CG_CPUSET": str(cpu),
        "SITE": "rack7",
        "affinity": [cpu],
    }
    assert sys.executable == program


async def test_a_bin_without_args_is_run_with_processor_window_post_as_damocles_worker_runs_it(
    tmp_path,
):
    # damocles-worker (processor/external/sub.rs) gives a processor without `args` the args
    # `processor window_post`, whatever its `bin`; damocles' docs write a `bin` alone. Run with
    # no arguments, such a prover never became ready and the child went FATAL.
    prover = tmp_path / "damocles-worker-c2-optimized"
    _, _, _, code = jsonl_child(
        setup='if sys.argv[1:] != ["processor", STAGE]: sys.exit(f"usage: {sys.argv}")'
    )
    prover.write_text(f"#!{sys.executable} -u\n{code}")
    prover.chmod(0o755)
    text = base(tmp_path, f"[[processors.window_post]]\nbin = {json.dumps(str(prover))}\n")
    [child] = parse(text, tmp_path).children
    assert child.argv == (str(prover), "processor", "window_post")
    assert child.kind == "bin"  # so a missing one is named by its `bin`
    with trio.fail_after(60):
        async with open_supervisor(parse(text, tmp_path).to_config()) as sup:
            output = await sup.submit(window_task(miner=1234))
    assert who(output)[0] == 1234
    # An explicit `args = []` runs it with none, as in damocles-worker; no bin: its own binary.
    [bare] = parse(text + "args = []\n", tmp_path).children
    assert bare.argv == (str(prover),)
    [own] = parse(base(tmp_path, "[[processors.window_post]]\nconcurrent = 1\n"), tmp_path).children
    assert own.argv == ("damocles-worker", "processor", "window_post")


# -- fuzzing: any document is a config or a clear ConfigError --------------------------------------

KEY_POOL = sorted(
    {k for table in (SCHEMA, THREAD, PROCESSOR, ATTACHED, SCHEMA["processors"]) for k in table}
    | set(THREAD["sealing"])
    | {"rpc_client", "addr", "headers", "cgroup", "cpuset", "group_name", "concurrent", "Name"}
)
fuzz_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.sampled_from(
        ["wdpost", "sealer", "15s", "1m 30s", "1.5s", "32GiB", "8 MiB", "32GB", "/", "/tmp",
         "/ip4/127.0.0.1/tcp/1789", "http://h:1", "Bearer t", "0-3", "0-99999999", "a\x00b",
         "gpu0", "window_post"]
    ),
)  # fmt: skip
fuzz_values = st.recursive(
    fuzz_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(KEY_POOL), st.text(max_size=5)), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@pytest.mark.parametrize(
    "addr", ["http://10.0.0.2:1789", "http://10.0.0.2:1789/", "http://10.0.0.2:1789/rpc/v1/x"]
)
def test_a_url_as_rpc_client_addr_is_dialled_at_rpc_v0_as_damocles_worker_dials_it(tmp_path, addr):
    """damocles-worker's rpc_addr (src/util/net.rs:13-58) keeps a URL's scheme, host and port
    and puts `/rpc/v{ver}` (v0: src/run.rs:56) in place of its path: a file whose addr is
    `http://HOST:1789/` works there, so it must reach the same RPC here, not POST to `/`."""
    cfg = parse(base(tmp_path, **{"/ip4/127.0.0.1/tcp/1789": addr}), tmp_path)
    assert parse_endpoint(cfg.manager).url == "http://10.0.0.2:1789/rpc/v0"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*SCHEMA, "remote_store", "odd"]), fuzz_values, max_size=6))
def test_any_document_is_a_config_or_a_clear_config_error(doc):
    text = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())
    source = "/etc/damocles-worker/damocles-worker.toml"
    try:
        cfg = parse_damocles_worker_config(text, source, tmp_root="/tmp/damocles-ext")
    except ConfigError as exc:
        assert isinstance(exc, UsageError) and exc.exit_code == EXIT_USAGE
        assert exc.errors and all(isinstance(e, str) and e.strip() for e in exc.errors)
        assert source in str(exc)
        return
    assert cfg.threads and cfg.attached and cfg.children
    assert parse_endpoint(cfg.manager)
    for child in cfg.children:
        assert 1 <= child.concurrent <= MAX_CONCURRENT and child.ready_timeout > 0
        assert all("\0" not in a for a in child.argv)
        assert all("\0" not in k + v and "=" not in k for k, v in child.envs.items())


def test_the_config_package_loads_the_damocles_worker_reader_only_when_asked_for():
    # `run` and `serve` import damocles_ext.config on their way to the ready line; the reader of
    # damocles-worker.toml is the worker's alone, yet stays reachable from the package.
    code = (
        "import sys\n"
        "import damocles_ext.config as config\n"
        "before = 'damocles_ext.config.damocles_worker' in sys.modules\n"
        "reader = config.load_damocles_worker_config\n"
        "from damocles_ext.config.damocles_worker import load_damocles_worker_config\n"
        "print(before, reader is load_damocles_worker_config)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert done.stdout.decode().split() == ["False", "True"], done.stdout.decode()
