"""The scan of the stores, on real files: a sector found in part (its cache directory there and
its sealed file gone, or either of the wrong type: a regular file for the cache directory, a
symlink loop, a FIFO) is answered missing, saying in which store it was found and what is wrong
with the rest, by the locator, `sectors find` and `prove --comm-r`; a sector with nothing of it
in any store is still not known to any provider."""

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
    assert elsewhere.status == "found"
    assert elsewhere.location.sealed_file == str(sealed_path(stores["b"], 7))
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
