"""The native reference prover takes bellperson's lock files in its TMPDIR around a proof."""

from __future__ import annotations

import subprocess
import sys

from helpers.child import Child

from damocles_ext import gpulock
from damocles_ext.post.fixtures import create_sectors, load_manifest, window_task
from damocles_ext.post.verify import verify_window_post
from damocles_ext.protocol import dext

HOLDER = r"""
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], "bellman.gpu.lock"), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_native_prover_waits_for_a_bellperson_gpu_lock_holder(tmp_path, monkeypatch):
    lockdir = tmp_path / "tmpdir"
    lockdir.mkdir()
    manifest = load_manifest(
        create_sectors(tmp_path / "sectors", "StackedDrgWindow2KiBV1_2", 2, 1000, random_seed=1)
    )
    task = window_task(manifest, bytes([5]) * 31 + b"\x01")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lockdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    monkeypatch.setenv("TMPDIR", str(lockdir))
    with Child("window_post", "native") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(id=1, task=task))
        # The prover announces it is waiting for the GPU lock and does not get past it ...
        waiting, _ = child.next_of(dext.Progress)
        assert (waiting.phase, waiting.done) == ("gpu-lock", 0)
        assert gpulock.lock_state(lockdir)["gpu"] is True
        # ... until the bellperson-style holder lets go.
        holder.stdin.close()
        assert holder.wait(timeout=10) == 0
        response, _ = child.next_of(dext.Response)
        assert response.error is None
        verify_window_post(task, response.output)
    assert gpulock.lock_state(lockdir) == {"gpu": False, "priority": False}


def test_native_prover_gpu_lock_can_be_turned_off(tmp_path, monkeypatch):
    lockdir = tmp_path / "tmpdir"
    lockdir.mkdir()
    manifest = load_manifest(
        create_sectors(tmp_path / "sectors", "StackedDrgWindow2KiBV1_2", 2, 1000, random_seed=2)
    )
    task = window_task(manifest, bytes([6]) * 32)
    monkeypatch.setenv("TMPDIR", str(lockdir))
    with Child("window_post", "native", "gpu_lock=false") as child:
        child.next_of(dext.Hello)
        child.send_msg(dext.Request(id=1, task=task))
        response, _ = child.next_of(dext.Response)
        assert response.error is None
    assert not (lockdir / gpulock.GPU_LOCK).exists()
