"""The locator's cache kept across restarts (sectors/snapshot.py): a locator learns locations
from a real HTTP source (the damocles look-alike) or the scan, stops, the source goes away, and
a new locator loaded from the snapshot answers them, stale, with their real age; files that
cannot be used (damaged, cut short, another user's, of another format) are said and ignored;
the snapshot's size is bounded."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading

import msgspec
import pytest
import trio
from helpers.damocles_source import DamoclesSource
from test_sectors import MINER, put_files, refs, stores  # noqa: F401 - the fixture

from damocles_ext.sectors import SectorLocation, SectorProviderError, SectorRef
from damocles_ext.sectors.cache import CacheEntry, CacheRules, SectorCache
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.providers import SourceNode, StoreScan
from damocles_ext.sectors.snapshot import (
    MAGIC,
    VERSION,
    CacheSnapshot,
    _Row,
    _Snapshot,
    decode,
    encode,
)

WALL = 1_700_000_000.0  # the wall clock the snapshots are written at


def wall_at(t: float):
    return lambda: t


def warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "damocles_ext.sectors" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def source():
    with DamoclesSource() as server:
        yield server


async def learn_then_stop(path, providers, sectors, *, wall=WALL, rules=None):
    """A locator with a snapshot at `path` that locates `sectors` and stops (a clean stop)."""
    async with SectorLocator(
        providers, rules=rules, snapshot=CacheSnapshot(str(path), wall=wall_at(wall))
    ) as locator:
        answers = await locator.locate(sectors)
    assert all(a.found and not a.cached for a in answers), answers
    return answers


async def test_a_restarted_locator_gives_the_last_known_locations_with_their_age_while_the_source_is_down(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
    mock_clock,
):
    for n in (1, 2):
        source.put(MINER, n, "a")
        put_files(stores, n)
    path = tmp_path / "sectors.snapshot"
    node = SourceNode(source.url, stores)
    async with SectorLocator(
        [node], snapshot=CacheSnapshot(str(path), wall=wall_at(WALL))
    ) as first:
        before = await first.locate(refs(1, 2))
        mock_clock.jump(3600)  # an hour later the process stops
    source.stop()
    # ... and is started again two hours after that, its source still down.
    later = CacheSnapshot(str(path), wall=wall_at(WALL + 7200))
    async with SectorLocator([SourceNode(source.url, stores)], snapshot=later) as second:
        answers = await second.locate(refs(1, 2), time_left=1800)
        status = second.status()
    for answer, was in zip(answers, before, strict=True):
        assert answer.found and answer.cached and answer.stale, answer.detail
        assert answer.location == was.location and answer.provider == node.name
        assert answer.age == pytest.approx(3 * 3600, abs=1)  # the time it was down included
        assert "cannot connect" in answer.detail and "last known location" in answer.detail
    assert status["stale_answers"] == 2
    assert status["snapshot"] == {
        "path": str(path), "restored": 2, "saved_age": pytest.approx(7200), "error": None,
    }  # fmt: skip


async def test_a_store_attached_elsewhere_since_the_save_gives_its_new_paths_or_none(
    source, tmp_path
):
    # A worker learned locations under a wrong --attached path (the source gives store names;
    # the paths are made here). Restarted with the store attached where it is, its fresh
    # entries give the new paths, not the wrong ones for fresh_for; a store no longer attached
    # leaves no entry to give (the source or the scan is asked anew).
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    for root in (wrong, right):
        root.mkdir()
    put_files({"a": str(right)}, 1)
    source.put(MINER, 1, "a")
    path = tmp_path / "sectors.snapshot"
    await learn_then_stop(path, [SourceNode(source.url, {"a": str(wrong)})], refs(1))
    fixed = {"a": str(right)}
    node = SourceNode(source.url, fixed)
    snapshot = CacheSnapshot(
        str(path), wall=wall_at(WALL + 60), reroot=(fixed, frozenset({node.name}))
    )
    async with SectorLocator([node], snapshot=snapshot) as locator:
        [answer] = await locator.locate(refs(1))
    assert answer.found and answer.cached, answer.detail
    assert answer.location.sealed_file == f"{right}/sealed/s-t0{MINER}-1"
    assert answer.location.cache_dir == f"{right}/cache/s-t0{MINER}-1"
    source.stop()
    elsewhere = {"b": str(right)}
    gone = CacheSnapshot(
        str(path), wall=wall_at(WALL + 60), reroot=(elsewhere, frozenset({node.name}))
    )
    async with SectorLocator([SourceNode(source.url, elsewhere)], snapshot=gone) as third:
        [answer] = await third.locate(refs(1))
        assert third.status()["snapshot"]["restored"] == 0
    assert not answer.found


def test_a_plugins_entry_keeps_its_paths_whatever_is_attached():
    # A dext_sector_providers plugin may name a store it mounts itself, elsewhere: its entry
    # is neither moved under an --attached directory nor dropped for a store not attached.
    from damocles_ext.sectors.snapshot import rerooted

    sector = SectorRef(MINER, 1, False)
    where = SectorLocation(f"/own/a/sealed/s-t0{MINER}-1", f"/own/a/cache/s-t0{MINER}-1", "a", "a")
    mine = (sector, CacheEntry(where, "site-plugin", 0.0))
    built_in = frozenset({"source 127.0.0.1:1", "scan of 1 store"})
    assert rerooted([mine], {"a": "/attached/a"}, built_in) == [mine]
    assert rerooted([mine], {}, built_in) == [mine]


async def test_what_the_scan_found_is_remembered_across_a_restart_too(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
):
    sealed, cache = put_files(stores, 7, "b")
    path = tmp_path / "sectors.snapshot"
    scan = StoreScan(stores)
    await learn_then_stop(path, [scan], refs(7))
    source.stop()
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL + 3600))
    async with SectorLocator([SourceNode(source.url, stores)], snapshot=snapshot) as locator:
        [answer] = await locator.locate(refs(7))
    assert answer.stale and answer.provider == scan.name
    assert answer.location == SectorLocation(sealed, cache, "b", "b")
    assert answer.age == pytest.approx(3600, abs=1)


async def test_a_restored_entry_is_fresh_only_for_what_is_left_of_its_fresh_for(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
    mock_clock,
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    path = tmp_path / "sectors.snapshot"
    rules = CacheRules(fresh_for=600, refresh_lead=60)
    await learn_then_stop(path, [SourceNode(source.url, stores)], refs(1), rules=rules)
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL + 500))  # learned 500 s ago
    async with SectorLocator(
        [SourceNode(source.url, stores)], rules=rules, snapshot=snapshot
    ) as locator:
        [hit] = await locator.locate(refs(1))
        assert hit.cached and not hit.stale and hit.age == pytest.approx(500, abs=1)
        assert source.finds() == 1  # the first locator's only
        mock_clock.jump(101)
        [asked] = await locator.locate(refs(1))
    assert not asked.cached and source.finds() == 2


async def test_entries_past_keep_for_or_learned_in_the_future_are_not_taken_as_they_were(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    path = tmp_path / "sectors.snapshot"
    rules = CacheRules(fresh_for=600, refresh_lead=60, keep_for=3600)
    await learn_then_stop(path, [SourceNode(source.url, stores)], refs(1), rules=rules)
    source.stop()
    node = SourceNode(source.url, stores)
    # The clock set back an hour since: not fresh (the source is asked), still a last known one.
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL - 3600))
    async with SectorLocator([node], rules=rules, snapshot=snapshot) as locator:
        [back] = await locator.locate(refs(1))
    assert back.stale and back.age == pytest.approx(600, abs=1)
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL + 3600))  # past keep_for
    async with SectorLocator([node], rules=rules, snapshot=snapshot) as locator:
        [old] = await locator.locate(refs(1))
    assert old.status == "error" and "no location of it is known" in old.detail


async def test_a_clock_set_back_since_the_save_makes_no_entry_younger_than_it_was_nor_fresh(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
    mock_clock,
    caplog,
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    path = tmp_path / "sectors.snapshot"
    rules = CacheRules(fresh_for=600, refresh_lead=60, keep_for=3600)
    async with SectorLocator(
        [SourceNode(source.url, stores)], rules=rules,
        snapshot=CacheSnapshot(str(path), wall=wall_at(WALL)),
    ) as first:  # fmt: skip
        await first.locate(refs(1))
        mock_clock.jump(3000)  # saved at WALL (by the wall clock), when the entry is 3000 s old
    source.stop()
    # Started again at once; meanwhile the wall clock was set back 400 s (NTP, an operator).
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL - 400))
    async with SectorLocator([SourceNode(source.url, stores)], rules=rules, snapshot=snapshot) as second:  # fmt: skip
        [answer] = await second.locate(refs(1))
        assert answer.stale and answer.age == pytest.approx(3000, abs=1)  # not 2600
        mock_clock.jump(601)  # past keep_for by its age when saved: not by the clock set back
        [gone] = await second.locate(refs(1))
    assert gone.status == "error" and "no location of it is known" in gone.detail
    assert any("the clock set back since?" in w for w in warnings(caplog))
    # One saved young is not fresh either: its age since the save is not known.
    source2 = DamoclesSource()
    with source2:
        source2.put(MINER, 1, "a")
        node = SourceNode(source2.url, stores)
        await learn_then_stop(path, [node], refs(1), rules=rules)  # saved at WALL, 0 s old
        snapshot = CacheSnapshot(str(path), wall=wall_at(WALL - 400))
        async with SectorLocator([node], rules=rules, snapshot=snapshot) as third:
            [asked] = await third.locate(refs(1))
        assert not asked.cached and source2.finds() == 2


def good_snapshot() -> bytes:
    entry = CacheEntry(SectorLocation("/a/sealed/s-t01000-1", "/a/cache/s-t01000-1"), "p", 0.0)
    return encode([(SectorRef(MINER, 1), entry)], 0.0, WALL)


def make_unusable(path, how: str) -> str:
    """Put a snapshot that cannot be used at `path`; what the warning says of it."""
    if how == "cut short":
        path.write_bytes(good_snapshot()[:-7])
        return "damaged"
    if how == "garbage":
        path.write_bytes(MAGIC + os.urandom(64))
        return "damaged"
    if how == "nested deeper than a decoder goes":  # msgspec's RecursionError: bad content too
        path.write_bytes(MAGIC + b"\x82\xa7version\x01\xa1x" + b"\x91" * 100_000 + b"\x01")
        return "damaged"
    if how == "not a snapshot":
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")  # a mistyped /etc/passwd
        return "a file that is not a sector-location snapshot"
    if how == "an empty file":
        path.write_bytes(b"")
        return "an empty file"
    if how == "another version":
        body = msgspec.msgpack.encode({"version": VERSION + 1, "written_at": WALL, "stuff": []})
        path.write_bytes(MAGIC + body)
        return f"format version {VERSION + 1}"
    if how in ("a negative sector", "a string not in the table"):  # decodes, but is wrong
        row = _Row(MINER, -1, False, 0, "s", 0, "c", -1, -1, 0, WALL)
        if how == "a string not in the table":
            row = _Row(MINER, 1, False, 0, "s", 0, "c", 7, -1, 0, WALL)
        path.write_bytes(MAGIC + msgspec.msgpack.encode(_Snapshot(VERSION, WALL, ["/"], [row])))
        return "damaged"
    if how == "another user's":
        path.write_bytes(good_snapshot())
        os.chown(path, 12345, 12345)
        return "owned by uid 12345"
    if how == "a symlink":
        target = path.parent / "elsewhere"
        target.write_bytes(good_snapshot())
        path.symlink_to(target)
        return f"a symlink (to {target})"
    if how == "a fifo":
        os.mkfifo(path)
        return "a FIFO (named pipe)"
    if how == "a directory":
        path.mkdir()
        return "a directory"
    if how == "a character device":  # as /dev/null is
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return "a character device"
    raise AssertionError(how)


UNUSABLE = [
    "cut short", "garbage", "nested deeper than a decoder goes", "another version", "a negative sector", "a string not in the table",
    "another user's",
]  # fmt: skip
NOT_SNAPSHOTS = [
    "not a snapshot", "an empty file", "a symlink", "a fifo", "a directory", "a character device",
]  # fmt: skip


def what_is_at(path) -> tuple:
    """What is at `path`: its kind and its bytes (a symlink: where to, and the target's)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", os.readlink(path), path.read_bytes())
    if stat.S_ISREG(st.st_mode):
        return ("file", path.read_bytes())
    return (stat.S_IFMT(st.st_mode), st.st_ino)


@pytest.mark.parametrize("how", UNUSABLE)
async def test_a_snapshot_that_cannot_be_used_is_said_and_ignored_and_replaced_at_the_next_save(
    how,
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
    caplog,
):
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("making a file of another user takes root")
    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    path = tmp_path / "sectors.snapshot"
    why = make_unusable(path, how)
    source.put(MINER, 5, "a")
    put_files(stores, 5)
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL))
    async with SectorLocator([SourceNode(source.url, stores)], snapshot=snapshot) as locator:
        [answer] = await locator.locate(refs(5))  # the locator works on
        status = locator.status()["snapshot"]
    assert answer.found and not answer.cached
    warning, *saving = warnings(caplog)
    assert f"snapshot {path} is ignored" in warning and why in warning, warning
    assert status["restored"] == 0 and why in status["error"]
    assert saving == []
    # Replaced by the stop's save, which a new locator reads.
    assert path.is_file() and not path.is_symlink() and path.stat().st_uid == os.geteuid()
    source.stop()
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL + 3600))
    async with SectorLocator([SourceNode(source.url, stores)], snapshot=snapshot) as locator:
        [again] = await locator.locate(refs(5))
    assert again.stale and again.location == answer.location


