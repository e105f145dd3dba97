"""damocles-manager's sector-manager.cfg (stores, worker-prover limits) and the mapping of a
sector's paths to damocles' store names and back."""

from __future__ import annotations

import json
import time

import pytest
from helpers.frontend import dext_run
from helpers.kept_out import a_closed_directory, said_when_kept_out
from helpers.races import deleted_as_it_is_opened
from test_jobs_rules import make_input

from damocles_ext import cli
from damocles_ext.jobs import rules
from damocles_ext.jobs.manager_config import (
    ManagerConfigError,
    load_manager_conf_dir,
    load_manager_config,
    parse_go_duration,
    parse_manager_config,
    read_settings,
)
from damocles_ext.jobs.model import SectorAccessStores
from damocles_ext.jobs.paths import SectorPathError, StoreMap
from damocles_ext.jobs.store import JobStore

GOOD = """
[Common.API]
Chain = "/ip4/127.0.0.1/tcp/1234"

[[Common.PersistStores]]
Name = "store-a"
Path = "/mnt/a"
Strict = true
AllowMiners = [1000]

[[Common.PersistStores]]
Path = "/mnt/b/"

[Common.Proving]
ParallelCheckLimit = 128

[Common.Proving.WorkerProver]
JobMaxTry = 3
HeartbeatTimeout = "1m30s"
JobLifetime = "25h0m0s"
"""


def test_a_good_file_gives_the_stores_and_the_worker_prover_limits():
    cfg = parse_manager_config(GOOD, "sector-manager.cfg")
    # A store without Name is named by its Path as written (damocles' GetPersistStores).
    assert cfg.stores == {"store-a": "/mnt/a", "/mnt/b/": "/mnt/b/"}
    assert cfg.limits == rules.JobLimits(max_try=3, heartbeat_timeout=90.0, job_lifetime=90000.0)
    assert cfg.warnings == ()


# The [Common] part of the sector-manager.cfg `damocles-manager daemon init` writes, as damocles'
# docs show it (docs/en/04.damocles-manager-config.md): each table's keys commented out, its
# headers not, so [[Common.PersistStores]] is an entry with no Name and no Path.
DAEMON_INIT = """# Default config:
[Common]
#ScanPersistStores = []
[Common.API]
#Gateway = ["/ip4/{api_host}/tcp/{api_port}"]
#Token = "{some token}"
#ChainEventInterval = "1m0s"
#
[[Common.PieceStores]]
#Name = "{store_name}"
#Path = "{store_path}"
#Plugin = ""
#PluginName = "s3store"
[Common.PieceStores.Meta]
#SomeKey = "SomeValue"
#
[[Common.PersistStores]]
#Name = "{store_name}"
#Path = "{store_path}"
#Strict = false
#ReadOnly = false
#Weight = 0
#AllowMiners = [1, 2]
#DenyMiners = [3, 4]
#Plugin = ""
#PluginName = "s3store"
[Common.PersistStores.Meta]
#SomeKey = "SomeValue"
[Common.DB]
#Driver = "badger"
[Common.Proving]
#ParallelCheckLimit = 128
[Common.Proving.WorkerProver]
JobMaxTry = 2
HeartbeatTimeout = "15s"
JobLifetime = "25h0m0s"
"""


def test_the_daemon_init_template_store_is_skipped_with_a_warning_not_refused():
    """damocles-manager starts on the file its `daemon init` writes, opening its own working
    directory as the template's store (filepath.Abs of an empty Path); we refused that file
    ('Path must be the store's directory'), so serve --jobs, the coordinator and sectors find
    failed on damocles' own default config, also once the operator added stores after it."""
    added = '\n[[Common.PersistStores]]\nName = "s1"\nPath = "/mnt/s1"\n'
    cfg = parse_manager_config(DAEMON_INIT + added, "sm.cfg")
    assert cfg.stores == {"s1": "/mnt/s1"} and cfg.limits == rules.JobLimits()
    [warning] = cfg.warnings
    assert warning.startswith("sm.cfg: [[Common.PersistStores]] #1 has no Path and no Name")
    assert "its own working directory" in warning and "remove that entry" in warning
    # A store that has a Name still needs its Path: jobs may name it.
    with pytest.raises(ManagerConfigError, match="Path must be the store's directory"):
        parse_manager_config("[[Common.PersistStores]]\nName = 'a'\n", "sm.cfg")
    # Two such entries are both named "" by damocles-manager, which refuses the file.
    with pytest.raises(ManagerConfigError, match="#2: a second entry with no Path and no Name"):
        parse_manager_config("[[Common.PersistStores]]\n" * 2, "sm.cfg")


