"""Security, extending tests/test_run_prove.py's socket tests (0600 in a created 0700
directory, symlinked directory or socket refused, a directory owned by uid 65534 refused, peers
of another uid turned away, Args with shell metacharacters through `prove`):

* the modes hold under a umask of 0; a socket *file* of another user is not replaced; `run`
  refuses a foreign-owned directory before spawning anything (exit 2);
* shell metacharacters reach a child literally in Bin, Args, Envs and plugin options (through
  config parsing and the real spawn), and task paths like `$(touch /tmp/x)` reach the prover as
  text through `serve` and `prove`;
* `run --metrics PORT` listens on loopback only, and `run` without --metrics listens on no TCP
  port at all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import trio
from helpers.frontend import (
    DEXT,
    ManagerLike,
    dext_run,
    make_task,
    plugin_block,
    start_run,
    write_config,
)
from helpers.supervisor import our_descendants

from damocles_ext.client import NoSupervisorError, ReconnectingClient, connect, submit_sync
from damocles_ext.config import parse_config
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends.control import bind_control_socket, resolve_trusted
from damocles_ext.protocol import jsonl
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.restart import BackoffPolicy
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

NASTY = [
    "$(touch {canary})",
    "`touch {canary}`",
    "; touch {canary}",
    "| touch {canary}",
    "&& touch {canary} &&",
    "> {canary}",
    "a b\tc\nd",
    "*",
    "~",
    "$HOME",
    "'\"\\",
    "--option=x",
    "",
]


# -- the control socket -------------------------------------------------------------------------


def test_socket_and_directory_modes_hold_under_a_permissive_umask(sock_dir):
    path = sock_dir / "fresh" / "control.sock"
    old = os.umask(0)
    try:
        sock = bind_control_socket(path)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert os.stat(path.parent).st_uid == os.geteuid()
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_socket_file_owned_by_another_user_is_not_replaced(sock_dir):
    path = sock_dir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # nobody listens: would be replaced if it were ours
    os.chown(path, 65534, 65534)
    with pytest.raises(UsageError) as raised:
        bind_control_socket(path)
    assert str(raised.value) == (  # and what to do
        f"control socket {path} is owned by uid 65534, not by us (uid {os.geteuid()}); refusing"
        " to replace it: remove it or choose another path with --socket"
    )
    assert path.exists() and os.stat(path).st_uid == 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_run_refuses_a_directory_owned_by_another_user_before_spawning(tmp_path, sock_dir):
    marker = tmp_path / "spawned"
    args = ["-c", f"open({str(marker)!r}, 'w')"]
    cfg = write_config(
        tmp_path, f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(args)}\n"
    )
    theirs = sock_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    result = dext_run("run", "-c", str(cfg), "--socket", str(theirs / "control.sock"))
    assert result.returncode == 2
    assert b"owned by uid 65534" in result.stderr and b"Traceback" not in result.stderr
    assert not marker.exists()  # nothing was started
    assert not (theirs / "control.sock").exists()


def test_run_given_a_directory_as_its_socket_says_so_and_advises_no_chmod_of_its_parent(
    tmp_path, sock_dir
):
    # As --socket /run/damocles-ext (the default's directory): the checks of its parent, /run
    # (0755), advised `chmod 700 /run`.
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    parent = sock_dir / "run"
    parent.mkdir()
    parent.chmod(0o755)
    given = parent / "damocles-ext"
    given.mkdir(mode=0o700)
    for command in (["run", "-c", str(cfg)], ["worker", "-c", str(cfg), "--manager", "h:1"]):
        result = dext_run(*command, "--socket", str(given))
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert (
            f"control socket path {given} is a directory; --socket takes the socket's own path,"
            f" e.g. --socket {given}/control.sock"
        ) in err, err
        assert "chmod" not in err and "remove it" not in err and "Traceback" not in err, err
    assert stat.S_IMODE(parent.stat().st_mode) == 0o755 and given.is_dir()


# -- no shell, anywhere -------------------------------------------------------------------------

ARGV_CHILD = r"""
import json, os, sys
# Records what it was started with, then says it is ready and reads until EOF.
with open(os.environ["RECORD"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": os.environ.get("NASTY")}, f)
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


async def test_bin_args_and_envs_with_shell_metacharacters_reach_the_child_literally(tmp_path):
    canary = tmp_path / "canary"
    # A shell would run this in the child's working directory (ours): look for it there too.
    loose = f"dext-canary-{uuid.uuid4().hex[:8]}"
    weird_dir = tmp_path / f"dir with $(touch {loose}) and ;|&"
    weird_dir.mkdir()
    program = weird_dir / "child prog;.py"
    program.write_text(f"#!{sys.executable}\n" + ARGV_CHILD)
    program.chmod(0o755)
    args = [a.format(canary=canary) for a in NASTY]
    record = tmp_path / "record.json"
    envs = {"RECORD": str(record), "NASTY": f"$(touch {canary}); `id`"}
    text = (
        "[[WdPost]]\n"
        f"Bin = {json.dumps(str(program))}\n"
        f"Args = {json.dumps(args)}\n"
        "Envs = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in envs.items()) + " }\n"
    )
    config = parse_config(text, str(tmp_path / "ext-prover.cfg"))
    assert config.children[0].argv == (str(program), *args)
    sup = Supervisor(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.wait_ready()
        sup.request_shutdown()
    seen = json.loads(record.read_text())
    assert seen == {"argv": args, "env": envs["NASTY"]}
    assert not canary.exists() and not Path(loose).exists()
    assert our_descendants() == []


async def _start_refused(config) -> pytest.ExceptionInfo[ProverError]:
    """The error a supervisor of `config`'s one child, failing its start once, gives its wait."""
    sup = Supervisor(config, backoff=BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ProverError) as info:
            await sup.wait_ready()
        sup.request_shutdown()
    return info


async def test_plugin_option_values_with_shell_metacharacters_reach_the_prover_literally(
    tmp_path,
):
    loose = f"dext-canary-{uuid.uuid4().hex[:8]}"
    value = f"$(touch {loose}); `touch {loose}` | x"
    text = f'[[WdPost]]\nPlugin = "sleep"\nPluginOptions = {{ fail = {json.dumps(value)} }}\n'
    info = await _start_refused(parse_config(text, str(tmp_path / "ext-prover.cfg")))
    # The child got the value whole as one argument, and its option check quotes it back.
    assert f"option 'fail' = {value!r} is not one of" in str(info.value)
    assert not Path(loose).exists() and not (tmp_path / loose).exists()


async def test_plugin_options_are_not_on_the_childs_command_line_where_any_user_reads_them(
    tmp_path,
):
    # /proc/<pid>/cmdline (`ps`) is every local user's to read, /proc/<pid>/environ only the
    # process owner's and root's: an option may be a secret, so it travels in the environment.
    secret = f"secret-{uuid.uuid4().hex}"
    text = (
        '[[WdPost]]\nPlugin = "sleep"\n'
        f'PluginOptions = {{ seconds = 0, fail = "always", tag = "{secret}" }}\n'
    )
    info = await _start_refused(parse_config(text, str(tmp_path / "ext-prover.cfg")))
    # The options reached the prover (its check names the unknown one, which it could only
    # learn from them), and none of them was on the command line.
    assert "sleep: unknown option 'tag'" in str(info.value), info.value
    assert secret not in str(info.value)
    text = text.replace(f', tag = "{secret}"', "")
    config = parse_config(text, str(tmp_path / "ext-prover.cfg"))
    async with trio.open_nursery() as nursery:
        sup = Supervisor(config)
        await nursery.start(sup.run)
        await sup.wait_ready()
        (child,) = sup.statistics().children
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
        assert b"--option" not in cmdline and b"always" not in cmdline, cmdline
        with pytest.raises(ProverError, match="sleep"):  # fail = "always" reached the prover
            await sup.submit(_nasty_task(tmp_path, tmp_path / "unused"))
        sup.request_shutdown()


def _nasty_task(tmp_path: Path, canary: Path) -> WindowPoSt:
    return WindowPoSt(
        miner_id=1000,
        proof_type="StackedDrgWindow2KiBV1_2",
        replicas=[
            PoStReplicaInfo(
                1, bytes(32), f"/nonexistent/$(touch {canary})", f"/x/`touch {canary}`;rm -rf /"
            ),
            PoStReplicaInfo(2, bytes(32), str(tmp_path / "a b|c"), f"{tmp_path}/$HOME/*"),
        ],
        seed=bytes(32),
    )


def test_task_paths_with_shell_metacharacters_are_only_paths_to_prove(tmp_path):
    canary = tmp_path / "canary"
    task = tmp_path / "task $(touch x).json"
    task.write_bytes(jsonl.task_to_json(_nasty_task(tmp_path, canary)))
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "python-ref"\n')
    result = dext_run("prove", "window_post", "--request", str(task), "-c", str(cfg))
    assert result.returncode == 0, result.stderr.decode()
    # The files do not exist under those literal names: both sectors are faults.
    assert jsonl.output_from_json(result.stdout, "window_post").faults == [1, 2]
    assert not canary.exists() and not (tmp_path / "x").exists()


TASK_RECORDER = r"""
import json, os, sys
# A JSON-lines processor that answers with the task paths it received as its proofs.
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    paths = [[r["cache_dir"], r["sealed_file"]] for r in req["task"]["replicas"]]
    import base64
    proof = base64.b64encode(json.dumps(paths).encode()).decode()
    out = {"proofs": [proof], "faults": []}
    sys.stdout.write(json.dumps({"id": req["id"], "err_msg": None, "output": out}) + "\n")
    sys.stdout.flush()
"""


async def test_task_paths_with_shell_metacharacters_pass_through_serve_literally(tmp_path):
    canary = tmp_path / "canary"
    script = tmp_path / "recorder.py"
    script.write_text(TASK_RECORDER)
    cfg = write_config(
        tmp_path,
        f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = [{json.dumps(str(script))}]\n",
    )
    task = _nasty_task(tmp_path, canary)
    async with trio.open_nursery() as nursery:
        m = await ManagerLike.start(
            nursery, [*DEXT, "serve", "window_post", "-c", str(cfg)], "window_post", stderr=None
        )
        response = await m.request(task)
        await m.close_stdin()
        assert await m.process.wait() == 0
    assert response.err_msg is None
    seen = json.loads(response.output.proofs[0])
    assert seen == [[r.cache_dir, r.sealed_file] for r in task.replicas]
    assert not canary.exists()


# -- the metrics endpoint -----------------------------------------------------------------------


def _listening(pid: int) -> list[tuple[str, int]]:
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


@pytest.mark.parametrize("metrics", [None, "0", ":0"])
async def test_run_listens_on_loopback_only_and_on_no_port_without_metrics(
    tmp_path, sock_dir, metrics
):
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    extra = ["--metrics", metrics] if metrics is not None else []
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock_dir / "control.sock", *extra)
        try:
            if metrics is not None:
                line = await log.wait_for("metrics on http://")
                assert "metrics on http://127.0.0.1:" in line
            listening = _listening(run.pid)
        finally:
            run.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await run.wait() == 0, log.text()[-2000:]
        nursery.cancel_scope.cancel()
    if metrics is None:
        assert listening == []
    else:
        assert len(listening) == 1 and listening[0][0] == "127.0.0.1"


# -- clients trust only our own server ----------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another uid needs root")
OTHER_UID = 65534

IMPOSTOR = r"""
import json, os, socket, sys
# Another user's server at the path a client would use. It records how many bytes each
# connection sent before it hung up (then closes it, so a client waiting for an answer fails
# instead of hanging), until a connection sends b"end": then it prints the counts and exits.
path, uid, bind_as_them = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def become_them():
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if bind_as_them:
    become_them()
    sock.bind(path)
else:  # in a directory of ours: made there as root, then theirs
    sock.bind(path)
    os.chown(path, uid, uid)
    become_them()
sock.listen(16)  # SO_PEERCRED gives clients the credentials of this call
print("listening", flush=True)
counts = []
while True:
    conn, _ = sock.accept()
    with conn:
        data = conn.recv(1 << 16)
    if data == b"end":
        break
    counts.append(len(data))
print(json.dumps(counts), flush=True)
"""


class Impostor:
    """IMPOSTOR running as OTHER_UID, listening at `path`; `received()` stops it and returns the
    bytes of each connection made to it before."""

    def __init__(self, path: Path, *, bind_as_them: bool) -> None:
        self.path = path
        argv = [sys.executable, "-u", "-c", IMPOSTOR, str(path), str(OTHER_UID)]
        self.process = subprocess.Popen(
            [*argv, "1" if bind_as_them else "0"], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline() == "listening\n"

    def received(self) -> list[int]:
        # Connections are accepted in order, so ours comes after any the client made.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(self.path))
            probe.sendall(b"end")
        out, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0
        return json.loads(out)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _impostor_at(sock_dir: Path, place: str) -> tuple[Path, Impostor]:
    """Another user's server at a socket path of `place`:

    * "peer": in a private directory of ours (as if our own `run` had bound it there), listening
      as another uid: only SO_PEERCRED tells it apart;
    * "open-dir": in a directory others may write to (mode 0777);
    * "their-dir": in a directory of theirs (0700, owned by them);
    * "sticky": right in a sticky directory others may write to (like /tmp).
    """
    if place == "peer":
        return sock_dir / "control.sock", Impostor(sock_dir / "control.sock", bind_as_them=False)
    os.chmod(sock_dir, 0o711)  # they may pass through to their place, not list ours
    d = sock_dir / place
    d.mkdir()
    if place == "their-dir":
        os.chmod(d, 0o700)
        os.chown(d, OTHER_UID, OTHER_UID)
    else:
        os.chmod(d, 0o1777 if place == "sticky" else 0o777)
    return d / "control.sock", Impostor(d / "control.sock", bind_as_them=True)


REFUSED = {
    "peer": r"refusing the server at {path}: the process listening there \(pid \d+\) runs as uid"
    rf" {OTHER_UID}, not as root, so it may be another user's impostor; nothing was sent to it",
    "open-dir": r"refusing to connect to {path}: directory {dir} \(mode 0777\) may be written by"
    r" other users and has no sticky bit",
    "their-dir": rf"refusing to connect to {{path}}: directory {{dir}} is owned by uid {OTHER_UID},"
    r" not by us or root",
    "sticky": rf"refusing to connect to {{path}}: {{path}} is owned by uid {OTHER_UID}, not by us"
    r" or root, in {dir}, which other users may write to",
}


def _refused(place: str, path: Path) -> str:
    return REFUSED[place].format(path=re.escape(str(path)), dir=re.escape(str(path.parent)))


@needs_root
@pytest.mark.parametrize("place", ["peer", "open-dir", "their-dir", "sticky"])
def test_the_client_refuses_another_users_server_and_sends_it_nothing(sock_dir, place):
    path, impostor = _impostor_at(sock_dir, place)
    try:
        with pytest.raises(NoSupervisorError, match=_refused(place, path)) as info:
            submit_sync(make_task(1000), socket_path=path)
        assert "the path of your own `damocles-ext run`" in str(info.value)
        received = impostor.received()
    finally:
        impostor.kill()
    # Refused on its credentials after connecting, or on its place before connecting.
    assert received == ([0] if place == "peer" else [])


async def test_the_client_refuses_a_socket_whose_directory_is_not_private(sock_dir):
    # Only our own uid and root could have made it (0755), and root listens; but `run` never
    # leaves its socket where others may reach it, so this is not one of ours.
    d = sock_dir / "shared"
    d.mkdir()
    os.chmod(d, 0o755)
    path = d / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(4)
        with pytest.raises(NoSupervisorError, match=re.escape(  # noqa: PT012 - connect, then submit: either refuses
            f"refusing to connect to {path}: the socket's directory {d} has mode 0755, not"
            " private (0700) as `damocles-ext run` makes it; it may be another user's socket:"
            " nothing was sent to it"
        )):  # fmt: skip
            with trio.fail_after(20):  # a client that sent its request would wait for ever
                async with connect(path) as client:
                    await client.submit(make_task(1000))
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # the client did not even connect


@needs_root
@pytest.mark.parametrize("place", ["peer", "open-dir"])
def test_prove_socket_refuses_another_users_server_with_exit_2(sock_dir, tmp_path, place):
    request = tmp_path / "task.json"
    request.write_bytes(jsonl.task_to_json(make_task(1000)))
    path, impostor = _impostor_at(sock_dir, place)
    try:
        result = dext_run("prove", "window_post", "--request", str(request), "--socket", str(path))
        received = impostor.received()
    finally:
        impostor.kill()
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert re.search(_refused(place, path), err), err
    assert "Traceback" not in err and result.stdout == b""
    assert received == ([0] if place == "peer" else [])


@needs_root
@pytest.mark.parametrize("place", ["peer", "open-dir"])
def test_serve_connect_refuses_another_users_server_before_the_ready_line(sock_dir, place):
    path, impostor = _impostor_at(sock_dir, place)
    try:
        result = dext_run("serve", "window_post", "--connect", str(path), input=b"")
        received = impostor.received()
    finally:
        impostor.kill()
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert re.search(_refused(place, path), err), err
    assert "Traceback" not in err and result.stdout == b""  # no ready line for the manager
    assert received == ([0] if place == "peer" else [])


@needs_root
async def test_a_reconnecting_client_refuses_an_impostor_that_took_the_path(sock_dir, tmp_path):
    # The supervisor stops; another user's server appears at its socket path (a directory of
    # ours: as if they had been able to write there): the next request must not go to it.
    path = sock_dir / "control.sock"
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    remote = ReconnectingClient(path)
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path)
        await remote.connect()
        nursery.start_soon(remote.run)
        await remote.submit(make_task(1000))
        run.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await run.wait() == 0, log.text()[-2000:]
        impostor = Impostor(path, bind_as_them=False)
        try:
            with pytest.raises(ProverError, match="cannot reach the supervisor: refusing the"):
                await remote.submit(make_task(1001))
            received = impostor.received()
        finally:
            impostor.kill()
        await remote.aclose()
        nursery.cancel_scope.cancel()
    assert received == [0]


# -- the server checks every directory on its socket path ---------------------------------------


@needs_root
@pytest.mark.parametrize("what", ["open", "theirs", "their-link"])
def test_run_refuses_a_socket_path_under_a_directory_another_user_could_replace(sock_dir, what):
    # Our own private directory for the socket, but under one whose contents another user could
    # swap (writable by all without the sticky bit, theirs, or their symlink in a sticky dir).
    if what == "open":
        above = sock_dir / "open"
        above.mkdir()
        os.chmod(above, 0o777)
        problem = rf"directory {re.escape(str(above))} \(mode 0777\) may be written by other users"
    elif what == "theirs":
        above = sock_dir / "theirs"
        above.mkdir(mode=0o755)
        os.chown(above, OTHER_UID, OTHER_UID)
        problem = rf"directory {re.escape(str(above))} is owned by uid {OTHER_UID}, not by us"
    else:
        sticky = sock_dir / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        (sock_dir / "real").mkdir(mode=0o755)
        above = sticky / "link"
        above.symlink_to(sock_dir / "real")
        os.lchown(above, OTHER_UID, OTHER_UID)
        problem = rf"{re.escape(str(above))} is owned by uid {OTHER_UID}, not by us or root, in"
    mine = above / "mine"
    mine.mkdir(mode=0o700)
    path = mine / "control.sock"
    with pytest.raises(UsageError, match=rf"control socket path {re.escape(str(path))}: {problem}"):
        bind_control_socket(path)
    assert not path.exists()


@needs_root
def test_run_refuses_a_socket_path_another_user_could_replace_before_spawning(tmp_path, sock_dir):
    marker = tmp_path / "spawned"
    args = ["-c", f"open({str(marker)!r}, 'w')"]
    cfg = write_config(
        tmp_path, f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(args)}\n"
    )
    above = sock_dir / "open"
    above.mkdir()
    os.chmod(above, 0o777)
    path = above / "mine" / "control.sock"
    result = dext_run("run", "-c", str(cfg), "--socket", str(path))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert f"control socket path {path}: directory {above} (mode 0777) may be written" in err, err
    assert "Choose a path whose directories only you or root can write" in err
    assert "Traceback" not in err and not marker.exists()
    assert not (above / "mine").exists()  # nothing made under it either