@pytest.mark.parametrize("how", NOT_SNAPSHOTS)
async def test_what_is_not_a_snapshot_is_said_ignored_and_never_written_over(
    how,
    stores,  # noqa: F811 - the fixture
    tmp_path,
    caplog,
):
    """A path that became something else since the start (the commands refuse it at start):
    a device, a FIFO, a symlink, a directory or someone's file is left exactly as it is."""
    if how == "a character device" and os.geteuid() != 0:
        pytest.skip("making a device takes root")
    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    path = tmp_path / "sectors.snapshot"
    why = make_unusable(path, how)
    before = what_is_at(path)
    put_files(stores, 5)
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL))
    async with SectorLocator([StoreScan(stores)], snapshot=snapshot) as locator:
        [answer] = await locator.locate(refs(5))  # the locator works on
    assert answer.found
    loading, saving = warnings(caplog)
    assert f"snapshot {path} is ignored" in loading and why in loading, loading
    assert "never written over" in loading
    assert "not written" in saving and why in saving and "never replaces" in saving, saving
    assert what_is_at(path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


async def test_a_snapshot_is_written_atomically_private_and_leaves_no_new_file_behind(
    source,
    stores,  # noqa: F811 - the fixture
    tmp_path,
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    # A killed process's write (4194304: above any pid Linux gives, so a dead process's).
    leftover = tmp_path / ".sectors.snapshot.4194304.abcd.tmp"
    leftover.write_bytes(b"half")
    path = tmp_path / "sectors.snapshot"
    await learn_then_stop(path, [SourceNode(source.url, stores)], refs(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "sectors.snapshot"]
    assert path.stat().st_mode & 0o777 == 0o600
    written_at, entries = decode(path.read_bytes(), 0.0, WALL)
    assert written_at == WALL and [s for s, _ in entries] == refs(1)


async def test_a_start_on_the_same_snapshot_leaves_a_running_process_s_new_file_to_it(tmp_path):
    """Another worker or coordinator given the same --sector-cache, saving as this one starts:
    its new file (its pid in the name) is its save in progress, not a leftover. Removed, its
    rename failed (No such file or directory) and its save with it."""
    saving = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        theirs = tmp_path / f".sectors.snapshot.{saving.pid}.abcd.tmp"
        theirs.write_bytes(b"half")
        dead = tmp_path / ".sectors.snapshot.4194304.abcd.tmp"  # above any pid Linux gives
        dead.write_bytes(b"half")
        path = tmp_path / "sectors.snapshot"
        await learn_then_stop(path, [Known()], refs(2))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, path.name])
    finally:
        assert saving.stdin is not None
        await saving.stdin.aclose()
        await saving.wait()


async def test_a_snapshot_whose_name_is_about_as_long_as_a_name_may_be_is_written(tmp_path):
    """Its new file's name (the name, the process's id, a random part) still fits in 255 bytes:
    a name the start accepts is one every save can write."""
    path = tmp_path / ("x" + "é" * 124)  # 249 bytes: cut in the middle of a character
    await learn_then_stop(path, [Known()], refs(2))
    assert [s for s, _ in decode(path.read_bytes(), 0.0, WALL)[1]] == refs(2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


async def test_a_locator_closed_before_it_read_its_snapshot_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())
    async with SectorLocator([], snapshot=CacheSnapshot(str(path))):
        pass  # stopped before its first lookup or refresh: nothing is known, nothing written
    assert path.read_bytes() == good_snapshot()


async def test_the_snapshot_keeps_the_most_recently_used_entries_up_to_its_bounds(
    stores,  # noqa: F811 - the fixture
    tmp_path,
    caplog,
):
    for n in range(1, 6):
        put_files(stores, n)
    path = tmp_path / "sectors.snapshot"
    snapshot = CacheSnapshot(str(path), max_entries=3, wall=wall_at(WALL))
    async with SectorLocator([StoreScan(stores)], snapshot=snapshot) as locator:
        await locator.locate(refs(1, 2, 3, 4, 5))
        await locator.locate(refs(1))  # used again: among the most recent
    _, entries = decode(path.read_bytes(), 0.0, WALL)
    assert sorted(s.number for s, _ in entries) == [1, 4, 5]
    # In bytes too: past max_bytes the least recently used halves go, said in a warning.
    two = tmp_path / "two.snapshot"
    await learn_then_stop(two, [StoreScan(stores)], refs(3, 4))
    size = len(two.read_bytes())
    snapshot = CacheSnapshot(str(path), max_bytes=size, wall=wall_at(WALL))
    async with SectorLocator([StoreScan(stores)], snapshot=snapshot) as locator:
        await locator.locate(refs(1, 2, 3, 4))
    assert len(path.read_bytes()) == size
    _, entries = decode(path.read_bytes(), 0.0, WALL)
    assert [s.number for s, _ in entries] == [3, 4]
    assert any("holds the 2 most recently used of 4" in w for w in warnings(caplog))
    # And a file past max_bytes is not read.
    small = CacheSnapshot(str(path), max_bytes=10)
    async with SectorLocator([], snapshot=small) as locator:
        await locator.restore()
        assert small.restored == 0 and "larger than a snapshot may be (10 bytes)" in small.error


class Watched(CacheSnapshot):
    """A snapshot whose saves are seen: `saved` is set after each; `loaded` once its read ended
    (a read given up included, once it ends after all)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saved = trio.Event()
        self.loaded = trio.Event()

    async def load(self, cache, **kwargs):
        try:
            return await super().load(cache, **kwargs)
        finally:
            self.loaded.set()

    async def save(self, cache, *, final=False):
        done = await super().save(cache, final=final)
        self.saved.set()
        self.saved = trio.Event()
        return done


async def test_the_background_refresh_saves_every_few_minutes_only_what_changed_and_says_failures(
    stores,  # noqa: F811 - the fixture
    tmp_path,
    mock_clock,
    caplog,
):
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "sectors.snapshot"
    put_files(stores, 1)
    snapshot = Watched(str(path), every=300, wall=wall_at(WALL))
    rules = CacheRules(refresh_ahead=1.0)  # no background refresh: the cache changes by lookups
    locator = SectorLocator([StoreScan(stores)], rules=rules, snapshot=snapshot)
    async with locator, trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        await locator.locate(refs(1))
        saved = snapshot.saved
        mock_clock.jump(300)
        await saved.wait()
        assert [s for s, _ in decode(path.read_bytes(), 0.0, WALL)[1]] == refs(1)
        # Nothing changed: no write (the file's own inode stays).
        inode = path.stat().st_ino
        for _ in range(3):
            mock_clock.jump(300)
            await trio.testing.wait_all_tasks_blocked()
        assert path.stat().st_ino == inode and snapshot.saved_at == pytest.approx(300)
        # A directory gone: said once, kept in memory, written again once it is back.
        os.rename(directory, tmp_path / "gone")
        caplog.set_level(logging.INFO, "damocles_ext.sectors")
        for n in (2, 3):
            put_files(stores, n)
            await locator.locate(refs(n))
            saved = snapshot.saved
            mock_clock.jump(300)
            await saved.wait()
        assert len(warnings(caplog)) == 1 and "could not be written" in warnings(caplog)[0]
        assert "could not be written" in locator.status()["snapshot"]["error"]
        os.rename(tmp_path / "gone", directory)
        saved = snapshot.saved
        await locator.locate(refs(1, 2, 3))
        mock_clock.jump(300)
        await saved.wait()
        assert locator.status()["snapshot"]["error"] is None
        nursery.cancel_scope.cancel()
    assert any("written again" in r.getMessage() for r in caplog.records)
    assert len(decode(path.read_bytes(), 0.0, WALL)[1]) == 3


@pytest.fixture
def hung_storage(monkeypatch):
    """Writes of snapshots that hang (a dead NFS mount, a failing disk) until the test ends."""
    import damocles_ext.sectors.snapshot as snapshot_module

    hung = threading.Event()
    monkeypatch.setattr(snapshot_module, "write_file", lambda path, data: hung.wait())
    yield
    hung.set()


@pytest.mark.usefixtures("hung_storage")
async def test_a_storage_that_hangs_costs_a_stop_one_save_bound_at_most(
    tmp_path, autojump_clock, caplog
):
    from damocles_ext.sectors.snapshot import SAVE_TIMEOUT

    snapshot = Watched(str(tmp_path / "s.snapshot"), every=300, wall=wall_at(WALL))
    locator = SectorLocator([], snapshot=snapshot)
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        await snapshot.loaded.wait()  # its thread may outlast a jump of the clock to its bound
        locator.cache.learn(refs(1)[0], SectorLocation("/a/s", "/a/c"), "p", trio.current_time())
        await trio.sleep(301)  # the periodic save has begun, and hangs
        start = trio.current_time()
        nursery.cancel_scope.cancel()  # SIGTERM: the refresh is cancelled
    await locator.aclose()  # the coordinator's, the worker's stop
    assert trio.current_time() - start <= SAVE_TIMEOUT
    assert any(
        "not written at this stop: a write is still in flight" in w for w in warnings(caplog)
    )


@pytest.mark.usefixtures("hung_storage")
async def test_a_storage_that_hangs_holds_one_thread_of_its_own_and_no_new_write_starts_behind_it(
    tmp_path, autojump_clock, caplog
):
    snapshot = CacheSnapshot(str(tmp_path / "s.snapshot"), wall=wall_at(WALL))
    locator = SectorLocator([], snapshot=snapshot)
    locator.cache.learn(refs(1)[0], SectorLocation("/a/s", "/a/c"), "p", trio.current_time())
    default = trio.to_thread.current_default_thread_limiter()
    for _ in range(default.total_tokens + 1):  # over 3 hours of saves every 5 min
        assert not await snapshot.save(locator.cache)
    assert default.borrowed_tokens == 0  # the rest of the process has all of its threads
    assert await trio.to_thread.run_sync(lambda: "a thread") == "a thread"
    took, stuck = warnings(caplog)  # each said once
    assert "took more than 10 s" in took and "no new one starts until it ends" in stuck
    assert "stuck" in locator.status()["snapshot"]["error"]


class Down:
    """A provider whose source is down."""

    name = "down"

    async def find(self, sector: SectorRef) -> SectorLocation | None:
        await trio.lowlevel.checkpoint()
        raise SectorProviderError(f"{sector}: cannot connect")


async def test_a_lookup_keeps_its_time_bound_while_the_snapshot_is_slow_to_read_and_gets_it_after(
    tmp_path,
    autojump_clock,
    monkeypatch,
):
    """A huge snapshot on a slow disk must not eat a WinningPoSt's ~20 s: the lookup goes on
    without it, and its entries are taken in when they arrive (a source that cannot answer
    forgets nothing: a provider that says it does not know the sector would, as it should)."""
    import damocles_ext.sectors.snapshot as snapshot_module

    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())
    slow = threading.Event()
    read_file = snapshot_module.read_file
    monkeypatch.setattr(
        snapshot_module, "read_file", lambda *args: slow.wait() and read_file(*args)
    )
    snapshot = Watched(str(path), wall=wall_at(WALL + 60))
    try:
        async with SectorLocator([Down()], snapshot=snapshot) as locator:
            with trio.fail_after(locator.bounds.budget(20) + 1):  # a WinningPoSt's ~20 s
                [answer] = await locator.locate(refs(1), time_left=20)
            assert answer.status == "error"  # nothing is known yet
            slow.set()
            await snapshot.loaded.wait()
            assert locator.cached(SectorRef(MINER, 1)).provider == "p"
            assert snapshot.restored == 1
    finally:
        slow.set()


class Known:
    """A provider that knows every sector but 1 (at /x/...), at once."""

    name = "known"

    async def find(self, sector: SectorRef) -> SectorLocation | None:
        await trio.lowlevel.checkpoint()
        if sector.number == 1:
            return None
        return SectorLocation(f"/x/sealed/{sector.number}", f"/x/cache/{sector.number}")


@pytest.fixture
def hung_read(monkeypatch):
    """Reads of snapshots that hang (a dead NFS mount) until the test sets the event."""
    import damocles_ext.sectors.snapshot as snapshot_module

    hung = threading.Event()
    read_file = snapshot_module.read_file
    monkeypatch.setattr(
        snapshot_module, "read_file", lambda *args: hung.wait() and read_file(*args)
    )
    yield hung
    hung.set()


async def test_a_snapshot_read_that_hangs_is_given_up_after_its_bound_and_the_file_left_as_it_is(
    tmp_path, autojump_clock, hung_read, caplog
):
    """The background refresh starts, lookups stop waiting for it, the status says it, and the
    file (never read) is not written over by the periodic saves nor by the stop."""
    from damocles_ext.sectors.snapshot import READ_TIMEOUT

    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())
    snapshot = Watched(str(path), every=300, wall=wall_at(WALL + 60))
    locator = SectorLocator([Known()], snapshot=snapshot)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(READ_TIMEOUT + 1):
            await nursery.start(locator.refresh_forever)
        [learned] = await locator.locate(refs(2), time_left=20)
        assert learned.found and not learned.cached
        for _ in range(3):  # fresh: answered at once, the read not waited for again
            start = trio.current_time()
            [hit] = await locator.locate(refs(2), time_left=20)
            assert hit.cached and trio.current_time() == start
            await trio.sleep(60)
        await trio.sleep(3600)  # a dozen periodic saves' times
        error = locator.status()["snapshot"]["error"]
        nursery.cancel_scope.cancel()
    await locator.aclose()
    assert f"reading it took more than {READ_TIMEOUT:g} s" in error and "not written over" in error
    [said] = warnings(caplog)
    assert "given up" in said and "taken in if the read ends" in said
    assert path.read_bytes() == good_snapshot() and not snapshot.saved.is_set()


async def test_a_snapshot_read_given_up_is_taken_in_when_it_ends_and_saved_again_after(
    tmp_path, mock_clock, hung_read, caplog
):
    from damocles_ext.sectors.snapshot import READ_TIMEOUT

    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())
    snapshot = Watched(str(path), every=300, wall=wall_at(WALL + 60))
    async with SectorLocator([Known()], snapshot=snapshot) as locator:
        waited = trio.Event()

        async def wait() -> None:
            await locator.restore()
            waited.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(READ_TIMEOUT)
            await trio.testing.wait_all_tasks_blocked()
            assert waited.is_set(), "the read is waited for past its bound"
        assert "given up" in locator.status()["snapshot"]["error"]
        [learned] = await locator.locate(refs(2), time_left=20)
        hung_read.set()
        await snapshot.loaded.wait()
        assert locator.cached(SectorRef(MINER, 1)).provider == "p"
        assert locator.status()["snapshot"]["error"] is None
    assert any("ended after all" in r.getMessage() for r in caplog.records)
    _, entries = decode(path.read_bytes(), 0.0, WALL + 60)  # the stop's save
    assert sorted(s.number for s, _ in entries) == [1, 2] and learned.found


async def test_a_sector_no_provider_knows_while_the_snapshot_is_read_is_not_taken_back_from_it(
    tmp_path, autojump_clock, hung_read
):
    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())  # sector 1, at /a/...
    snapshot = Watched(str(path), wall=wall_at(WALL + 60))
    async with SectorLocator([Known()], snapshot=snapshot) as locator:
        [first] = await locator.locate(refs(1), time_left=20)  # the read still hangs
        assert first.status == "not_found"
        hung_read.set()
        await snapshot.loaded.wait()
        assert locator.cached(SectorRef(MINER, 1)) is None and snapshot.restored == 0
        [again] = await locator.locate(refs(1), time_left=20)
    assert again.status == "not_found", again  # not a fresh hit of the snapshot's location


async def test_a_sector_learned_while_the_snapshot_is_read_is_written_by_the_next_periodic_save(
    tmp_path, mock_clock, hung_read
):
    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())  # sector 1
    snapshot = Watched(str(path), every=300, wall=wall_at(WALL + 60))
    locator = SectorLocator([Known()], snapshot=snapshot)
    async with locator, trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(locator.refresh_forever)
        nursery.start_soon(locator.locate, refs(2))
        await trio.testing.wait_all_tasks_blocked()
        phase_end, _ = locator.bounds.phases(start, locator.bounds.budget(None))
        mock_clock.jump(
            (phase_end - start) / 2
        )  # the lookup waits for the read no more: asks, learns
        await trio.testing.wait_all_tasks_blocked()
        assert locator.cached(SectorRef(MINER, 2)) is not None
        hung_read.set()
        await snapshot.loaded.wait()
        await trio.testing.wait_all_tasks_blocked()  # the periodic saves begin
        saved = snapshot.saved
        mock_clock.jump(300)
        await trio.testing.wait_all_tasks_blocked()
        assert snapshot.writing or saved.is_set(), "sector 2 is not written, as if it had been"
        await saved.wait()
        nursery.cancel_scope.cancel()
        _, entries = decode(path.read_bytes(), 0.0, WALL + 60)
    assert sorted(s.number for s, _ in entries) == [1, 2]


class FailingOs:
    """The os module, whose call `name` fails with `errno` after its first `skip` calls while
    `on` (the snapshot's module is given it: nothing else is touched)."""

    def __init__(self, name: str, error: int, skip: int) -> None:
        self.name, self.error, self.skip, self.on = name, error, skip, True

    def __getattr__(self, name: str):
        call = getattr(os, name)
        if name != self.name:
            return call

        def failing(*args):
            if self.on and self.skip <= 0:
                raise OSError(self.error, os.strerror(self.error))
            self.skip -= 1
            return call(*args)

        return failing


@pytest.mark.parametrize(
    ("failure", "why"),
    [
        (("lstat", errno.EIO, 0), "it cannot be looked at"),
        (("open", errno.EMFILE, 0), "it cannot be opened"),  # looking at its first line
        (("open", errno.EMFILE, 1), "it cannot be opened"),  # reading it
        (("read", errno.EIO, 1), "it cannot be read"),
        ("no memory", "it could not be read: MemoryError"),
    ],
)
async def test_a_snapshot_that_could_not_be_read_is_left_as_it_is_for_the_next_start(
    failure, why, tmp_path, mock_clock, monkeypatch, caplog
):
    """A failure to read the file says nothing of what it holds: replacing it (with what a
    process started during an outage learned, nothing) would lose the good snapshot exactly
    when it is needed. Only bad content is replaced."""
    import damocles_ext.sectors.snapshot as snapshot_module

    path = tmp_path / "sectors.snapshot"
    path.write_bytes(good_snapshot())
    if failure == "no memory":
        failing = FailingOs("none", 0, 0)

        def decode_failing(*args):
            if failing.on:
                raise MemoryError
            return decode(*args)

        monkeypatch.setattr(snapshot_module, "decode", decode_failing)
    else:
        failing = FailingOs(*failure)
        monkeypatch.setattr(snapshot_module, "os", failing)
    snapshot = CacheSnapshot(str(path), wall=wall_at(WALL + 60))
    async with SectorLocator([Known()], snapshot=snapshot) as locator:
        await locator.restore()
        failing.on = False  # it was for a while only
        [learned] = await locator.locate(refs(2))
        assert learned.found and not await snapshot.save(locator.cache)
        error = locator.status()["snapshot"]["error"]
    assert path.read_bytes() == good_snapshot()  # nor at the stop
    [said] = warnings(caplog)
    assert why in said and "not written over by this process" in said
    assert why in error and "not written over until a restart" in error
    again = CacheSnapshot(str(path), wall=wall_at(WALL + 120))
    async with SectorLocator([], snapshot=again) as locator:
        await locator.restore()
    assert again.restored == 1


def test_the_cache_restores_entries_least_recently_used_first_behind_newer_ones():
    """SectorCache.restore, sans-IO: a sector learned since is not replaced; duplicates keep
    the later; past max_entries the least recently used of the restored go."""
    rules = CacheRules(fresh_for=60, refresh_lead=10, keep_for=1000, max_entries=3)
    cache = SectorCache(rules)
    cache.learn(SectorRef(MINER, 9), SectorLocation("/new", "/new"), "live", 500.0)

    def entry(at: float) -> CacheEntry:
        return CacheEntry(SectorLocation(f"/at{at:g}", "/c"), "old", at)

    taken = cache.restore(
        [
            (SectorRef(MINER, 1), entry(100)), (SectorRef(MINER, 2), entry(-600)),
            (SectorRef(MINER, 3), entry(200)), (SectorRef(MINER, 9), entry(400)),
            (SectorRef(MINER, 4), entry(300)), (SectorRef(MINER, 1), entry(350)),
        ],
        now=500.0,
    )  # fmt: skip
    assert taken == 2
    assert [s.number for s, _ in cache.entries()] == [4, 1, 9]  # 3 went: least recently used
    assert cache.get(SectorRef(MINER, 9)).provider == "live"
    assert cache.get(SectorRef(MINER, 1)).location.sealed_file == "/at350"
    assert cache.fresh(SectorRef(MINER, 1), 500.0) is None  # 150 s old
    assert cache.due(500.0) == []  # none used yet: nothing to refresh ahead


# --- the commands -----------------------------------------------------------------------------


async def index_find(port: int, number: int) -> dict:
    from test_coordinator_sectors import raw_answers

    [(status, body)] = await raw_answers(
        port, [b'["normal",{"Miner":%d,"Number":%d}]' % (MINER, number)]
    )
    assert status == 200, body
    return json.loads(body)


@pytest.mark.usefixtures("no_leftover_processes")
async def test_a_coordinator_restarted_while_its_source_is_down_still_answers_what_it_learned(
    tmp_path, monkeypatch
):
    """With the unit's state directory ($STATE_DIRECTORY): the snapshot is on by default."""
    from helpers.frontend import CoordinatorProcess

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    with DamoclesSource() as source:
        source.put(MINER, 5, "store-c")
        args = (f"sqlite:///{tmp_path}/jobs.db", "--proxy", f"127.0.0.1:{source.port}")
        first = CoordinatorProcess(*args)
        async with trio.open_nursery() as nursery:
            await first.start(nursery)
            assert first.proc is not None
            try:
                assert (await index_find(first.port, 5))["result"]["Found"] is True
                first.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await first.proc.wait() == 0
            finally:
                first.stop()
        assert (state / "sector-locations.snapshot").is_file()
        source.stop()
        second = CoordinatorProcess(*args)
        async with trio.open_nursery() as nursery:
            await second.start(nursery)
            assert second.proc is not None
            try:
                found = await index_find(second.port, 5)
                unknown = await index_find(second.port, 6)
                second.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await second.proc.wait() == 0
            finally:
                second.stop()
    assert found["result"] == {
        "Found": True, "Instance": {"SealedFile": "store-c", "CacheDir": "store-c"},
    }  # fmt: skip
    assert "cannot connect" in unknown["error"]["message"]  # nothing known of it: the reason
    assert b"1 sector locations taken from" in second.stderr


def worker_config(directory) -> str:
    from helpers.frontend import plugin_block

    cfg = directory / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    return str(cfg)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sector-cache", "/nonexistent/dir/file"], "its directory /nonexistent/dir does not"),
        (["--sector-cache", "{tmp}"], "it is a directory"),
        (["--sector-cache", "{tmp}/passwd"], "it is a file that is not a sector-location snap"),
        (["--sector-cache", "{tmp}/fifo"], "it is a FIFO (named pipe), not a sector-loc"),
        (["--no-sector-cache", "--sector-cache", "{tmp}/f"], "not allowed with argument"),
    ],
)
@pytest.mark.parametrize("command", ["coordinator", "worker"])
async def test_a_sector_cache_that_cannot_be_is_exit_2_saying_why_and_leaves_nothing_behind(
    command, args, message, tmp_path
):
    from helpers.frontend import dext_run_async

    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    os.mkfifo(tmp_path / "fifo")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if command == "coordinator":
        base = ["coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db", "--listen", "127.0.0.1:0"]
    else:
        base = ["worker", "--manager", "127.0.0.1:1", "--attached", f"a={tmp_path}"]
        base += ["-c", worker_config(tmp_path)]
    with trio.fail_after(60):  # a path taken would start the command, which runs on
        done = await dext_run_async(*base, "--proxy", "127.0.0.1:1", *args)
    assert done.returncode == 2, done.stderr.decode()
    assert message in done.stderr.decode() and b"Traceback" not in done.stderr
    assert not (tmp_path / "jobs.db").exists()  # checked before the job store is made
    assert (tmp_path / "passwd").read_text().startswith("root:x:")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device takes root")
