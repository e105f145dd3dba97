"""prove window_post --sectors MINER:NUMBER,… --comm-r FILE: the task built from sector numbers,
located through a damocles source node look-alike, proved by real children and verified."""

from __future__ import annotations

import base64
import json
import re

import pytest
from helpers.damocles_source import DamoclesSource
from test_prove_manifest import SEED, dext

from damocles_ext.post.fixtures import create_sectors, load_manifest
from damocles_ext.sectors import SectorRef
from damocles_ext.sectors.comm_r import (
    CommRFileError,
    comm_r_from_cid,
    parse_comm_r_file,
    parse_sector_list,
)

PROOF_TYPE = "StackedDrgWindow2KiBV1_2"
MINER = 1000


def sealed_cid(comm_r: bytes) -> str:
    """A SealedCID as Lotus prints it: CIDv1, fil-commitment-sealed, poseidon multihash."""
    raw = bytes([1, 0x82, 0xE2, 0x03, 0x81, 0xE8, 0x02, 0x20]) + comm_r
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


@pytest.fixture
def store(tmp_path):
    root = tmp_path
    manifest = load_manifest(create_sectors(root / "s", PROOF_TYPE, 3, MINER, random_seed=5))
    comm_r = {f"{MINER}:{r.sector_id}": r.comm_r for r in manifest.replicas}
    comm_r[f"f0{MINER}:2"] = {"/": sealed_cid(bytes.fromhex(comm_r.pop(f"{MINER}:2")))}
    (root / "comm_r.json").write_text(json.dumps(comm_r))
    (root / "c.cfg").write_text('[[WdPost]]\nPlugin = "native"\n')
    return root


def test_sectors_located_through_the_source_are_proved_and_the_unknown_one_is_a_fault(store):
    (store / "s" / "sealed" / f"s-t0{MINER}-2").unlink()  # neither the source nor a scan finds it
    with DamoclesSource() as source:
        source.put(MINER, 1, "store-s")
        source.put(MINER, 3, "store-s")
        out = store / "out.json"
        proc = dext(
            "prove", "window_post", "--sectors", f"{MINER}:1,f0{MINER}:2,{MINER}:3",
            "--comm-r", store / "comm_r.json", "--seed", SEED, "--proof-type", PROOF_TYPE,
            "--proxy", source.url, "--attached", f"store-s={store / 's'}",
            "-c", store / "c.cfg", "-o", out, "--no-progress", check=0,
        )  # fmt: skip
    output = json.loads(out.read_text())
    assert output["faults"] == [2] and output["proofs"]
    assert "sector 2 skipped (a fault)" in proc.stderr and "1 faulty sector: 2" in proc.stderr
    # The proof is of sectors 1 and 3: the same task built from the manifest verifies it.
    verify_of_1_and_3(store, output["proofs"])


def verify_of_1_and_3(store, proofs: list) -> None:
    """`verify` takes `proofs` as those of sectors 1 and 3, the task built from the manifest."""
    task = store / "task.json"
    dext(
        "prove", "window_post", "--manifest", store / "s" / "manifest.json", "--seed", SEED,
        "--sectors", "1,3", "--save-request", task, "-c", store / "c.cfg", "-o", store / "x.json",
        check=0,
    )  # fmt: skip
    (store / "proofs.json").write_text(json.dumps({"proofs": proofs, "faults": []}))
    dext("verify", "window_post", "--request", task, "--output", store / "proofs.json", check=0)


def test_sectors_given_as_a_range_are_proved_and_verified(store):
    # A deadline's sectors one by one are longer than the 128 KiB Linux allows one argument:
    # `sectors find`'s ranges are taken here too. Sector 2 of 1-3 is not located: a fault.
    (store / "s" / "sealed" / f"s-t0{MINER}-2").unlink()
    with DamoclesSource() as source:
        source.put(MINER, 1, "store-s")
        source.put(MINER, 3, "store-s")
        out = store / "out.json"
        proc = dext(
            "prove", "window_post", "--sectors", f"f0{MINER}:1-3", "--comm-r",
            store / "comm_r.json", "--seed", SEED, "--proof-type", PROOF_TYPE, "--proxy",
            source.url, "--attached", f"store-s={store / 's'}", "-c", store / "c.cfg", "-o", out,
            "--no-progress", check=0,
        )  # fmt: skip
    output = json.loads(out.read_text())
    assert output["faults"] == [2] and output["proofs"], proc.stderr
    verify_of_1_and_3(store, output["proofs"])


