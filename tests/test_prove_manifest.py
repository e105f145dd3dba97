"""sectors create -> prove --manifest -> verify, end to end through real processes."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from helpers.small_disk import mounted_tmpfs

SEED = "ab" * 32


def dext(*args, check=None):
    proc = subprocess.run(
        [sys.executable, "-m", "damocles_ext", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("prove-manifest")
    dext(
        "sectors",
        "create",
        "--proof-type",
        "StackedDrgWindow2KiBV1_2",
        "--count",
        3,
        "--miner",
        1000,
        "--out",
        root / "s",
        check=0,
    )
    (root / "c.cfg").write_text('[[WdPost]]\nPlugin = "native"\n[[WinPost]]\nPlugin = "native"\n')
    return root


@pytest.mark.parametrize("stage", ["window_post", "winning_post"])
def test_a_manifest_proof_verifies_and_a_changed_one_does_not(fixtures, stage):
    task, out = fixtures / f"{stage}-task.json", fixtures / f"{stage}-out.json"
    dext(
        "prove",
        stage,
        "--manifest",
        fixtures / "s" / "manifest.json",
        "--seed",
        SEED,
        "--save-request",
        task,
        "-c",
        fixtures / "c.cfg",
        "-o",
        out,
        check=0,
    )
    saved = json.loads(task.read_text())
    assert saved["seed"][31] == 0xAB & 0x3F and len(saved["replicas"]) == 3
    dext("verify", stage, "--request", task, "--output", out, check=0)
    output = json.loads(out.read_text())
    proof = bytearray(base64.b64decode(output["proofs"][0]))
    proof[-1] ^= 1
    output["proofs"][0] = base64.b64encode(bytes(proof)).decode()
    out.write_text(json.dumps(output))
    bad = dext("verify", stage, "--request", task, "--output", out, check=1)
    assert "Traceback" not in bad.stderr


def test_only_the_chosen_sectors_are_proven(fixtures):
    task = fixtures / "subset-task.json"
    dext(
        "prove",
        "window_post",
        "--manifest",
        fixtures / "s" / "manifest.json",
        "--seed",
        SEED,
        "--sectors",
        "1,3",
        "--save-request",
        task,
        "-c",
        fixtures / "c.cfg",
        check=0,
    )
    assert [r["sector_id"] for r in json.loads(task.read_text())["replicas"]] == [1, 3]


def test_a_request_saved_on_a_full_disk_leaves_no_stub_and_keeps_the_one_saved_before(
    fixtures, tmp_path
):
    # Before: written in place, a 0-byte file was left, or the earlier request emptied.
    def save(task, *sectors):
        return dext("prove", "window_post", "--manifest", fixtures / "s" / "manifest.json",
                    "--seed", SEED, *sectors, "--save-request", task, "-c", fixtures / "c.cfg",
                    "-o", tmp_path / "out.json")  # fmt: skip

    with mounted_tmpfs(tmp_path / "disk", "size=64k") as disk:
        task = disk.path / "task.json"
        assert save(task, "--sectors", "1,3").returncode == 0
        before = task.read_bytes()
        disk.fill()
        refused = {path: save(path) for path in (disk.path / "new.json", task)}
        assert sorted(p.name for p in disk.path.iterdir()) == ["filler", "task.json"]
        assert task.read_bytes() == before
    for path, proc in refused.items():
        assert proc.returncode == 2, proc.stderr
        said = f"--save-request {path}: cannot write the request there: No space left on device"
        assert said in proc.stderr and "Traceback" not in proc.stderr


def test_save_request_of_a_dash_is_refused_not_written_to_a_file_named_dash(
    fixtures, tmp_path, monkeypatch
):
    # `-o -` is stdout and `--request -` stdin; `--save-request -` wrote a file named -.
    monkeypatch.chdir(tmp_path)
    proc = dext("prove", "window_post", "--manifest", fixtures / "s" / "manifest.json",
                "--seed", SEED, "--save-request", "-", "-c", fixtures / "c.cfg",
                "-o", tmp_path / "out.json", check=2)  # fmt: skip
    assert "--save-request -: give a file name" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "zz"], "'z' is not a hex digit; give the 32-byte randomness as 64 hex"),
        # Both were "is not hexadecimal", which they are.
        (["--seed", "0x" + SEED], "leave out the 0x; give the 32-byte randomness as 64 hex"),
        (["--seed", SEED[1:]], "63 hex digits, an odd number; give the 32-byte randomness"),
        (["--seed", "ab"], "must be 32 bytes"),
        ([], "--manifest needs --seed"),
        (["--seed", SEED, "--sectors", "1,x"], "expected ids like 1,2,3"),
        (["--seed", SEED, "--sectors", "9"], "not in the manifest"),
        (["--seed", SEED, "--sectors", ","], "the task has no replicas: give at least one"),
        (["--seed", SEED, "--sectors", "1,1"], "sector 1 appears twice in the task"),
        (
            ["--seed", SEED, "--proof-type", "StackedDrgWinning2KiBV1"],
            "StackedDrgWinning2KiBV1 is not a WindowPoSt proof type",
        ),
    ],
)
def test_bad_manifest_arguments_exit_2_with_a_message(fixtures, args, message):
    proc = dext(
        "prove",
        "window_post",
        "--manifest",
        fixtures / "s" / "manifest.json",
        *args,
        "-c",
        fixtures / "c.cfg",
        check=2,
    )
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_seed_without_manifest_is_a_usage_error(fixtures, tmp_path):
    (tmp_path / "t.json").write_text("{}")
    proc = dext(
        "prove",
        "window_post",
        "--request",
        tmp_path / "t.json",
        "--seed",
        SEED,
        "-c",
        fixtures / "c.cfg",
        check=2,
    )
    assert "--seed goes with --manifest" in proc.stderr


def test_a_manifest_no_frame_can_carry_or_too_long_to_be_one_exits_2(fixtures, tmp_path):
    manifest = json.loads((fixtures / "s" / "manifest.json").read_text())
    manifest["miner_id"] = 2**64
    edited = tmp_path / "manifest.json"
    edited.write_text(json.dumps(manifest))
    for key, value, message in (("version", 2, "manifest version 2 is not 1"),
                                ("rows_to_discard", -1, "rows_to_discard must be >= 0")):  # fmt: skip
        bad = json.loads((fixtures / "s" / "manifest.json").read_text())
        bad[key] = value
        (tmp_path / f"{key}.json").write_text(json.dumps(bad))
        proc = dext("prove", "window_post", "--manifest", tmp_path / f"{key}.json", "--seed",
                    SEED, "-c", fixtures / "c.cfg", check=2)  # fmt: skip
        assert message in proc.stderr
    for path, message in (
        (edited, f"miner_id {2**64} does not fit in 64 bits"),
        ("/dev/zero", "manifest /dev/zero holds over 256 MiB, more than any manifest"),
    ):
        proc = dext("prove", "window_post", "--manifest", path, "--seed", SEED,
                    "-c", fixtures / "c.cfg", check=2)  # fmt: skip
        assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--miner", 2**64, "--count", 1], "--miner must be an actor id from 0 to 2**64 - 1"),
        (["--miner", 1, "--first-sector-id", 2**64 - 1, "--count", 2], "sector ids go from 0"),
    ],
)
def test_sectors_create_refuses_ids_over_64_bits(tmp_path, args, message):
    proc = dext("sectors", "create", "--proof-type", "StackedDrgWindow2KiBV1_2",
                *args, "--out", tmp_path / "s", check=2)  # fmt: skip
    assert message in proc.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args", [["--attached", "a=/tmp"], ["--header", "Authorization: Bearer x"], ["--proxy", "x:1"]]
)
def test_sector_source_options_without_comm_r_are_refused_not_ignored(fixtures, tmp_path, args):
    (tmp_path / "t.json").write_text("{}")
    proc = dext("prove", "window_post", "--request", tmp_path / "t.json", *args,
                "-c", fixtures / "c.cfg", check=2)  # fmt: skip
    assert f"{args[0]} goes with --comm-r FILE" in proc.stderr
