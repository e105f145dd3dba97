"""bellperson's lock files: we see a bellperson-style holder, and we block it as it blocks us."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from damocles_ext import gpulock

# A stand-in for a bellperson process: flock the GPU lock in TMPDIR exclusively (or shared, as a
# non-priority proof checks the priority lock), say so, then hold it until stdin closes.
HOLDER = r"""
import fcntl, os, sys
d = sys.argv[1]
fd = os.open(os.path.join(d, sys.argv[2]), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[3:] == ["shared"] else fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(name=gpulock.GPU_LOCK, *mode):
        p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path), name, *mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline() == "held\n"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(timeout=10)


def test_missing_lock_files_are_reported_as_absent(tmp_path):
    assert gpulock.lock_state(tmp_path) == {"gpu": None, "priority": None}
    assert not (tmp_path / gpulock.GPU_LOCK).exists()


def test_a_lock_held_by_another_process_is_reported(tmp_path, holder):
    p = holder()
    assert gpulock.lock_state(tmp_path)["gpu"] is True
    p.stdin.close()
    p.wait(timeout=10)
    assert gpulock.lock_state(tmp_path)["gpu"] is False


def test_the_probe_shares_the_priority_lock_with_a_non_priority_proof_checking_it(tmp_path, holder):
    # A non-priority bellperson proof (a sealing C2) checks the priority lock with a shared
    # try-lock and gives the GPU up when it fails: the status probe must take it shared too, or
    # its instant of holding it looks like a priority proof to that prover. And the shared
    # checker is no priority proof: it is not reported as one.
    checker = holder(gpulock.PRIORITY_LOCK, "shared")
    assert gpulock.lock_state(tmp_path)["priority"] is False
    checker.stdin.close()
    checker.wait(timeout=10)
    holder(gpulock.PRIORITY_LOCK)  # a priority proof
    assert gpulock.lock_state(tmp_path)["priority"] is True


def test_our_lock_is_seen_by_others(tmp_path):
    with gpulock.priority_gpu_lock(tmp_path):
        assert gpulock.lock_state(tmp_path) == {"gpu": True, "priority": True}
    assert gpulock.lock_state(tmp_path) == {"gpu": False, "priority": False}


def test_we_wait_for_a_bellperson_holder_and_can_give_up_when_cancelled(tmp_path, holder):
    holder()
    cancel = threading.Event()
    result = {}

    def waiter():
        try:
            with gpulock.priority_gpu_lock(tmp_path, cancelled=cancel.is_set):
                result["got"] = True
        except gpulock.LockCancelled as exc:
            result["cancelled"] = str(exc)

    t = threading.Thread(target=waiter)
    t.start()
    cancel.set()
    t.join(timeout=10)
    assert "got" not in result
    assert gpulock.GPU_LOCK in result["cancelled"]
    # the priority lock taken before the GPU lock was released again
    assert gpulock.lock_state(tmp_path)["priority"] is False


def test_lock_dir_follows_tmpdir():
    assert str(gpulock.lock_dir({"TMPDIR": "/tmp/ext-prover3/"})) == "/tmp/ext-prover3"
    assert str(gpulock.lock_dir({})) == "/tmp"


# -- whatever else is found under the lock names (the lock directory may be /tmp) ---------------

PROBE = (
    "import json, sys; from damocles_ext import gpulock;"
    " print(json.dumps(gpulock.lock_state(sys.argv[1])))"
)


def lock_state_bounded(directory):
    """lock_state in a process of its own, killed (failing the test) if it blocks."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(directory)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_fifo_under_the_gpu_lock_name_is_reported_without_blocking(tmp_path):
    os.mkfifo(tmp_path / gpulock.GPU_LOCK)
    state = lock_state_bounded(tmp_path)
    assert state["priority"] is None
    assert state["gpu"] == (
        f"bellman.gpu.lock is not probed: {tmp_path / gpulock.GPU_LOCK} is a FIFO (named pipe), not a regular"
        " file; remove it (bellperson's lock files are regular files)"
    )


def test_a_symlink_to_a_fifo_or_a_device_is_not_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / gpulock.GPU_LOCK)
    os.symlink("/dev/null", tmp_path / gpulock.PRIORITY_LOCK)
    state = lock_state_bounded(tmp_path)
    assert "is a FIFO (named pipe), not a regular file" in state["gpu"]
    assert "is a character device, not a regular file" in state["priority"]


def test_a_symlink_to_a_regular_lock_file_is_followed_as_bellperson_follows_it(tmp_path, holder):
    holder()
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / gpulock.GPU_LOCK, tmp_path / "link" / gpulock.GPU_LOCK)
    assert gpulock.lock_state(tmp_path / "link") == {"gpu": True, "priority": None}


def test_taking_the_lock_refuses_a_fifo_and_lets_go_of_the_priority_lock(tmp_path):
    os.mkfifo(tmp_path / gpulock.GPU_LOCK)
    with pytest.raises(gpulock.LockFileError) as caught, gpulock.priority_gpu_lock(tmp_path):
        pass
    assert str(caught.value) == (
        f"{tmp_path / gpulock.GPU_LOCK} is a FIFO (named pipe), not a regular file; remove it (bellperson's"
        " lock files are regular files)"
    )
    assert gpulock.lock_state(tmp_path)["priority"] is False


def test_taking_the_lock_does_not_create_a_file_through_a_dangling_symlink(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / gpulock.PRIORITY_LOCK)
    with (
        pytest.raises(gpulock.LockFileError, match="is a symlink to a file that does not exist"),
        gpulock.priority_gpu_lock(tmp_path),
    ):
        pass
    assert not (tmp_path / "elsewhere").exists()