async def test_a_socket_path_through_a_sticky_directory_and_our_own_symlink_is_accepted(
    sock_dir, tmp_path
):
    # /tmp-like: others may write there, but cannot replace our directory in it; an operator's
    # own symlink on the way is fine too. Both `run` and the client take this path.
    sticky = sock_dir / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sock_dir / "link").symlink_to(sticky)
    path = sock_dir / "link" / "mine" / "control.sock"
    assert resolve_trusted(path.parent.parent) == sticky
    cfg = write_config(tmp_path, plugin_block("WdPost", "echo"))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, path)
        try:
            async with connect(path) as client:
                output = await client.submit(make_task(1000))
        finally:
            run.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await run.wait() == 0, log.text()[-2000:]
        nursery.cancel_scope.cancel()
    assert output.proofs
    assert stat.S_IMODE(os.stat(sticky / "mine").st_mode) == 0o700


def test_resolve_trusted_follows_dotdot_and_symlinks_as_the_kernel_does_and_stops_a_loop(
    sock_dir,
):
    (sock_dir / "a" / "b").mkdir(parents=True, mode=0o700)
    (sock_dir / "up").symlink_to("a/b")  # relative: from the directory the link is in
    assert resolve_trusted(sock_dir / "up" / ".." / "b" / ".") == sock_dir / "a" / "b"
    assert resolve_trusted(sock_dir / "up" / ".." / "..") == sock_dir
    (sock_dir / "loop1").symlink_to(sock_dir / "loop2")
    (sock_dir / "loop2").symlink_to("loop1")
    with pytest.raises(UsageError, match="more than 40 symlinks"):
        resolve_trusted(sock_dir / "loop1" / "control.sock")
    with pytest.raises(FileNotFoundError):
        resolve_trusted(sock_dir / "missing" / "control.sock")