def test_a_file_starting_with_a_utf8_byte_order_mark_is_read_as_damocles_reads_it():
    cfg = parse_manager_config("\ufeff" + GOOD, "sector-manager.cfg")
    assert cfg.stores == {"store-a": "/mnt/a", "/mnt/b/": "/mnt/b/"}
    assert cfg.limits.max_try == 3


def test_a_conf_dir_this_user_may_not_enter_is_a_config_error_not_a_traceback():
    with a_closed_directory() as closed:
        for directory in (closed, closed / "sub"):
            said = said_when_kept_out(lambda d=directory: load_manager_conf_dir(d))
            assert said == (
                f"ManagerConfigError: --conf-dir {directory}: permission denied (check the mode"
                " and owner of it and of the directories above); give damocles-manager's config"
                " directory (the one its --conf-dir names, or its home)"
            )


def test_a_heartbeat_timeout_shorter_than_damocles_sweep_makes_the_sweep_as_frequent():
    def limits(timeout: str) -> rules.JobLimits:
        text = f'[Common.Proving.WorkerProver]\nHeartbeatTimeout = "{timeout}"\n'
        return parse_manager_config(text, "x.cfg").limits

    # A 2 s timeout with damocles' 10 s sweep would take a dead worker's job back after 12 s.
    assert rules.sweep_every(limits("2s")) == 0.5
    assert rules.sweep_every(limits("15s")) == 3.75
    assert rules.sweep_every(limits("1h")) == 10.0
    # A nanosecond one swept without a pause (the CPU, and the store's write lock, all taken),
    # and every job would time out: warned about, and swept every quarter of a second.
    cfg = parse_manager_config('[Common.Proving.WorkerProver]\nHeartbeatTimeout = "1ns"\n', "x.cfg")
    assert rules.sweep_every(cfg.limits) == rules.MIN_SWEEP_INTERVAL == 0.25
    [warning] = cfg.warnings
    assert "HeartbeatTimeout '1ns' is shorter than the 3 s between a damocles-worker's" in warning


def test_an_empty_file_keeps_damocles_defaults():
    cfg = parse_manager_config("", "x.cfg")
    assert cfg.stores == {} and cfg.limits == rules.JobLimits()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15.0), ("25h0m0s", 90000.0), ("1.5h", 5400.0), ("300ms", 0.3), ("2m3s", 123.0),
     ("1h30m", 5400.0), ("0", 0.0), ("-1s", -1.0), ("10us", 1e-5), ("7µs", 7e-6),
     ("2562047h47m16.854775807s", 9223372036.854775807)],  # Go's longest
)  # fmt: skip
def test_go_durations_read_as_go_reads_them(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "nanos"),
    [("2562047h47m16.854775807s", 2**63 - 1), ("9223372036854775807ns", 2**63 - 1),
     ("9223372036s854ms775us807ns", 2**63 - 1), ("9223372036854775.807us", 2**63 - 1),
     ("-2562047h47m16.854775808s", -(2**63)), ("-9223372036854775808ns", -(2**63)),
     ("1.004s", 1_004_000_000), ("100.00100s", 100_001_000_000), ("0.1ns", 0),
     ("9007199254.740993ms", 2**53 + 1),  # past a float64's exact integers: counted exactly
     # 19 digits of fraction kept, the rest ignored, scaled through a float64, as Go does:
     ("0.830103483285477580700h", (49 * 60 + 48) * 10**9 + 372_539_827),
     ("0" * 5000 + "1s", 10**9)],  # (leading zeros past Python's limit of digits to read)
)  # fmt: skip
def test_go_durations_count_exact_nanoseconds_up_to_an_int64_as_go_does(text, nanos):
    # Go's own test cases (time.ParseDuration): before, summed in float seconds, one nanosecond
    # past an int64 rounded back under the limit and was taken.
    assert parse_go_duration(text) == nanos / 10**9


