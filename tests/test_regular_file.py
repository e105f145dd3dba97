"""regular_file.open_regular, and every reader of a file that must be a regular one using it:
the name is resolved once, with O_PATH (which opens nothing), and only that inode, seen to be a
regular file, is opened; a FIFO or a device put under the name meanwhile is never opened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.lease import run_holding_a_lease
from helpers.post import sectors

from damocles_ext import gpulock, regular_file
from damocles_ext.commands.common import regular_token_file
from damocles_ext.config.startup import missing_interpreter
from damocles_ext.post import SectorFaultError, reference


def _spy_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every os.open of the test, (path, flags), in order."""
    opens: list[tuple[str, int]] = []
    real = os.open

    def spying(path, flags, *args, **kwargs):
        opens.append((os.fspath(path), flags))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spying)
    return opens


def _read_input(path: str) -> None:
    with reference._open_input(path, "sealed file") as f:
        f.read()


def _build_tree(path: str) -> None:
    cache = os.path.join(os.path.dirname(path), "cache")
    reference.build_tree("StackedDrgWindow2KiBV1", path, cache, bytes(32))


READERS: dict[str, tuple[bytes, Callable[[str], object]]] = {
    "serve --token-file": (b"s3cret\n", regular_token_file),
    "a program's #! line": (b"#!/bin/sh\n", missing_interpreter),
    "a GPU lock file": (b"", lambda p: gpulock.lock_state(os.path.dirname(p))),
    "a sealed file": (b"sealed", _read_input),
    "the Python build_tree's sealed file": (bytes(2048), _build_tree),
}


@pytest.mark.parametrize("reader", READERS)
def test_the_name_is_opened_only_with_o_path_so_nothing_put_there_meanwhile_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
):
    # Each looked at the name (stat) and then opened the name (O_NONBLOCK): a FIFO or a device
    # put there in between was opened (a device's driver run), or each copy did it its own way.
    text, read = READERS[reader]
    path = tmp_path / gpulock.GPU_LOCK
    path.write_bytes(text)
    opens = _spy_opens(monkeypatch)
    read(str(path))
    by_name = [flags for opened, flags in opens if opened == str(path)]
    assert by_name and all(flags & os.O_PATH for flags in by_name), opens
    assert any(opened.startswith("/proc/self/fd/") for opened, _ in opens), opens


def test_a_file_a_lease_holds_is_waited_for_as_the_inode_seen_never_by_its_name_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # serve's --token-file, held by a lease: the open that waits for the lease to break was a
    # plain open() of the name, so a FIFO put there meanwhile held serve before its ready line
    # for ever. Now it is the inode seen to be a regular file that is opened again.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    real = os.open
    leased: list[tuple[str, int]] = []

    def lease_held_once(path, flags, *args, **kwargs):
        if not flags & os.O_PATH and flags & os.O_NONBLOCK and not leased:
            leased.append((os.fspath(path), flags))
            os.rename(token, tmp_path / "was-token")
            os.mkfifo(token)  # what the name leads to by the time the lease is waited for
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", lease_held_once)
    assert regular_token_file(str(token)) == "s3cret"
    assert leased, "the lease was never met: the test proves nothing"


def test_a_fifo_a_device_or_a_directory_is_refused_by_what_it_is(tmp_path: Path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/null", tmp_path / "device")
    for name, kind in (
        ("fifo", "a FIFO (named pipe)"),
        ("device", "a character device"),
        (".", "a directory"),
    ):
        with pytest.raises(regular_file.NotRegularFile) as caught:
            regular_file.open_regular(tmp_path / name)
        assert caught.value.kind == kind
        assert str(caught.value) == f"{tmp_path / name} is {kind}, not a regular file"


def test_a_file_that_cannot_be_opened_is_named_in_the_error_not_its_proc_link():
    # The O_PATH look needs no permission, the open again does: its error named
    # '/proc/self/fd/3', so a sealed file's fault reason said nothing of which file it was.
    from helpers.kept_out import said_when_kept_out

    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is in a 0700 directory
        base = Path(tmp)
        base.chmod(0o755)
        closed = base / "sealed"
        closed.write_bytes(b"sealed")
        closed.chmod(0)
        said = said_when_kept_out(lambda: os.close(regular_file.open_regular(closed)))
    assert said == f"PermissionError: [Errno 13] Permission denied: {str(closed)!r}"


def test_the_fd_returned_is_blocking_which_a_fuse_daemon_sees_on_every_read(tmp_path: Path):
    # The open is O_NONBLOCK (a lease is then an error, not a wait); the fd kept it, and a FUSE
    # daemon, which sees it on every read, may answer EAGAIN where a local file never would.
    path = tmp_path / "file"
    path.write_bytes(b"text")
    for flags in (os.O_RDONLY, os.O_RDWR):
        fd = regular_file.open_regular(path, flags)
        try:
            assert os.get_blocking(fd), flags
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (os.O_NOFOLLOW, "O_NOFOLLOW"),  # it refused the /proc/self/fd link: ELOOP, a riddle
        (os.O_RDWR | os.O_CREAT, "O_CREAT"),  # meaningless for a file that must exist
        (os.O_RDWR | os.O_CREAT | os.O_EXCL, "O_CREAT or O_EXCL"),
    ],
)
def test_flags_it_cannot_honour_are_refused_before_anything_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: int, named: str
):
    path = tmp_path / "file"
    path.write_bytes(b"text")
    opens = _spy_opens(monkeypatch)
    with pytest.raises(ValueError, match=f"^open_regular cannot open with {named}$"):
        regular_file.open_regular(path, flags)
    assert opens == []


