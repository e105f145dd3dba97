"""Security (issue 7), extending tests/test_run_prove.py's socket tests (0600 in a created 0700
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
import signal
import socket
import stat
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import trio
from helpers_frontend import (
    DEXT,
    ManagerLike,
    dext_run,
    plugin_block,
    start_run,
    write_config,
)
from supervisor_helpers import our_descendants

from damocles_ext.config import parse_config
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.protocol import jsonl
from damocles_ext.supervisor import Supervisor
from damocles_ext.supervisor.control import bind_control_socket
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


@pytest.fixture
def sock_dir(tmp_path: Path):
    d = Path(f"/tmp/dext-s{os.getpid()}-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    d.rmdir()


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
    with pytest.raises(UsageError, match="owned by uid 65534"):
        bind_control_socket(path)
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


async def test_plugin_option_values_with_shell_metacharacters_reach_the_prover_literally(
    tmp_path,
):
    loose = f"dext-canary-{uuid.uuid4().hex[:8]}"
    value = f"$(touch {loose}); `touch {loose}` | x"
    text = f'[[WdPost]]\nPlugin = "sleep"\nPluginOptions = {{ fail = {json.dumps(value)} }}\n'
    config = parse_config(text, str(tmp_path / "ext-prover.cfg"))
    sup = Supervisor(config, backoff=BackoffPolicy(base=0.01, cap=0.02, max_failed_starts=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with pytest.raises(ProverError) as info:
            await sup.wait_ready()
        sup.request_shutdown()
    # The child got the value whole as one argument, and its option check quotes it back.
    assert f"option 'fail' = {value!r} is not one of" in str(info.value)
    assert not Path(loose).exists() and not (tmp_path / loose).exists()


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