# -- another user cannot block the GPUs -----------------------------------------------------------

OLD_TMP_ROOT = Path("/tmp/damocles-ext")  # the fixed default of earlier versions

TMPDIR_REPORTER = r"""
import os, sys
# Writes the TMPDIR it was given, says it is ready and waits for stdin EOF.
with open(sys.argv[1], "w") as f:
    f.write(os.environ["TMPDIR"])
sys.stdout.write("window_post processor ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


@needs_root
async def test_another_users_directory_at_the_old_tmp_root_does_not_block_gpus_children(
    tmp_path, monkeypatch
):
    # Anyone may create /tmp/damocles-ext first; under the default tmp root, Gpus children must
    # still start, each with a private TMPDIR of ours.
    # One of ours left there by an older version is moved aside for the test and put back.
    saved = None
    ours = (0, os.geteuid())
    if (
        OLD_TMP_ROOT.is_dir()
        and not OLD_TMP_ROOT.is_symlink()
        and OLD_TMP_ROOT.lstat().st_uid in ours
    ):
        saved = OLD_TMP_ROOT.with_name(f"{OLD_TMP_ROOT.name}.saved-{os.getpid()}")
        OLD_TMP_ROOT.rename(saved)
    try:
        OLD_TMP_ROOT.mkdir(mode=0o777)
    except FileExistsError:
        made = False
    else:
        os.chown(OLD_TMP_ROOT, OTHER_UID, OTHER_UID)
        made = True
    monkeypatch.delenv("DAMOCLES_EXT_TMP_ROOT", raising=False)
    record = tmp_path / "tmpdir"
    args = ["-c", TMPDIR_REPORTER, str(record)]
    gpu = 90 + os.getpid() % 10  # a TMPDIR name no other test of this run uses
    text = (
        f"[[WdPost]]\nBin = {json.dumps(sys.executable)}\nArgs = {json.dumps(args)}\n"
        f"Gpus = [{gpu}]\n"
    )
    try:
        config = parse_config(text, str(tmp_path / "ext-prover.cfg"))
        tmpdir = Path(config.children[0].envs["TMPDIR"])
        root_existed = tmpdir.parent.exists()
        sup = Supervisor(config, backoff=BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            try:
                await sup.wait_ready()
            finally:
                sup.request_shutdown()
        st = os.lstat(tmpdir)
        assert record.read_text() == f"{tmpdir}/"
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert OLD_TMP_ROOT not in tmpdir.parents
        assert os.lstat(OLD_TMP_ROOT).st_uid == OTHER_UID  # theirs, left alone
        tmpdir.rmdir()
        if not root_existed:
            tmpdir.parent.rmdir()
    finally:
        if made:
            OLD_TMP_ROOT.rmdir()
        if saved is not None:
            saved.rename(OLD_TMP_ROOT)


def test_the_kept_out_user_of_the_tests_holds_none_of_our_groups():
    # tests/helpers/kept_out.py stands for another user (nobody, when we are root): with root's
    # groups kept, a directory's group bits would let it in where that user is kept out.
    from helpers.kept_out import a_closed_directory, said_when_kept_out

    with a_closed_directory() as closed:
        closed.chmod(0o070)  # our group (root's, as root) may enter; nobody else
        said = said_when_kept_out(lambda: os.listdir(closed))
    assert said.startswith("PermissionError: "), said