@pytest.mark.parametrize(
    "text",
    ["2562047h47m16.854775808s", "9223372036854775808ns", "9223372036s854ms775us808ns",
     "9223372036854775.808us", "-2562047h47m16.854775809s", "2562047h47m17s", "1" + "0" * 5000 + "s"],
)  # fmt: skip
def test_a_go_duration_one_nanosecond_past_an_int64_is_refused(text):
    with pytest.raises(ValueError, match="is longer than a Go duration can be"):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('"15"', "each number needs a unit"),
        ('"1d"', "unknown unit 'd' (Go's units: ns, us, ms, s, m, h; write \"24h\" for a day)"),
        ('"15S"', "unknown unit 'S'"),
        ('"1hr"', "unknown unit 'hr' (Go's units: ns, us, ms, s, m, h),"),  # not "h", then "r"
        ('"5sec"', "unknown unit 'sec'"),
        ("00:00:15", 'such as "15s", not 00:00:15 (a date/time)'),
        ('"fifteen"', "not a Go duration"),
        ('""', "not a Go duration"),
        ("15", "nanoseconds"),
        ('"0s"', "must be longer than 0"),
        # Past an int64 of nanoseconds: Go's time.ParseDuration refuses it, and so damocles;
        # we read it as 292 years and more.
        ('"2562048h"', "longer than a Go duration can be"),
        ('"99999999999999999999h"', "damocles-manager refuses too"),
    ],
)
def test_a_bad_duration_names_file_table_key_and_what_to_write(value, words):
    text = f"[Common.Proving.WorkerProver]\nHeartbeatTimeout = {value}\n"
    with pytest.raises(ManagerConfigError) as caught:
        parse_manager_config(text, "/etc/dm/sector-manager.cfg")
    message = str(caught.value)
    assert message.startswith("/etc/dm/sector-manager.cfg: [Common.Proving.WorkerProver]")
    assert "HeartbeatTimeout" in message and words in message


