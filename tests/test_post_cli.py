"""`damocles-ext sectors create` and `damocles-ext verify`: exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgspec
import pytest

from damocles_ext.cli import main
from damocles_ext.post import reference
from damocles_ext.post.fixtures import load_manifest, window_task, winning_task
from damocles_ext.protocol.jsonl import output_to_json, task_to_json
from damocles_ext.tasks import WindowPoStOutput

SEED = bytes(range(32))


@pytest.fixture
def manifest_path(tmp_path, capsys):
    rc = main(
        [
            "sectors",
            "create",
            "--proof-type",
            "StackedDrgWindow2KiBV1_2",
            "--count",
            "3",
            "--miner",
            "1000",
            "--out",
            str(tmp_path / "fx"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip() == str(tmp_path / "fx" / "manifest.json")
    assert "sectors: 3/3" in err
    return tmp_path / "fx" / "manifest.json"


def test_sectors_create_writes_a_manifest_of_provable_sectors(manifest_path):
    data = json.loads(manifest_path.read_text())
    assert data["proof_type"] == "StackedDrgWindow2KiBV1_2"
    assert data["miner_id"] == 1000
    assert [r["sector_id"] for r in data["replicas"]] == [1, 2, 3]
    assert all(len(bytes.fromhex(r["comm_r"])) == 32 for r in data["replicas"])
    task = window_task(load_manifest(manifest_path), SEED)
    out = reference.window_post(task)
    assert out.faults == [] and len(out.proofs) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proof-type", "StackedDrgWindow3KiBV1", "--count", "1"], "unknown proof type"),
        (["--proof-type", "StackedDrgWindow2KiBV1", "--count", "0"], "at least 1"),
        (
            ["--proof-type", "StackedDrgWindow2KiBV1", "--count", "1", "--rows-to-discard", "6"],
            "rows_to_discard must be 0..5",
        ),
    ],
)
def test_sectors_create_rejects_bad_arguments_with_exit_2(tmp_path, capsys, args, message):
    rc = main(["sectors", "create", "--miner", "1", "--out", str(tmp_path), *args])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_sectors_create_under_a_path_that_is_not_utf8_exits_2_before_writing(tmp_path, relative):
    # The manifest holds the absolute path: a relative --out under such a directory, too.
    parent = os.fsencode(tmp_path) + b"/dir-\xff"
    os.mkdir(parent)
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "sectors", "create", "--miner", "1", "--count",
         "1", "--proof-type", "StackedDrgWindow2KiBV1", "--out",
         b"fx" if relative else parent + b"/fx"],
        capture_output=True, check=False, timeout=60, cwd=parent,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert b"Traceback" not in done.stderr
    assert b"is not UTF-8 text: byte \\xff (character" in done.stderr, done.stderr
    assert b"choose a directory whose path is UTF-8" in done.stderr
    assert os.listdir(parent) == []


def test_sectors_create_judges_the_real_path_the_manifest_records(tmp_path):
    def create(out: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "damocles_ext", "sectors", "create", "--miner", "1", "--count",
             "1", "--proof-type", "StackedDrgWindow2KiBV1", "--out", out],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip

    base = os.fsencode(tmp_path)
    os.mkdir(base + b"/real-\xff")
    os.symlink(base + b"/real-\xff", base + b"/link")
    done = create(base + b"/link/fx")  # a UTF-8 link to a path that is not
    assert done.returncode == 2 and b"Traceback" not in done.stderr, done.stderr
    assert os.listdir(base + b"/real-\xff") == []
    os.mkdir(base + b"/ok")
    os.symlink(base + b"/ok", base + b"/lnk-\xff")
    done = create(base + b"/lnk-\xff/fx")  # the other way round: the manifest says ok/fx
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ok" / "fx" / "manifest.json").exists()


def write_pair(tmp_path, task, output):
    req, out = tmp_path / "task.json", tmp_path / "out.json"
    req.write_bytes(task_to_json(task))
    out.write_bytes(output_to_json(output))
    return str(req), str(out)


@pytest.mark.parametrize("verifier", ["python", "native"])
def test_verify_exits_0_for_valid_proofs_of_both_stages(tmp_path, manifest_path, capsys, verifier):
    manifest = load_manifest(manifest_path)
    for stage, task in (
        ("window_post", window_task(manifest, SEED)),
        ("winning_post", winning_task(manifest, SEED)),
    ):
        output = (
            reference.window_post(task) if stage == "window_post" else reference.winning_post(task)
        )
        req, out = write_pair(tmp_path, task, output)
        assert (
            main(["verify", stage, "--request", req, "--output", out, "--verifier", verifier]) == 0
        )
        assert "valid" in capsys.readouterr().err


@pytest.mark.parametrize("verifier", ["python", "native"])
def test_verify_exits_1_with_the_reason_for_a_bad_proof(tmp_path, manifest_path, capsys, verifier):
    task = window_task(load_manifest(manifest_path), SEED)
    output = reference.window_post(task)
    proof = bytearray(output.proofs[1])
    proof[88 + 2392 - 1] ^= 0x80  # the last sibling of the real sector (slot 1 is padding)
    bad = msgspec.structs.replace(output, proofs=[output.proofs[0], bytes(proof)])
    req, out = write_pair(tmp_path, task, bad)
    assert (
        main(["verify", "window_post", "--request", req, "--output", out, "--verifier", verifier])
        == 1
    )
    assert "proof 1: sector 3 challenge 9: inclusion path" in capsys.readouterr().err

    req, out = write_pair(tmp_path, task, WindowPoStOutput(proofs=[], faults=[2]))
    assert main(["verify", "window_post", "--request", req, "--output", out]) == 1
    assert "faulty sectors [2]" in capsys.readouterr().err


def test_verify_exits_2_for_bad_input(tmp_path, manifest_path, capsys):
    task = window_task(load_manifest(manifest_path), SEED)
    req, out = write_pair(tmp_path, task, reference.window_post(task))
    assert (
        main(
            ["verify", "window_post", "--request", req, "--output", str(tmp_path / "missing.json")]
        )
        == 2
    )
    assert "missing.json does not exist" in capsys.readouterr().err
    (tmp_path / "garbage.json").write_text('{"proofs": "nope"}')
    assert (
        main(
            ["verify", "window_post", "--request", req, "--output", str(tmp_path / "garbage.json")]
        )
        == 2
    )
    assert "garbage.json" in capsys.readouterr().err
    # stdin once, not for both (the second read found it empty: "truncated").
    assert main(["verify", "window_post", "--request", "-", "--output", "-"]) == 2
    assert "--request and --output cannot both be - (stdin)" in capsys.readouterr().err
    assert main(["verify", "window_post", "--request", req, "--output", str(tmp_path)]) == 2
    assert f"output file {tmp_path} is a directory, not an output JSON file" in (
        capsys.readouterr().err
    )
    dup = msgspec.structs.replace(task, replicas=task.replicas + task.replicas[:1])
    req2, _ = write_pair(tmp_path, dup, WindowPoStOutput(proofs=[], faults=[]))
    assert main(["verify", "window_post", "--request", req2, "--output", out]) == 2
    assert "appears twice" in capsys.readouterr().err
