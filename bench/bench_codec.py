"""Encode + decode of a 2349-replica WindowPoSt request and its output, dext vs. JSON lines.

Run: .venv/bin/python -m bench.bench_codec [--save]
The request is one 32GiB partition's worth of replicas with realistic paths; the output is one
192-byte proof and 10 faults. Goal: dext request round trip < 2 ms and >= 3x faster than
JSON lines. Also printed: the dext request's frame made alone from the task (`dext.encode` of
a Request: the task encoded, as `tasks.task_check` encodes it to check it, and the frame made),
with the minor page faults each one took (a frame of a few hundred KiB copied once more is a
fresh allocation, paid in page faults whenever the heap has no room for it), first while the
process's heap is small, and again once the round trips have grown it; and the frame made
from the task's bytes, as the supervisor makes it since the check's bytes are kept
(`dext.RawRequest`).
"""

from __future__ import annotations

import os
import random
import resource
from collections.abc import Callable

import msgspec

from bench.runner import bench_parser, finish, print_table, time_call
from damocles_ext.protocol import dext, jsonl
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WindowPoStOutput, task_check

REPLICAS = 2349


def make_request() -> WindowPoSt:
    rng = random.Random(1)
    replicas = []
    for i in range(REPLICAS):
        sector = 100_000 + i
        store = f"/mnt/store-{i % 24:02d}"
        replicas.append(
            PoStReplicaInfo(
                sector_id=sector,
                comm_r=rng.randbytes(32),
                cache_dir=f"{store}/cache/s-t01234-{sector}",
                sealed_file=f"{store}/sealed/s-t01234-{sector}",
            )
        )
    seed = bytearray(rng.randbytes(32))
    seed[31] &= 0x3F
    return WindowPoSt(
        miner_id=1234, proof_type="StackedDrgWindow32GiBV1_2", replicas=replicas, seed=bytes(seed)
    )


def main(argv: list[str] | None = None) -> None:
    args = bench_parser(__doc__, "codec").parse_args(argv)
    task = make_request()
    output = WindowPoStOutput(proofs=[os.urandom(192)], faults=list(range(100_010, 100_020)))

    def dext_request():
        frame = dext.encode(dext.Request(id=1, task=task))
        [msg] = dext.FrameDecoder().receive_data(frame)
        return msg

    def jsonl_request():
        line = jsonl.encode_request(1, task)
        return jsonl.decode_request(line, "window_post")

    def dext_output():
        frame = dext.encode(dext.Response(id=1, output=output))
        [msg] = dext.FrameDecoder().receive_data(frame)
        return msg

    def jsonl_output():
        line = jsonl.encode_response(1, output)
        return jsonl.decode_response(line, "window_post")

    def frame_only(message: Callable[[], msgspec.Struct]) -> dict:
        calls = [0]

        def frame() -> None:
            calls[0] += 1
            dext.encode(message())

        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        timed = time_call(frame)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        return timed | {"minor_faults_per_call": faults / calls[0]}

    # The frame alone first, before anything else grew this process's heap (as a supervisor's
    # may be small between large requests), and again once the round trips have grown it.
    def request() -> dext.Request:
        return dext.Request(id=1, task=task)

    frames = {"first": frame_only(request)}

    # Both must actually round-trip before they are timed.
    assert dext_request().task == task and jsonl_request().task == task
    assert dext_output().output == output and jsonl_output().output == output

    sizes = {
        "dext_request_bytes": len(dext.encode(dext.Request(id=1, task=task))),
        "jsonl_request_bytes": len(jsonl.encode_request(1, task)),
    }

    timings = {
        "request": {"dext": time_call(dext_request), "jsonl": time_call(jsonl_request)},
        "output": {"dext": time_call(dext_output), "jsonl": time_call(jsonl_output)},
    }
    frames["after_round_trips"] = frame_only(request)
    checked = msgspec.Raw(task_check(task))
    frames["from_the_checks_bytes"] = frame_only(lambda: dext.RawRequest(1, checked))
    rows = []
    for what, t in timings.items():
        d, j = t["dext"]["median_s"], t["jsonl"]["median_s"]
        rows.append([what, f"{d * 1e3:.3f}", f"{j * 1e3:.3f}", f"{j / d:.1f}x"])
    print(f"WindowPoSt request with {REPLICAS} replicas; output: one 192-byte proof, 10 faults")
    print_table(rows, ["round trip", "dext ms", "JSON lines ms", "dext speed-up"])
    print(
        f"request size: dext {sizes['dext_request_bytes']:,} B, "
        f"JSON lines {sizes['jsonl_request_bytes']:,} B"
    )
    for when, f in frames.items():
        print(
            f"dext request frame made alone, {when.replace('_', ' ')}: {f['median_s'] * 1e6:.0f}"
            f" us, {f['minor_faults_per_call']:.1f} minor page faults each"
        )
    req = timings["request"]
    speedup = req["jsonl"]["median_s"] / req["dext"]["median_s"]
    goals = {
        "dext_request_under_2ms": req["dext"]["median_s"] < 2e-3,
        "dext_at_least_3x_jsonl": speedup >= 3,
    }
    print("goals:", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in goals.items()))
    finish(
        "codec",
        {
            "replicas": REPLICAS,
            **sizes,
            "timings": timings,
            "dext_request_frame": frames,
            "request_speedup": speedup,
            "goals": goals,
        },
        args.save,
    )


if __name__ == "__main__":
    main()