def test_a_device_as_sector_cache_is_refused_at_start_and_left_as_it_is(tmp_path):
    """`--sector-cache /dev/null`, as root: refused (exit 2), not replaced by a regular file."""
    import argparse

    from damocles_ext.commands.common import sector_snapshot
    from damocles_ext.errors import UsageError

    path = tmp_path / "null"
    make_unusable(path, "a character device")
    args = argparse.Namespace(sector_cache=str(path), no_sector_cache=False)
    with pytest.raises(UsageError, match="it is a character device, not a sector-location snap"):
        sector_snapshot(args, logging.getLogger("damocles_ext.worker"))
    assert stat.S_ISCHR(os.lstat(path).st_mode)


@pytest.mark.parametrize("command", ["coordinator", "worker"])
async def test_sector_cache_without_proxy_is_exit_2(command, tmp_path):
    from helpers.frontend import dext_run_async

    if command == "coordinator":
        base = ["coordinator", "--jobs", f"sqlite:///{tmp_path}/jobs.db"]
    else:
        base = ["worker", "--manager", "127.0.0.1:1", "-c", worker_config(tmp_path)]
    done = await dext_run_async(*base, "--sector-cache", str(tmp_path / "f"))
    assert done.returncode == 2, done.stderr.decode()
    assert "--sector-cache goes with --proxy" in done.stderr.decode()