# Run in a mount namespace of its own where /proc is unmounted: the sectors, the token file, a
# free GPU lock file and a FIFO in argv[1]; what each reader made of them, as JSON.
WITHOUT_PROC = """
import json, os, sys
from damocles_ext import gpulock, regular_file
from damocles_ext.commands.common import regular_token_file
from damocles_ext.post import reference
from damocles_ext.post.fixtures import load_manifest, window_task

base = sys.argv[1]
assert not os.path.exists("/proc/self"), "/proc is still there: the test proves nothing"
try:
    regular_file.open_regular(os.path.join(base, "fifo"))
except regular_file.NotRegularFile as exc:
    fifo = str(exc)
task = window_task(load_manifest(os.path.join(base, "manifest.json")), bytes(32))
print(json.dumps({
    "token": regular_token_file(os.path.join(base, "token")),
    "fifo": fifo,
    "gpu": gpulock.lock_state(base)["gpu"],
    "faults": reference.window_post(task).faults,
}))
"""


def _run_without_proc(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -c code args` in a mount namespace of its own without /proc (unshare -m, then
    umount -l /proc), or the test skipped where this machine does not allow that."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here to run a process without /proc")
    without = [unshare, "-m", "sh", "-c", 'umount -l /proc && exec "$@"', "sh"]
    probe = subprocess.run(
        [*without, "true"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:  # not root (CI is): unshare -m or the umount is not permitted
        pytest.skip(f"cannot unmount /proc in a mount namespace here: {probe.stderr.strip()}")
    return subprocess.run(
        [*without, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_proc_the_files_are_read_and_a_fifo_refused_as_with_it(tmp_path: Path):
    # Without /proc (a chroot, a sandbox), opening the inode again through /proc/self/fd failed
    # with ENOENT: the reference prover made every sector a fault, serve said an existing token
    # file "does not exist", the GPU lock probe called a lock file a dangling symlink.
    sectors(tmp_path, "StackedDrgWindow2KiBV1", 2, random_seed=3)
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / gpulock.GPU_LOCK).write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    done = _run_without_proc(WITHOUT_PROC, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "token": "s3cret",
        "fifo": f"{tmp_path / 'fifo'} is a FIFO (named pipe), not a regular file",
        "gpu": False,
        "faults": [],
    }


def test_without_proc_a_lease_is_waited_for_by_trying_again_never_by_a_blocking_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Without /proc the inode cannot be opened again: a blocking open of the name, to wait for
    # a lease, would wait for ever on a FIFO put there meanwhile.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    monkeypatch.setattr(regular_file, "_PROC_FDS", str(tmp_path / "no-proc"))
    real = os.open
    opens: list[int] = []

    def lease_held_twice(path, flags, *args, **kwargs):
        if os.fspath(path) == str(token) and not flags & os.O_PATH:
            opens.append(flags)
            if len(opens) <= 2:
                raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", lease_held_twice)
    assert regular_token_file(str(token)) == "s3cret"
    assert len(opens) == 3 and all(flags & os.O_NONBLOCK for flags in opens), opens
    opens.clear()
    with pytest.raises(BlockingIOError):  # without wait_for_lease a lease is an error at once
        regular_file.open_regular(token)
    assert len(opens) == 1, opens


def _bytes_read() -> int:
    """What this process has read so far, all files together (the kernel's count, rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_the_python_build_tree_reads_no_more_of_a_sealed_file_than_a_sector_holds(
    tmp_path: Path,
):
    # It read the whole file (/dev/zero: until the memory ran out) before looking at its size.
    sealed = tmp_path / "sealed"
    with open(sealed, "wb") as f:
        f.truncate(64 << 20)  # sparse
    before = _bytes_read()
    with pytest.raises(SectorFaultError, match=f"^sealed file {sealed} is {64 << 20} bytes; "):
        _build_tree(str(sealed))
    assert _bytes_read() - before < 1 << 20


OPEN_CONFIG = """
def open_it(path):
    from damocles_ext.config.load import read_config_text
    return repr(read_config_text(path, "ext-prover.cfg"))
"""


def test_a_config_file_a_lease_holds_is_read_once_the_lease_breaks_not_refused(tmp_path: Path):
    # Samba's kernel oplocks and NFS delegations hold leases: a plain open() of a config file
    # waits for the holder to let go. Read through open_regular without waiting, check-config,
    # run and serve failed at once with "Resource temporarily unavailable".
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text('[[WdPost]]\nPlugin = "echo"\n')
    expected = repr('[[WdPost]]\nPlugin = "echo"\n')
    assert run_holding_a_lease(OPEN_CONFIG, str(cfg)) == f"asked True {expected}"