def test_a_deadlines_sectors_are_taken_from_a_range_or_a_file_not_an_argument_too_long(
    store, tmp_path
):
    # 23,490 sectors one by one are one argument over the 128 KiB Linux allows ("Argument list
    # too long": no way to prove a full deadline); as a range, or as @LIST, they fit.
    numbers = range(10_000, 33_490)
    listed = ",".join(f"{MINER}:{n}" for n in numbers)
    assert len(listed) > 128 * 1024
    (tmp_path / "comm_r.json").write_text(json.dumps({f"{MINER}:{n}": "00" * 32 for n in numbers}))
    (tmp_path / "list").write_text(listed.replace(",", "\n", 100) + "\n")  # lines and commas
    for sectors in (f"{MINER}:10000-33489", f"@{tmp_path / 'list'}"):
        proc = dext(
            "prove", "window_post", "--sectors", sectors, "--comm-r", tmp_path / "comm_r.json",
            "--seed", SEED, "--proof-type", PROOF_TYPE, "--attached", f"store-s={store / 's'}",
            "--socket", tmp_path / "none", check=0,
        )  # fmt: skip
        # None is in the store: every one a fault, no prover asked (the --socket is none).
        assert json.loads(proc.stdout) == {"proofs": [], "faults": list(numbers)}, sectors


