"""The scan of the stores, on real files: a sector found in part (its cache directory there and
its sealed file gone, or either of the wrong type: a regular file for the cache directory, a
symlink loop, a FIFO) is answered missing, saying in which store it was found and what is wrong
with the rest, by the locator, `sectors find` and `prove --comm-r`; a sector with nothing of it
in any store is still not known to any provider. A sector whole in one store is found there,
whatever another store left of it; one split over two stores, as damocles may keep it, is found
in both, but never with a part of a leftover."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.damocles_source import DamoclesSource
from test_prove_manifest import SEED, dext
from test_sectors_cli import find

from damocles_ext.sectors import SectorLocation, SectorRef
from damocles_ext.sectors.files import location_problem
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.metrics import SectorMetrics
from damocles_ext.sectors.model import SectorProviderError
from damocles_ext.sectors.providers import BROKEN_ADVICE, SourceNode, StoreScan

MINER = 1000


def sealed_path(root: Path, number: int) -> Path:
    return root / "sealed" / f"s-t0{MINER}-{number}"


def cache_path(root: Path, number: int) -> Path:
    return root / "cache" / f"s-t0{MINER}-{number}"


def whole(root: Path, number: int) -> None:
    sealed_path(root, number).write_bytes(b"replica")
    cache_path(root, number).mkdir()


def no_sealed_file(root: Path, number: int) -> None:
    cache_path(root, number).mkdir()


def cache_dir_a_file(root: Path, number: int) -> None:
    sealed_path(root, number).write_bytes(b"replica")
    cache_path(root, number).write_bytes(b"not a directory")


def sealed_file_a_symlink_loop(root: Path, number: int) -> None:
    os.symlink(sealed_path(root, number).name, sealed_path(root, number))  # points at itself
    cache_path(root, number).mkdir()


def sealed_file_a_fifo(root: Path, number: int) -> None:
    os.mkfifo(sealed_path(root, number))
    cache_path(root, number).mkdir()


def sealed_file_a_symlink_to_nothing(root: Path, number: int) -> None:
    os.symlink(root / "gone" / "s-replica", sealed_path(root, number))  # a store moved away
    cache_path(root, number).mkdir()


#: Each kind of sector found in part, and what is said of it after "found in store a (ROOT), but".
BROKEN = {
    1: (no_sealed_file, "its sealed file {sealed} does not exist (nor in store b)"),
    2: (cache_dir_a_file, "its cache directory {cache} is a regular file, not a directory"),
    3: (
        sealed_file_a_symlink_loop,
        "its sealed file {sealed} is a symlink loop (too many levels of symbolic links)",
    ),
    4: (sealed_file_a_fifo, "its sealed file {sealed} is a FIFO, not a regular file"),
}


@pytest.fixture
def stores(tmp_path) -> dict[str, Path]:
    """Store a with sectors 1-4 found in part and sector 5 whole; sector 6 in neither store;
    sector 7 in part in store a, whole in store b."""
    made = {name: tmp_path / name for name in ("a", "b")}
    for root in made.values():
        (root / "sealed").mkdir(parents=True)
        (root / "cache").mkdir()
    for number, (make, _) in BROKEN.items():
        make(made["a"], number)
    whole(made["a"], 5)
    sealed_file_a_fifo(made["a"], 7)  # and whole in store b: found there
    whole(made["b"], 7)
    return made


def said(stores: dict[str, Path], number: int) -> str:
    """What is said of broken sector `number` found in store a."""
    root = stores["a"]
    what = BROKEN[number][1].format(
        sealed=sealed_path(root, number), cache=cache_path(root, number)
    )
    return (
        f"sector {number} of miner {MINER}: found in store a ({root}), but {what}; {BROKEN_ADVICE}"
    )


async def test_a_sector_the_scan_finds_in_part_is_missing_and_says_where_and_what_is_wrong(stores):
    # It said "sector N of miner 1000 is not known to any provider (asked: scan of 2 stores)"
    # of each: the reason the scan saw was thrown away.
    metrics = SectorMetrics()
    scan = StoreScan({name: str(root) for name, root in stores.items()})
    async with SectorLocator([scan], metrics=metrics) as locator:
        answers = await locator.locate([SectorRef(MINER, n) for n in range(1, 8)])
        status = locator.status()
    *broken, found, nowhere, elsewhere = answers
    for number, answer in enumerate(broken, 1):
        assert (answer.status, answer.provider, answer.cached) == ("missing", scan.name, False)
        assert answer.detail == said(stores, number)
        assert answer.location == SectorLocation(
            str(sealed_path(stores["a"], number)), str(cache_path(stores["a"], number)), "a", "a"
        )
    assert found.status == "found" and found.location.sealed_store == "a"
    assert nowhere.status == "not_found"
    assert nowhere.detail == (
        f"sector 6 of miner {MINER} is not known to any provider (asked: scan of 2 stores)"
    )
    assert elsewhere.status == "found"  # both its files from store b, none from a's leftover
    assert elsewhere.location == SectorLocation(
        str(sealed_path(stores["b"], 7)), str(cache_path(stores["b"], 7)), "b", "b"
    )
    assert (status["missing"], status["not_found"], status["source_errors"]) == (4, 1, {})
    assert metrics.registry.get_sample_value("damocles_ext_sector_missing_total") == 4
    assert locator.cached(SectorRef(MINER, 1)) is None  # not a location to prove from


async def test_what_the_scan_found_in_part_is_said_after_the_source_knew_nothing_or_failed(
    stores,
):
    scan = StoreScan({name: str(root) for name, root in stores.items()})
    with DamoclesSource() as source:
        node = SourceNode(source.url, {})
        async with SectorLocator([node, scan]) as locator:
            [unknown] = await locator.locate([SectorRef(MINER, 4)])
            source.stop()
            [failed] = await locator.locate([SectorRef(MINER, 4)])
    assert unknown.status == "missing"
    assert unknown.detail == f"{said(stores, 4)} (not known to {node.name})"
    # The source down and nothing known from before: an error, which says what the scan saw.
    assert failed.status == "error" and "cannot connect" in failed.detail, failed.detail
    assert f"; {scan.name}: {said(stores, 4)};" in failed.detail, failed.detail


def test_a_last_known_file_of_the_wrong_type_is_said_to_be_of_that_type(stores):
    root = stores["a"]
    fifo = SectorLocation(str(sealed_path(root, 4)), str(cache_path(root, 4)))
    assert location_problem(fifo) == f"{sealed_path(root, 4)} is a FIFO, not a regular file"
    dir_as_file = SectorLocation(str(cache_path(root, 5)), str(sealed_path(root, 5)))
    assert location_problem(dir_as_file) == (
        f"{cache_path(root, 5)} is a directory, not a regular file"
    )


def test_prove_comm_r_says_why_it_skips_each_sector_found_in_part(stores, tmp_path):
    del stores["b"]
    whole_one = 5
    os.unlink(sealed_path(stores["a"], whole_one))  # and nothing of sector 6: none is proved
    os.rmdir(cache_path(stores["a"], whole_one))
    numbers = range(1, 7)
    (tmp_path / "comm_r.json").write_text(json.dumps({f"{MINER}:{n}": "00" * 32 for n in numbers}))
    proc = dext(
        "prove", "window_post", "--sectors", f"{MINER}:1-6", "--comm-r", tmp_path / "comm_r.json",
        "--seed", SEED, "--proof-type", "StackedDrgWindow2KiBV1_2", "--attached",
        f"a={stores['a']}", "--socket", tmp_path / "none", check=0,
    )  # fmt: skip
    assert json.loads(proc.stdout) == {"proofs": [], "faults": list(numbers)}
    skipped = [line for line in proc.stderr.splitlines() if "skipped (a fault)" in line]
    assert [line.split("skipped (a fault): ", 1)[1] for line in skipped] == [
        said(stores, n).replace(" (nor in store b)", "") for n in range(1, 5)
    ] + [
        f"sector {n} of miner {MINER} is not known to any provider (asked: scan of 1 store)"
        for n in (5, 6)
    ], proc.stderr


def test_sectors_find_says_in_which_store_each_sector_found_in_part_is_and_what_is_wrong(stores):
    result = find(str(MINER), "1-6", "--attached", f"a={stores['a']}", "--attached",
                  f"b={stores['b']}")  # fmt: skip
    assert result.returncode == 1, result.stderr
    rows = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
    assert rows == [[f"f0{MINER}/{n}", "missing"] for n in range(1, 5)] + [
        [f"f0{MINER}/5", "found"], [f"f0{MINER}/6", "not"]
    ]  # fmt: skip
    lines = result.stderr.splitlines()
    assert lines == [said(stores, n) for n in range(1, 5)] + [
        f"sector 6 of miner {MINER} is not known to any provider (asked: scan of 2 stores)"
    ], result.stderr
    as_json = find(str(MINER), "3", "--attached", f"a={stores['a']}", "--json")
    [row] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (row["status"], row["sealed_store"]) == ("missing", "a")
    assert "is a symlink loop" in row["detail"] and "not known" not in row["detail"]


def sealed_file_only(root: Path, number: int) -> None:
    sealed_path(root, number).write_bytes(b"half a replica")


#: What a store may have left of a sector that is whole in another store.
LEFTOVERS = {
    "a FIFO as sealed file, and a cache directory": sealed_file_a_fifo,
    "a symlink loop as sealed file, and a cache directory": sealed_file_a_symlink_loop,
    "a symlink to nothing as sealed file, and a cache directory": sealed_file_a_symlink_to_nothing,
    "a sealed file, and a regular file as cache directory": cache_dir_a_file,
    "a cache directory alone": no_sealed_file,
    "a sealed file alone": sealed_file_only,
}


def empty_stores(tmp_path: Path, names: str) -> dict[str, Path]:
    made = {name: tmp_path / name for name in names}
    for root in made.values():
        (root / "sealed").mkdir(parents=True)
        (root / "cache").mkdir()
    return made


async def scanned(stores: dict[str, Path], order: str, number: int = 7):
    """Sector `number` as the scan of `stores` in `order` answers it."""
    scan = StoreScan({name: str(stores[name]) for name in order})
    async with SectorLocator([scan]) as locator:
        [answer] = await locator.locate([SectorRef(MINER, number)])
    return answer


def both_in(stores: dict[str, Path], name: str, number: int = 7) -> SectorLocation:
    root = stores[name]
    return SectorLocation(str(sealed_path(root, number)), str(cache_path(root, number)), name, name)


@pytest.mark.parametrize("leftover", list(LEFTOVERS))
async def test_a_sector_whole_in_one_store_is_found_there_whatever_another_store_left_of_it(
    tmp_path, leftover
):
    # Its sealed file and its cache directory were each taken from the first store that had
    # one: with the leftover's store first, a sealed file from one store was paired with the
    # leftover cache directory of the other (or the other way round), and proved faulty.
    stores = empty_stores(tmp_path, "ab")
    LEFTOVERS[leftover](stores["a"], 7)
    whole(stores["b"], 7)
    for order in ("ab", "ba"):
        answer = await scanned(stores, order)
        assert (answer.status, answer.location) == ("found", both_in(stores, "b")), order


def split_over(stores, sealed_in: str, cache_in: str) -> SectorLocation:
    """Sector 7 with its sealed file in one store and its cache directory in another."""
    sealed, cache = sealed_path(stores[sealed_in], 7), cache_path(stores[cache_in], 7)
    return SectorLocation(str(sealed), str(cache), sealed_in, cache_in)


async def found_in_any_order(stores, orders, location: SectorLocation) -> None:
    """Sector 7 found at `location` whichever order of the stores the scan is given."""
    for order in orders:
        answer = await scanned(stores, order)
        assert (answer.status, answer.location) == ("found", location), order


async def test_a_sector_split_over_two_stores_as_damocles_keeps_it_is_found_in_both(tmp_path):
    stores = empty_stores(tmp_path, "ab")
    sealed_file_only(stores["a"], 7)
    cache_path(stores["b"], 7).mkdir()
    await found_in_any_order(stores, ("ab", "ba"), split_over(stores, "a", "b"))


async def test_a_split_sector_is_never_paired_with_what_a_broken_leftover_has(tmp_path):
    # Store a: a FIFO as sealed file beside a cache directory; store b: a sealed file alone.
    # a's cache directory is a broken leftover's: the sector is missing, said of store a,
    # not found with b's sealed file and a's cache directory.
    stores = empty_stores(tmp_path, "abc")
    sealed_file_a_fifo(stores["a"], 7)
    sealed_file_only(stores["b"], 7)
    for order in ("ab", "ba"):
        answer = await scanned(stores, order)
        assert answer.status == "missing", (order, answer.location)
        assert answer.location == both_in(stores, "a"), order
        assert answer.detail == (
            f"sector 7 of miner {MINER}: found in store a ({stores['a']}), but its sealed file"
            f" {sealed_path(stores['a'], 7)} is a FIFO, not a regular file; {BROKEN_ADVICE}"
        ), order
    # With its cache directory whole in store c, it is found in b and c.
    cache_path(stores["c"], 7).mkdir()
    await found_in_any_order(stores, ("abc", "cba"), split_over(stores, "b", "c"))


async def test_the_scan_looks_at_a_sector_found_whole_once_per_part_and_a_store_before_it_once(
    tmp_path, monkeypatch
):
    stores = empty_stores(tmp_path, "abc")
    whole(stores["a"], 1)
    whole(stores["c"], 2)  # nothing of it in a nor b
    sealed_file_only(stores["a"], 4)  # split: its cache directory in b
    cache_path(stores["b"], 4).mkdir()
    looked: list[str] = []
    real_lstat = os.lstat

    def counting_lstat(path, *args, **kwargs):  # (a look is one, and a stat for a symlink)
        if str(path).startswith(str(tmp_path)):
            looked.append(str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counting_lstat)
    # 2: a's and b's sealed file, then c's and its cache directory; 3: nowhere, each part in
    # each store; 4: each sealed file, a's cache directory, then b's (c's is not looked at).
    for number, looks, status in ((1, 2, "found"), (2, 4, "found"), (3, 6, "not_found"),
                                  (4, 5, "found")):  # fmt: skip
        looked.clear()
        answer = await scanned(stores, "abc", number)
        assert answer.status == status, answer
        assert len(looked) == looks, looked


async def test_a_symlink_to_nothing_is_said_to_be_one_not_a_file_that_does_not_exist(tmp_path):
    # It was "does not exist", and a sector whose two files were such symlinks "not known":
    # the name is there, its target is not (a store mounted elsewhere, a copy gone).
    stores = empty_stores(tmp_path, "ab")
    sealed_file_a_symlink_to_nothing(stores["a"], 7)
    os.symlink(tmp_path / "elsewhere", cache_path(stores["a"], 8))
    os.symlink(tmp_path / "elsewhere-too", sealed_path(stores["a"], 8))
    sealed = sealed_path(stores["a"], 7)
    answer = await scanned(stores, "ab")
    assert (answer.status, answer.location) == ("missing", both_in(stores, "a"))
    assert answer.detail == (
        f"sector 7 of miner {MINER}: found in store a ({stores['a']}), but its sealed file"
        f" {sealed} is a symlink to {stores['a'] / 'gone' / 's-replica'}, which does not exist;"
        f" {BROKEN_ADVICE}"
    )
    both = await scanned(stores, "ab", 8)
    assert both.status == "missing", both
    assert f"is a symlink to {tmp_path / 'elsewhere'}, which does not exist" in both.detail
    assert f"is a symlink to {tmp_path / 'elsewhere-too'}, which does not exist" in both.detail


async def test_a_sector_in_no_store_where_a_store_cannot_be_looked_in_is_an_error_not_unknown(
    tmp_path,
):
    # Store b's sealed/ and cache/ are files (a store path given wrong, a mount gone bad): a
    # sector found nowhere was "not known to any provider", as if b had been looked in.
    stores = empty_stores(tmp_path, "a")
    stores["b"] = tmp_path / "b"
    stores["b"].mkdir()
    (stores["b"] / "sealed").write_bytes(b"")
    (stores["b"] / "cache").write_bytes(b"")
    whole(stores["a"], 5)
    scan = StoreScan({name: str(root) for name, root in stores.items()})
    async with SectorLocator([scan]) as locator:
        found, nowhere = await locator.locate([SectorRef(MINER, 5), SectorRef(MINER, 6)])
    assert (found.status, found.location) == ("found", both_in(stores, "a", 5))  # b not needed
    assert nowhere.status == "error", nowhere
    untold = (
        f"store b ({sealed_path(stores['b'], 6)}: Not a directory; {cache_path(stores['b'], 6)}:"
        " Not a directory)"
    )
    assert nowhere.detail == (
        f"{scan.name}: sector 6 of miner {MINER}: not in the stores looked in, and some could"
        f" not be: {untold}; check that the stores are mounted and readable here; and no location"
        " of it is known from before"
    )
    with pytest.raises(SectorProviderError, match=r"store b \(.*: Not a directory\)"):
        await scan.find(SectorRef(MINER, 6))  # (find, without a batch, raises it)
    # Found in part in store a: what it lacks is not said to be missing from store b too.
    sealed_file_only(stores["a"], 6)
    part = await scanned(stores, "ab", 6)
    assert (part.status, part.location) == ("missing", both_in(stores, "a", 6))
    assert part.detail == (
        f"sector 6 of miner {MINER}: found in store a ({stores['a']}), but its cache directory"
        f" {cache_path(stores['a'], 6)} does not exist; {untold} could not be looked in;"
        f" {BROKEN_ADVICE}"
    )
    alone = StoreScan({"b": str(stores["b"])})
    with pytest.raises(SectorProviderError, match=r": no store could be looked in: store b \("):
        await alone.find(SectorRef(MINER, 6))


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches directories whatever their mode")
async def test_a_store_whose_directory_cannot_be_searched_says_permission_denied(tmp_path):
    stores = empty_stores(tmp_path, "ab")
    (stores["b"] / "sealed").chmod(0)
    try:
        answer = await scanned(stores, "ab", 6)
    finally:
        (stores["b"] / "sealed").chmod(0o700)
    assert answer.status == "error", answer
    assert f"store b ({sealed_path(stores['b'], 6)}: Permission denied)" in answer.detail
