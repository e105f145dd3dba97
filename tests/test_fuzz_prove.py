"""Bad task JSON given to `prove`: fuzzed in-process through `read_task` (missing
fields, wrong types, wrong sizes, out-of-range numbers, not JSON at all), a few CLI runs (exit 2
with the file named, never a traceback; replica paths that do not exist are faults, not
crashes), and tasks too large for one message: refused by `prove` (exit 2), by the client
before sending, and by the supervisor without killing the child that would choke on it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pty
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
from damocles_ext_plugins.testing import echo_output
from helpers.frontend import dext_run, make_task, write_config
from helpers.supervisor import builtin_child, our_descendants, spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damocles_ext.client import connect
from damocles_ext.commands.inputs import read_task
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends.control import ControlServer, bind_control_socket
from damocles_ext.protocol import dext, jsonl
from damocles_ext.supervisor import Supervisor, connection
from damocles_ext.tasks import WindowPoSt

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = json.loads(jsonl.task_to_json(make_task(1000, replicas=3)))

ODD_VALUES = [
    None, True, -1, 0, 2**64, 1.5, "", "x", "\u0000", [], [0] * 31, [0] * 33, [256] * 32,
    [-1] * 32, ["a"] * 32, {}, {"a": 1}, "StackedDrgWinning2KiBV1", "StackedDrgWindow2KiBV1_2",
]  # fmt: skip


def paths(doc, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            yield from paths(v, (*prefix, i))


ALL_PATHS = [p for p, _ in paths(VALID) if p]


def mutate(doc, rng: random.Random):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(ALL_PATHS)
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            kind = rng.randrange(3)
            if kind == 0 and isinstance(parent, dict):
                parent.pop(last, None)  # a missing field
            elif kind == 1:
                # a copy: a shared list put in two places (or into itself) would make a cycle
                parent[last] = copy.deepcopy(rng.choice(ODD_VALUES))  # a wrong type, size or range
            elif isinstance(parent, dict):
                parent["unexpected_" + str(last)] = 1  # unknown fields are ignored, as in Go
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the shape: fine, it is random anyway
    return doc


def read(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.json"
        path.write_bytes(data)
        try:
            return read_task(str(path), "window_post")
        except UsageError as exc:
            assert exc.exit_code == 2
            assert str(path) in str(exc) and "Traceback" not in str(exc)
            return exc


@FUZZ
@given(st.integers(0, 2**32))
def test_mutated_task_json_is_a_task_or_a_usage_error_naming_the_file(seed):
    result = read(json.dumps(mutate(VALID, random.Random(seed))).encode())
    if not isinstance(result, UsageError):
        assert isinstance(result, WindowPoSt)
        assert len(result.seed) == 32 and all(len(r.comm_r) == 32 for r in result.replicas)
        assert 0 <= result.miner_id < 2**64


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_task_json_are_a_usage_error(data):
    assert isinstance(read(data), UsageError)


def test_an_unknown_field_is_ignored_and_a_missing_one_is_named():
    doc = dict(VALID, extra={"nested": [1, 2]})
    assert isinstance(read(json.dumps(doc).encode()), WindowPoSt)
    doc = copy.deepcopy(VALID)
    del doc["replicas"][1]["comm_r"]
    error = read(json.dumps(doc).encode())
    assert isinstance(error, UsageError) and "comm_r" in str(error)


# -- CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_prove_with_a_mutated_task_exits_2_or_proves_never_a_traceback(tmp_path, seed):
    task = tmp_path / "task.json"
    task.write_text(json.dumps(mutate(VALID, random.Random(seed))))
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    result = dext_run("prove", "window_post", "--request", str(task), "-c", str(cfg))
    assert result.returncode in (0, 2), result.stderr.decode()
    assert b"Traceback" not in result.stderr
    if result.returncode == 2:
        assert str(task).encode() in result.stderr


def test_replica_paths_that_do_not_exist_are_faults_not_crashes(tmp_path):
    doc = copy.deepcopy(VALID)
    doc["proof_type"] = "StackedDrgWindow2KiBV1_2"
    for r in doc["replicas"]:
        r["cache_dir"] = str(tmp_path / "no" / "such" / "cache")
        r["sealed_file"] = str(tmp_path / "no" / "such" / "sealed")
    task = tmp_path / "task.json"
    task.write_text(json.dumps(doc))
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "python-ref"\n')
    result = dext_run("prove", "window_post", "--request", str(task), "-c", str(cfg))
    assert result.returncode == 0, result.stderr.decode()
    output = jsonl.output_from_json(result.stdout, "window_post")
    assert sorted(output.faults) == [r["sector_id"] for r in doc["replicas"]]
    assert b"3 faulty sectors" in result.stderr


def test_a_task_typed_at_the_terminal_is_read_with_a_word_on_how_to_end_it(monkeypatch, capsys):
    master, slave = pty.openpty()
    os.write(master, jsonl.task_to_json(make_task(1)) + b"\n\x04")  # a line, then Ctrl-D
    try:
        with open(slave, "rb", buffering=0) as raw:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(raw)))
            assert isinstance(read_task("-", "window_post"), WindowPoSt)
    finally:
        os.close(master)
    assert (
        "reading the request file from the terminal: end it with Ctrl-D" in capsys.readouterr().err
    )
    piped = io.TextIOWrapper(io.BytesIO(jsonl.task_to_json(make_task(1))))
    monkeypatch.setattr(sys, "stdin", piped)  # from a pipe or a file: nothing to say
    assert isinstance(read_task("-", "window_post"), WindowPoSt)
    assert capsys.readouterr().err == ""


# -- tasks too large for one message -----------------------------------------------------------


def test_read_task_refuses_a_task_over_the_frame_limit(monkeypatch):
    monkeypatch.setattr(dext, "DEFAULT_MAX_FRAME_SIZE", 2000)
    big = jsonl.task_to_json(make_task(1, replicas=40))
    error = read(big)
    assert isinstance(error, UsageError)
    assert "40 replicas" in str(error) and "split it into smaller tasks" in str(error)
    assert isinstance(read(jsonl.task_to_json(make_task(1, replicas=2))), WindowPoSt)


async def test_the_supervisor_refuses_an_oversized_task_without_killing_the_child(monkeypatch):
    monkeypatch.setattr(connection, "MAX_REQUEST_BYTES", 4000)
    sup = Supervisor([spec(builtin_child("window_post", "echo"))])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        with pytest.raises(ProverError) as info:
            await sup.submit(make_task(1, replicas=100))
        small = make_task(2)
        assert await sup.submit(small) == echo_output(small)
        stats = sup.statistics().children[0]
        sup.request_shutdown()
    assert "100 replicas" in str(info.value) and "over the" in str(info.value)
    assert stats.restarts == 0 and stats.done == 1
    assert our_descendants() == []


async def test_the_client_refuses_an_oversized_task_and_keeps_its_connection(monkeypatch):
    sock_dir = Path(tempfile.mkdtemp(prefix="dext-fuzz-", dir="/tmp"))
    os.chmod(sock_dir, 0o700)

    async def submit(task, *, deadline=None, priority=0, on_progress=None):
        return echo_output(task)

    server = ControlServer(bind_control_socket(sock_dir / "control.sock"), submit)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with connect(sock_dir / "control.sock") as client:
            monkeypatch.setattr(dext, "DEFAULT_MAX_FRAME_SIZE", 3000)
            with pytest.raises(UsageError, match=r"100 replicas.*limit of a dext frame"):
                await client.submit(make_task(1, replicas=100))
            monkeypatch.undo()
            assert await client.submit(make_task(2)) == echo_output(make_task(2))
        server.stop_accepting()
        nursery.cancel_scope.cancel()
    os.rmdir(sock_dir)


@pytest.mark.slow
def test_prove_refuses_a_million_replica_task_in_bounded_time_with_a_clear_message(tmp_path):
    # 10^6 replicas with realistic path lengths: ~200 MB of JSON, ~120 MiB as a dext request.
    rep = (
        '{"sector_id":%d,"comm_r":[' + ",".join(["7"] * 32) + "],"
        '"cache_dir":"/mnt/store/cache/s-t01000-%d","sealed_file":"/mnt/store/sealed/s-t01000-%d"}'
    )
    task = tmp_path / "million.json"
    with task.open("w") as f:
        f.write('{"miner_id":1000,"proof_type":"StackedDrgWindow32GiBV1_2","seed":[')
        f.write(",".join(["1"] * 32) + '],"replicas":[')
        f.write(",".join(rep % (i, i, i) for i in range(10**6)))
        f.write("]}")
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    # Bounded in CPU time, the work it does: its wall time is the machine's load (35 s, with
    # 4 copies on a loaded 2-core machine). The 60 s timeout still bounds a hang.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = dext_run("prove", "window_post", "--request", str(task), "-c", str(cfg), timeout=60)
    took = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    assert result.returncode == 2, result.stderr.decode()[-2000:]
    assert b"1000000 replicas" in result.stderr and b"split it into smaller tasks" in result.stderr
    assert b"Traceback" not in result.stderr
    print(f"refused in {took:.1f} s, {cpu:.1f} s of CPU")
    assert cpu < 15


async def test_a_task_the_wire_cannot_carry_is_refused_without_wedging_the_child():
    # The JSON decoders take any non-negative integer; msgpack stops at 2**64 - 1. Such a task
    # used to raise out of dispatch and leave the child's only slot taken for ever.
    sup = Supervisor([spec(builtin_child("window_post", "echo"))])
    good = make_task(2)
    bad = WindowPoSt(
        miner_id=2**64, proof_type=good.proof_type, replicas=good.replicas, seed=good.seed
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(UsageError, match=r"request 1 cannot be sent: .*serialize ints"):
                await sup.submit(bad)
            assert await sup.submit(good) == echo_output(good)
            sup.request_shutdown()


def test_prove_names_an_id_over_64_bits(tmp_path):
    doc = copy.deepcopy(VALID)
    doc["replicas"][2]["sector_id"] = 2**64
    error = read(json.dumps(doc).encode())
    assert isinstance(error, UsageError) and f"sector_id {2**64}" in str(error)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc.update(replicas=[]), "the task has no replicas"),
        (
            lambda doc: doc["replicas"][2].update(sector_id=doc["replicas"][0]["sector_id"]),
            "appears twice in the task",
        ),
        (lambda doc: doc["replicas"][1].update(cache_dir="/a\u0000b"), "cache_dir holds a NUL"),
    ],
)
def test_prove_refuses_a_task_no_prover_could_prove(change, message):
    # Before, the child was asked, and prove exited 1 with the prover's error.
    doc = copy.deepcopy(VALID)
    change(doc)
    error = read(json.dumps(doc).encode())
    assert isinstance(error, UsageError) and message in str(error)