def test_job_max_try_0_retries_no_job_as_damocles_manager_reads_it():
    # damocles-manager takes 0 (`TryNum < 0` never holds: a failed job is final at once); we
    # refused the file, so a coordinator or serve --jobs could not start beside such a manager.
    config = parse_manager_config("[Common.Proving.WorkerProver]\nJobMaxTry = 0\n", "<cfg>")
    assert config.limits.max_try == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[Common.Proving.WorkerProver]\nJobMaxTry = -1\n", "JobMaxTry must be a whole number from 0"),
        # damocles' uint32 (a larger one reached the store, and a traceback, at the first sweep)
        ("[Common.Proving.WorkerProver]\nJobMaxTry = 9223372036854775807\n",
         "JobMaxTry must be a whole number from 0 to 4294967295"),
        ("[[Common.PersistStores]]\nName = 'a'\n", "Path must be the store's directory"),
        (("[[Common.PersistStores]]\nName='a'\nPath='/x'\n[[Common.PersistStores]]\nName='a'\n"
         "Path='/y'\n"), "duplicate persist store name 'a'"),
        ("[Common]\nPersistStores = 3\n", "must be an array of tables"),
        ("[Common\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_values_are_errors_that_say_where_and_what(text, words):
    with pytest.raises(ManagerConfigError, match=words):
        parse_manager_config(text, "sector-manager.cfg")


def test_unknown_keys_in_the_two_tables_are_warned_about_not_dropped_silently():
    text = (
        "[[Common.PersistStores]]\nName = 'a'\nPath = '/a'\nRead_Only = true\n"
        "[Common.Proving.WorkerProver]\nJobMaxTries = 5\n"
    )
    cfg = parse_manager_config(text, "sm.cfg")
    assert cfg.limits.max_try == 2
    assert len(cfg.warnings) == 2
    assert "sm.cfg: [[Common.PersistStores]] #1: unknown key 'Read_Only'" in cfg.warnings[0]
    assert "[Common.Proving.WorkerProver]: unknown key 'JobMaxTries'" in cfg.warnings[1]
    assert "JobMaxTry" in cfg.warnings[1]  # the key it knows, to spot the misspelling


def test_keys_are_read_whatever_their_case_as_damocles_toml_reader_matches_them():
    """damocles-manager reads sector-manager.cfg with BurntSushi/toml (damocles-manager
    pkg/confmgr/local_mgr.go:112, modules/config.go:655-668; go.mod: v1.5.0), which matches a key
    to a struct field exactly first, then whatever its case: `jobmaxtry = 5` is its JobMaxTry,
    and a table `[common.proving.workerprover]` its Common.Proving.WorkerProver."""
    text = (
        "[[common.persiststores]]\nname = 'a'\npath = '/a'\nreadonly = true\n"
        "[common.Proving.workerProver]\njobmaxtry = 5\nheartbeattimeout = '30s'\n"
    )
    cfg = parse_manager_config(text, "sm.cfg")
    assert cfg.stores == {"a": "/a"}
    assert (cfg.limits.max_try, cfg.limits.heartbeat_timeout) == (5, 30.0)
    assert cfg.given == {"JobMaxTry", "HeartbeatTimeout"} and cfg.warnings == ()
    with pytest.raises(ManagerConfigError, match="'JobMaxTry' written twice"):
        parse_manager_config("[Common.Proving.WorkerProver]\nJobMaxTry=3\njobmaxtry=4\n", "x")


def test_one_table_written_in_two_cases_is_read_as_one_as_damocles_merges_them():
    """BurntSushi/toml decodes `[Common]` and `[common.proving.workerprover]` into the one
    Common field, each setting its own keys: damocles-manager reads both. We refused such a
    file ('Common' written twice: keep one), and keeping one would drop the other's keys."""
    text = (
        "[Common]\n[[Common.PersistStores]]\nName = 'a'\nPath = '/a'\n"
        "[common.proving.workerprover]\njobmaxtry = 5\n"
    )
    cfg = parse_manager_config(text, "sm.cfg")
    assert cfg.stores == {"a": "/a"} and cfg.limits.max_try == 5 and cfg.warnings == ()
    # One value written twice is still an error: damocles would keep either.
    twice = "[Common.Proving.WorkerProver]\nJobMaxTry = 3\n[common.proving.workerprover]\nJobMaxTry = 4\n"
    with pytest.raises(ManagerConfigError, match="'JobMaxTry' written twice"):
        parse_manager_config(twice, "sm.cfg")


def test_a_conf_dir_without_the_file_keeps_the_defaults_and_says_so(tmp_path):
    assert load_manager_conf_dir(tmp_path) is None
    settings = read_settings(str(tmp_path), [("s", "/s")])
    assert settings.stores == {"s": "/s"} and settings.limits == rules.JobLimits()
    assert "there is no sector-manager.cfg" in settings.warnings[0]
    with pytest.raises(ManagerConfigError, match="does not exist"):
        read_settings(str(tmp_path / "nope"))


def test_a_file_that_cannot_be_damocles_config_says_why_without_reading_it_all(tmp_path):
    cfg = tmp_path / "sector-manager.cfg"
    cfg.mkdir()
    with pytest.raises(ManagerConfigError, match="is a directory, not a config file; give the"):
        load_manager_conf_dir(tmp_path)
    cfg.rmdir()
    cfg.write_bytes(b"[Common]\n\xff\n")
    with pytest.raises(ManagerConfigError, match=r"not UTF-8 text \(bad byte at offset 9\)"):
        load_manager_conf_dir(tmp_path)
    with open(cfg, "r+b") as f:
        f.truncate(16384 * 1024 + 1)  # sparse: read up to the limit, not to the end
    with pytest.raises(ManagerConfigError, match="larger than 16384 KiB, which no sector-manager"):
        load_manager_conf_dir(tmp_path)
    with pytest.raises(ManagerConfigError, match=r"^/dev/zero: is a character device, not a reg"):
        load_manager_config("/dev/zero")  # never opened: a device's open runs its driver


def test_the_same_store_name_with_two_paths_is_refused(tmp_path):
    (tmp_path / "sector-manager.cfg").write_text(GOOD)
    assert read_settings(str(tmp_path), [("store-a", "/mnt/a/")]).stores["store-a"] == "/mnt/a/"
    with pytest.raises(ManagerConfigError, match=r"'store-a' is given twice .*'/mnt/a'.*'/mnt/z'"):
        read_settings(str(tmp_path), [("store-a", "/mnt/z")])


# --- paths <-> store names ----------------------------------------------------------------------

STORES = StoreMap({"big": "/mnt/big", "nested": "/mnt/big/inner", "other": "/data/o"})


def test_paths_in_damocles_layout_map_to_the_longest_store_and_back():
    access, upgrade = STORES.locate(
        1000, 7, "/mnt/big/sealed/s-t01000-7", "/mnt/big/inner/cache/s-t01000-7"
    )
    assert access == SectorAccessStores(SealedFile="big", CacheDir="nested") and not upgrade
    access, upgrade = STORES.locate(
        1000, 8, "/data/o/update/s-t01000-8", "/data/o//update-cache/s-t01000-8/"
    )
    assert access == SectorAccessStores(SealedFile="other", CacheDir="other") and upgrade
    assert STORES.path_of("nested", "cache", 1000, 7, False) == "/mnt/big/inner/cache/s-t01000-7"
    assert STORES.path_of("other", "sealed", 1000, 8, True) == "/data/o/update/s-t01000-8"
    with pytest.raises(KeyError, match="store 'gone' is not known"):
        STORES.path_of("gone", "sealed", 1, 1, False)


@pytest.mark.parametrize(
    ("sealed", "cache", "words"),
    [
        ("/elsewhere/sealed/s-t01000-7", "/mnt/big/cache/s-t01000-7",
         ("sector 7 of miner 1000: its sealed_file '/elsewhere/sealed/s-t01000-7' is in none of"
         " the stores")),
        ("/mnt/big/sealed/s-t01000-9", "/mnt/big/cache/s-t01000-7",
         "is in store 'big' (/mnt/big) but not where damocles keeps it"),
        ("/mnt/big/sealed/s-t01000-7", "/mnt/big/somewhere/s-t01000-7",
         "its cache_dir '/mnt/big/somewhere/s-t01000-7' is in store 'big'"),
        ("/mnt/big/update/s-t01000-7", "/mnt/big/cache/s-t01000-7",
         "do not agree on whether it is upgraded"),
    ],
)  # fmt: skip
def test_a_path_in_no_store_or_not_in_the_layout_is_named_with_the_fix(sealed, cache, words):
    with pytest.raises(SectorPathError) as caught:
        STORES.locate(1000, 7, sealed, cache)
    assert words in str(caught.value)
    if "none of the stores" in words:
        assert "--store NAME=PATH" in str(caught.value)
        assert "[[Common.PersistStores]]" in str(caught.value)


# --- the commands that read --conf-dir ----------------------------------------------------------


def test_wdpost_list_takes_its_max_try_from_the_conf_dir(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/jobs.db"
    now = time.time()
    with JobStore.open(url, limits=rules.JobLimits(max_try=3)) as s:
        job, _ = s.create(make_input(), now)
        for attempt in range(2):
            [taken] = s.allocate(rules.AllocationSpec(), 1, "w", now)
            s.finish(job.Id, None, "broken", now, lease=taken.lease)
            if attempt == 0:
                s.sweep(now)
    assert cli.main(["wdpost", "list", "--jobs", url]) == 0
    assert "2(Max)" in capsys.readouterr().out
    (tmp_path / "sector-manager.cfg").write_text("[Common.Proving.WorkerProver]\nJobMaxTry = 3\n")
    assert cli.main(["wdpost", "list", "--jobs", url, "--conf-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "(Max)" not in shown and " 2 " in shown


def test_the_coordinator_refuses_a_bad_manager_config_with_exit_2(tmp_path):
    (tmp_path / "sector-manager.cfg").write_text(
        '[Common.Proving.WorkerProver]\nJobLifetime = "a day"\n'
    )
    done = dext_run("coordinator", "--jobs", f"sqlite:///{tmp_path}/j.db", "--conf-dir",
                    str(tmp_path), "--listen", "127.0.0.1:0")  # fmt: skip
    assert done.returncode == 2, done.stderr
    err = done.stderr.decode()
    assert "Traceback" not in err
    assert f"{tmp_path}/sector-manager.cfg: [Common.Proving.WorkerProver] JobLifetime" in err


def test_scan_persist_stores_adds_the_stores_it_finds_as_damocles_manager_scans_them(tmp_path):
    """damocles-manager's GetPersistStores adds to [[Common.PersistStores]] each directory a
    Common.ScanPersistStores pattern matches that holds a sectorstore.json, named by its Name,
    else its ID, else its path (modules/config_util.go ScanPersistStores, Go's encoding/json:
    keys whatever their case). We warned and left them out: a coordinator then answered
    StoreBasicInfo for none of them, and a damocles-worker attaching one refused to start."""
    for store, meta in (
        ("a", {"Name": "store-a", "ID": "id-a"}),
        ("b", {"ID": "id-b"}),
        (".c", {"name": "store-c"}),  # Go's glob "*" matches a hidden name too
        ("d", {"Name": "", "ID": ""}),
        ("e", None),  # Go's json.Unmarshal of null: an empty struct, named by its path
    ):
        (tmp_path / store).mkdir()
        (tmp_path / store / "sectorstore.json").write_text(json.dumps(meta))
    (tmp_path / "no-json").mkdir()  # skipped, as damocles skips it
    (tmp_path / "a-file").write_text("")  # no directory: skipped
    text = (
        "[Common]\n"
        f"ScanPersistStores = ['{tmp_path}/*']\n"
        "[[Common.PersistStores]]\nName = 'listed'\nPath = '/mnt/listed'\n"
    )
    cfg = parse_manager_config(text, "sm.cfg")
    assert cfg.stores == {
        "listed": "/mnt/listed",
        "store-c": f"{tmp_path}/.c",
        "store-a": f"{tmp_path}/a",
        "id-b": f"{tmp_path}/b",
        f"{tmp_path}/d": f"{tmp_path}/d",
        f"{tmp_path}/e": f"{tmp_path}/e",
    }
    assert cfg.warnings == ()
    # A pattern that finds nothing here (the stores not mounted on this machine) is said.
    empty = parse_manager_config(f"[Common]\nScanPersistStores = ['{tmp_path}/none/*']\n", "x")
    assert (
        len(empty.warnings) == 1
        and "finds no directory with a sectorstore.json" in (empty.warnings[0])
    )
    # A scanned store named as a listed one is refused, as damocles-manager refuses it.
    clash = text.replace("'listed'", "'store-a'")
    with pytest.raises(
        ManagerConfigError, match="named 'store-a' like the store at '/mnt/listed': a duplicate"
    ):
        parse_manager_config(clash, "sm.cfg")
    (tmp_path / "b" / "sectorstore.json").write_text("{")
    with pytest.raises(ManagerConfigError, match=r"ScanPersistStores\[0\].*is not JSON"):
        parse_manager_config(text, "sm.cfg")
    with pytest.raises(ManagerConfigError, match="must be a list of glob patterns"):
        parse_manager_config("[Common]\nScanPersistStores = '/mnt/*'\n", "sm.cfg")


def test_a_scanned_store_whose_name_is_given_twice_is_named_by_the_last_as_go_reads_it(tmp_path):
    # Go's encoding/json: keys whatever their case, the last one in the file wins. json.loads
    # kept a repeated key at its first place with its last value: {"name": "a", "Name": "b",
    # "name": "c"} named the store "b" where damocles-manager names it "c".
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sectorstore.json").write_text('{"name": "a", "Name": "b", "name": "c"}')
    cfg = parse_manager_config(f"[Common]\nScanPersistStores = ['{tmp_path}/*']\n", "sm.cfg")
    assert cfg.stores == {"c": f"{tmp_path}/s"}
    for meta, said in (("[]", "is not a JSON object"), ('{"Name": {"a": 1}}', "not an object")):
        (tmp_path / "s" / "sectorstore.json").write_text(meta)
        with pytest.raises(ManagerConfigError, match=said):
            parse_manager_config(f"[Common]\nScanPersistStores = ['{tmp_path}/*']\n", "sm.cfg")


def test_a_scan_pattern_holding_a_nul_is_an_error_naming_it_not_a_traceback():
    # glob raised ValueError ("embedded null byte"): a traceback from wdpost list, check-config,
    # the coordinator and serve --jobs alike.
    text = '[Common]\nScanPersistStores = ["/mnt/\\u0000/*"]\n'
    with pytest.raises(
        ManagerConfigError, match=r"ScanPersistStores\[0\] '/mnt/\\x00/\*' holds a NUL"
    ):
        parse_manager_config(text, "sm.cfg")


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('ReadOnly = "yes"', 'ReadOnly must be true or false, not "yes"'),
        ("strict = 1", "Strict must be true or false, not 1"),
        ("Weight = 2.0", "Weight must be a whole number, not 2.0"),
        ("Meta = { a = 1 }", "Meta must be a table of strings"),
        ("AllowMiners = ['t01000']", "AllowMiners must be a list of miner actor ids"),
    ],
)
def test_a_store_key_of_a_type_damocles_manager_cannot_read_is_an_error_not_ignored(line, words):
    """BurntSushi/toml refuses to decode `ReadOnly = "yes"` into damocles' bool, and with it the
    whole file: damocles-manager does not start. We took such a file without a word."""
    text = f"[[Common.PersistStores]]\nName = 'a'\nPath = '/a'\n{line}\n"
    with pytest.raises(ManagerConfigError) as caught:
        parse_manager_config(text, "sm.cfg")
    message = str(caught.value)
    assert message.startswith("sm.cfg: [[Common.PersistStores]] #1: ") and words in message
    assert "damocles-manager refuses this file too" in message


def test_a_negative_weight_or_miner_is_taken_as_damocles_managers_toml_reader_takes_it():
    # BurntSushi/toml checks the range of uint8/16/32 only: a negative number in a uint or uint64
    # (Weight, AllowMiners, DenyMiners) wraps, and damocles-manager starts. We refused the file.
    text = "[[Common.PersistStores]]\nName = 'a'\nPath = '/a'\nWeight = -1\nAllowMiners = [-1]\n"
    assert parse_manager_config(text, "sm.cfg").stores == {"a": "/a"}


def test_a_sector_manager_cfg_deleted_as_it_is_read_is_none_not_an_error(tmp_path, monkeypatch):
    # It was looked at (stat) and then read by its name: deleted in between, the read's "no such
    # file" was an error (exit 2) where the file not there keeps damocles' defaults.
    cfg = tmp_path / "sector-manager.cfg"
    cfg.write_text(GOOD)
    deleted = deleted_as_it_is_opened(monkeypatch, cfg)
    assert load_manager_conf_dir(tmp_path) is None
    assert deleted == [str(cfg)]


def test_a_scanned_sectorstore_json_deleted_as_it_is_read_skips_the_store_as_damocles_does(
    tmp_path, monkeypatch
):
    (tmp_path / "a").mkdir()
    meta = tmp_path / "a" / "sectorstore.json"
    meta.write_text(json.dumps({"Name": "store-a"}))
    deleted = deleted_as_it_is_opened(monkeypatch, meta)
    text = f"[Common]\nScanPersistStores = ['{tmp_path}/*']\n"
    assert parse_manager_config(text, "sm.cfg").stores == {}
    assert deleted == [str(meta)]


@pytest.mark.parametrize("closed", ["directory", "file"])
def test_a_scanned_store_closed_to_this_user_says_whether_its_directory_or_its_file_is(closed):
    # A store's directory of mode 0000 said "...sectorstore.json: cannot read the config file:
    # permission denied (check its mode and owner)": the file blamed, and called a config file.
    with a_closed_directory() as directory:
        store = directory if closed == "directory" else directory.parent / "store"
        store.mkdir(exist_ok=True)
        store.chmod(0o755)
        meta = store / "sectorstore.json"
        meta.write_text(json.dumps({"Name": "s1"}))
        (meta if closed == "file" else store).chmod(0)
        text = f"[Common]\nScanPersistStores = ['{store}']\n"
        said = said_when_kept_out(lambda: parse_manager_config(text, "sm.cfg"))
        store.chmod(0o700)
    why = (
        "a directory on its path is closed to this user (check the mode and owner of the"
        " directories above it)"
        if closed == "directory"
        else "permission denied (check its mode and owner)"
    )
    assert said == (
        f"ManagerConfigError: sm.cfg: Common.ScanPersistStores[0] {str(store)!r}: {meta}: cannot"
        f" read the store's sectorstore.json: {why}"
    )