def test_sectors_at_dash_are_read_from_stdin_unless_the_comm_r_file_is(store, tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "damocles_ext", "prove", "window_post", "--sectors", "@-",
            "--seed", SEED, "--proof-type", PROOF_TYPE, "--attached", f"store-s={tmp_path}",
            "--socket", str(tmp_path / "none")]  # fmt: skip
    done = subprocess.run(
        [*args, "--comm-r", str(store / "comm_r.json")], input=f"{MINER}:1-2\n{MINER}:3\n",
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # The store attached is empty: each a fault, no prover asked.
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"proofs": [], "faults": [1, 2, 3]}
    done = subprocess.run(
        [*args, "--comm-r", "-"], input="", capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--sectors @- and --comm-r - both read stdin: give one of them as a file" in done.stderr


def test_no_sector_located_is_every_sector_a_fault_and_no_prover_is_asked(store, tmp_path):
    for number in (1, 2):
        (store / "s" / "sealed" / f"s-t0{MINER}-{number}").unlink()
    with DamoclesSource() as source:
        proc = dext(
            "prove", "window_post", "--sectors", f"{MINER}:1,{MINER}:2", "--comm-r",
            store / "comm_r.json", "--seed", SEED, "--proof-type", PROOF_TYPE, "--proxy",
            source.url, "--attached", f"store-s={store / 's'}", "--socket", tmp_path / "none",
            check=0,
        )  # fmt: skip
    assert json.loads(proc.stdout) == {"proofs": [], "faults": [1, 2]}
    # What to do says --comm-r's way: it used to say "--sectors with --manifest".
    assert proc.stderr.endswith(
        "2 faulty sectors: 1, 2; no proof: prove again without them (leave them out of --sectors)\n"
    ), proc.stderr


def test_a_source_refusing_the_token_is_exit_2_not_every_sector_a_fault(store, tmp_path):
    # Our configuration (the --header), not the sectors: said as `sectors find` says it.
    for number in (1, 2):  # only the source could locate them
        (store / "s" / "sealed" / f"s-t0{MINER}-{number}").unlink()
    with DamoclesSource(headers={"Authorization": "Bearer right"}) as source:
        source.put(MINER, 1, "store-s")
        proc = dext(
            "prove", "window_post", "--sectors", f"{MINER}:1,{MINER}:2", "--comm-r",
            store / "comm_r.json", "--seed", SEED, "--proof-type", PROOF_TYPE, "--proxy",
            source.url, "--attached", f"store-s={store / 's'}", "--header",
            "Authorization: Bearer wrong", "--socket", tmp_path / "none", check=2,
        )  # fmt: skip
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert "a sector provider refused us, so sectors went unlocated" in proc.stderr
    assert "HTTP 401" in proc.stderr and "faulty" not in proc.stderr


def test_sectors_the_source_had_no_time_to_be_asked_for_are_said_so_once_with_what_to_do(
    store, tmp_path
):
    """More sectors than the source is asked for in its share of the lookup's time (a quarter of
    the time to --deadline, at most 60 s): each sector never asked was skipped as a fault "with
    no answer in the time this lookup had (at most 5 s)", as if the source had timed out on it,
    and nothing said what to do."""
    numbers = range(1, 41)
    comm_r = {f"{MINER}:{n}": "00" * 32 for n in numbers}
    (tmp_path / "many.json").write_text(json.dumps(comm_r))
    with DamoclesSource() as source:
        source.hold()  # it takes each call and answers none
        proc = dext(
            "prove", "window_post", "--sectors", ",".join(f"{MINER}:{n}" for n in numbers),
            "--comm-r", tmp_path / "many.json", "--seed", SEED, "--proof-type", PROOF_TYPE,
            "--proxy", source.url, "--attached", f"store-x={tmp_path / 'x'}", "--deadline", "4",
            "--socket", tmp_path / "none", check=0,
        )  # fmt: skip
    assert json.loads(proc.stdout) == {"proofs": [], "faults": list(numbers)}
    said = re.search(
        rf"source 127\.0\.0\.1:{source.port}: its share \([0-9.]+ s\) of the [0-9.]+ s the"
        r" sectors' lookup had ran out before it was asked for (\d+) of the 40 sectors \(it"
        r" answered 0 in that time\): \1 are skipped as faults; prove fewer sectors at once, or"
        r" give a --deadline further away \(the lookup takes a quarter of the time to it, at most"
        r" 60 s\)\n",
        proc.stderr,
    )
    assert said is not None, proc.stderr
    never = [line for line in proc.stderr.splitlines() if ": not asked: the " in line]
    # 16 were asked at once (Bounds.concurrency) and held; the 24 others never were.
    assert len(never) == int(said.group(1)) == 24, proc.stderr
    assert all("at most 60 s) (said above)" in line for line in never), never[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1]", "expected a JSON object"),
        ("{", "not JSON"),
        ('{"1000:1": "zz"}', "entry '1000:1': 'zz' is not a comm_r"),
        ('{"1000-1": "00"}', "entry '1000-1': '1000-1' is not MINER:NUMBER"),
        ('{"1000:1": "bagboea4b5abc"}', "entry '1000:1'"),
        ('{"1000:2": "' + "00" * 32 + '"}', "no comm_r for 1000:1"),
    ],
)
def test_a_bad_comm_r_file_is_exit_2_naming_the_file_and_the_entry(
    store, tmp_path, content, message
):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    proc = dext(
        "prove", "window_post", "--sectors", f"{MINER}:1", "--comm-r", bad, "--seed", SEED,
        "--proof-type", PROOF_TYPE, "--attached", f"s={store / 's'}", "-c", store / "c.cfg",
        check=2,
    )  # fmt: skip
    assert str(bad) in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sectors", "1000:1,1001:1"], "one miner's"),
        (["--sectors", "1000"], "is not MINER:NUMBER"),
        (["--sectors", "1000:\u0663"], "is not MINER:NUMBER"),  # \d took it for 3
        # The prover refused the task (exit 1) after the sectors were located.
        (["--sectors", "1000:1,f01000:1"], "1000:1 is given twice"),
        (["--sectors", "1000:" + "9" * 5000], "a sector number is below 2^64"),
        (["--sectors", "9" * 5000 + ":1"], "a miner is below 2^64"),
        # Ranges as `sectors find` takes them, in its words.
        (["--sectors", "1000:9-3"], "--sectors: '1000:9-3': the range ends before it starts"),
        (["--sectors", "1000:1-" + "9" * 5000], "a sector number is below 2^64"),
        (["--sectors", "1000:1-\u0663"], "is not MINER:NUMBER or MINER:FIRST-LAST"),
        (["--sectors", "1000:0-1000000"], "--sectors: '1000:0-1000000': over 1000000 sectors"),
        (
            ["--sectors", "1000:0-599999,1000:600000-1000000"],
            "--sectors: 1000001 sectors asked for; at most 1000000 at once",
        ),
        (["--sectors", "1000:1-3,1000:2"], "1000:2 is given twice"),
        (["--sectors", "@/nonexistent/list"], "--sectors file /nonexistent/list does not exist"),
        (["--sectors", "@"], "--sectors @: give the file of the sectors after the @"),
        (["--sectors", "1000:1,1000:1:upgrade"], "1000:1 is given twice"),
        (["--sectors", "1000:1", "--proof-type", "StackedDrgWinning2KiBV1"], "is not one"),
        (["--sectors", "1000:1", "--proxy", "127.0.0.1:1"], "no store is known here"),
        ([], "needs --sectors"),
    ],
)
def test_bad_sector_arguments_are_exit_2_saying_what_to_give(store, args, message):
    base = ["--comm-r", store / "comm_r.json", "--seed", SEED, "-c", store / "c.cfg"]
    if "--proof-type" not in args:
        base += ["--proof-type", PROOF_TYPE]
    proc = dext("prove", "window_post", *base, *args, check=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_comm_r_is_read_from_a_cid_its_json_form_or_hex():
    comm_r = bytes(range(32))
    cid = sealed_cid(comm_r)
    assert cid.startswith("bagboea4b5abc")
    assert comm_r_from_cid(cid) == comm_r
    data = json.dumps({"1000:1": cid, "t01000:2": {"/": cid}, "1000:3": "0x" + comm_r.hex()})
    assert parse_comm_r_file(data.encode(), "f") == {SectorRef(1000, n): comm_r for n in (1, 2, 3)}
    raw = bytes([1, 0x81, 0xE2, 0x03, 0x92, 0x20, 0x20]) + comm_r  # an unsealed commitment
    unsealed = "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    with pytest.raises(CommRFileError, match="not a sealed commitment"):
        parse_comm_r_file(json.dumps({"1:1": unsealed}).encode(), "f")


def test_a_sector_list_reads_miners_numbers_and_upgraded_sectors():
    assert parse_sector_list("f01000:5, 1000:6:upgrade,") == [
        SectorRef(1000, 5),
        SectorRef(1000, 6, upgrade=True),
    ]


def test_a_sector_list_reads_ranges_one_item_a_line_or_comma_separated():
    assert parse_sector_list("1000:7-9:upgrade\r\nt01000:2-2, 1000:4\n\n") == [
        *(SectorRef(1000, n, upgrade=True) for n in (7, 8, 9)),
        SectorRef(1000, 2),
        SectorRef(1000, 4),
    ]


@pytest.mark.parametrize("numbers", ["9-3", "1-\u0663", "1-" + "9" * 30, "0-1000000"])
def test_a_bad_range_is_refused_in_the_words_of_sectors_find(store, numbers):
    # One parser for both commands: the same checks, the same message, the same exit code.
    find = dext("sectors", "find", MINER, numbers, "--attached", f"s={store / 's'}", check=2)
    said = find.stderr.strip().splitlines()[-1].split(": argument NUMBER: ", 1)[1]
    prove = dext(
        "prove", "window_post", "--sectors", f"{MINER}:{numbers}", "--comm-r",
        store / "comm_r.json", "--seed", SEED, "--proof-type", PROOF_TYPE, "-c", store / "c.cfg",
        check=2,
    )  # fmt: skip
    item = f"{MINER}:{numbers}"
    if "is not a sector number" in said:  # the whole item is not MINER:NUMBER(S)
        assert f"--sectors: {item!r} is not MINER:NUMBER or MINER:FIRST-LAST" in prove.stderr
    else:
        assert said.replace(repr(numbers), repr(item)) in prove.stderr, (said, prove.stderr)
    assert "Traceback" not in find.stderr + prove.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"1000:1\n1000:x\n", "'1000:x' is not MINER:NUMBER or MINER:FIRST-LAST"),
        (b"1000:5-2\n", "'1000:5-2': the range ends before it starts"),
        (b"", "no sector given"),
        (b"1000:1\xff\n", "not text (byte 6)"),
    ],
)
def test_a_bad_sectors_file_is_exit_2_naming_the_option_the_file_and_the_item(
    store, tmp_path, content, message
):
    listed = tmp_path / "list"
    listed.write_bytes(content)
    proc = dext(
        "prove", "window_post", "--sectors", f"@{listed}", "--comm-r", store / "comm_r.json",
        "--seed", SEED, "--proof-type", PROOF_TYPE, "-c", store / "c.cfg", check=2,
    )  # fmt: skip
    assert f"--sectors @{listed}: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_plugin_that_prints_as_sectors_are_located_stays_out_of_the_output(store, tmp_path):
    # The sector providers load every plugin, before the proving does.
    import subprocess
    import sys

    from helpers.child import child_env, make_plugin_dist
    from test_cli_output import PRINTING_PLUGIN

    make_plugin_dist(
        tmp_path / "p", dist="printing", module="printing_plugin", source=PRINTING_PLUGIN
    )
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "prove", "window_post", "--sectors", f"{MINER}:1",
         "--comm-r", str(store / "comm_r.json"), "--seed", SEED, "--proof-type", PROOF_TYPE,
         "--attached", f"store-s={store / 's'}", "-c", str(store / "c.cfg"), "--no-progress"],
        capture_output=True, text=True, timeout=60, check=False, env=child_env([tmp_path / "p"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('{"proofs":') and done.stdout.count("\n") == 1, done.stdout
    assert "printed as the plugin is imported" in done.stderr