def test_a_state_directory_that_cannot_hold_the_snapshot_is_a_warning_not_a_failed_start(
    tmp_path, monkeypatch, caplog
):
    """$STATE_DIRECTORY (systemd's) is the default's place: one missing or open to other users'
    writes leaves the cache in memory, said; `--no-sector-cache` turns even a good one off."""
    import argparse

    from damocles_ext.commands.common import sector_snapshot

    log = logging.getLogger("damocles_ext.worker")
    args = argparse.Namespace(sector_cache=None, no_sector_cache=False)
    good = tmp_path / "state"
    good.mkdir(mode=0o700)
    monkeypatch.setenv("STATE_DIRECTORY", f"{good}:{tmp_path / 'second'}")
    snapshot = sector_snapshot(args, log)
    assert snapshot is not None and snapshot.path == str(good / "sector-locations.snapshot")
    assert sector_snapshot(argparse.Namespace(sector_cache=None, no_sector_cache=True), log) is None
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    holding = tmp_path / "holding"
    holding.mkdir(mode=0o700)
    os.mkfifo(holding / "sector-locations.snapshot")
    for state, why in (
        (tmp_path / "missing", "does not exist"),
        (open_to_all, "other users"),
        (holding, "it is a FIFO (named pipe), not a sector-loc"),
    ):
        monkeypatch.setenv("STATE_DIRECTORY", str(state))
        caplog.clear()
        assert sector_snapshot(args, log) is None
        [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert why in record.getMessage() and "in memory only" in record.getMessage()
    monkeypatch.delenv("STATE_DIRECTORY")
    assert sector_snapshot(args, log) is None
