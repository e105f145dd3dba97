"""`damocles-ext worker --worker-config damocles-worker.toml`: a real worker subprocess, set up by
the file an operator already runs damocles-worker with, pulls jobs from a real coordinator (over
HTTP, on SQLite) and proves them on the file's [[processors.window_post]] children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio
from helpers.frontend import DEXT, dext_env, dext_run, make_task, plugin_block
from test_worker import Rig, job_input

from damocles_ext.jobs.worker_rules import free_slots
from damocles_ext.protocol import jsonl

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

TOKEN = "the-sites-token"


def worker_toml(port: int, store_dir, *, seconds: float = 0.3) -> str:
    child = [
        "-m", "damocles_ext", "child", "window_post", "--plugin", "sleep",
        "--option", f"seconds={seconds}", "--option", "progress_interval=0.05",
    ]  # fmt: skip
    return f"""
[worker]
name = "toml-box"

[metrics]
enable = true

[sector_manager]
rpc_client.addr = "/ip4/127.0.0.1/tcp/{port}"
rpc_client.headers = {{ Authorization = "Bearer {TOKEN}", X-Site = "lab-3" }}

[sealing]
allowed_miners = [1000]
recover_interval = "10m"

[[sealing_thread]]
plan = "wdpost"

[[sealing_thread]]
plan = "wdpost"

[[sealing_thread]]
location = "/nonexistent/sealing"

[[attached]]
name = "store-a"
location = {json.dumps(str(store_dir))}

[processors.limitation.concurrent]
window_post = 1

[[processors.window_post]]
bin = {json.dumps(sys.executable)}
args = {json.dumps(child)}
concurrent = 2
"""


async def test_a_worker_set_up_by_a_damocles_worker_toml_pulls_and_proves_one_job_at_a_time(
    tmp_path,
):
    rig = Rig(f"sqlite:///{tmp_path}/jobs.db")
    # The file's Authorization header is the token: a worker without it is refused at start.
    rig.server.token = TOKEN.encode()
    store = tmp_path / "store-a"
    for sub in ("sealed", "cache"):  # damocles' layout (its provers here read no file)
        (store / sub).mkdir(parents=True)
    toml = tmp_path / "damocles-worker.toml"
    toml.write_text(worker_toml(rig.port, store))
    other, _ = await rig.jobs.create(job_input(miner=1001))
    ids = [(await rig.jobs.create(job_input(seed=n)))[0].Id for n in range(3)]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(rig.server.serve)
                # --name beside the file overrides the file's [worker] name.
                sock = str(tmp_path / "worker.sock")
                proc = await trio.lowlevel.open_process(
                    [*DEXT, "worker", "--worker-config", str(toml), "--name", "cli-name",
                     "--socket", sock],
                    env=dext_env(), stderr=subprocess.PIPE,
                )  # fmt: skip
                seen = b""
                while seen.count(b": delivered") < 3:
                    chunk = await proc.stderr.receive_some(4096)
                    assert chunk, seen.decode()
                    seen += chunk
                # The worker's control socket: `status` shows its part, proofs are refused.
                status = await trio.run_process(
                    [*DEXT, "status", "--socket", sock, "--json"], capture_stdout=True,
                    capture_stderr=True, env=dext_env(), check=False,
                )  # fmt: skip
                task = tmp_path / "task.json"
                task.write_bytes(jsonl.task_to_json(make_task()))
                prove = await trio.run_process(
                    [*DEXT, "prove", "window_post", "--request", str(task), "--socket", sock],
                    capture_stdout=True, capture_stderr=True, env=dext_env(), check=False,
                )  # fmt: skip
                proc.send_signal(signal.SIGTERM)
                while chunk := await proc.stderr.receive_some(4096):
                    seen += chunk
                assert await proc.wait() == 0, seen.decode()
                nursery.cancel_scope.cancel()
        jobs = [await rig.jobs.get(i) for i in ids]
        # The file's allowed_miners: another miner's job is left for another worker.
        assert (await rig.jobs.get(other.Id)).State == "ready2run"
    finally:
        rig.close()
    text = seen.decode()
    assert all(j.succeeded and j.WorkerName == "cli-name" for j in jobs), text
    # The child has two slots, but window_post = 1 in [processors.limitation.concurrent]: never
    # more than one job at once.
    assert rig.most_running == 1, text
    # The keys the reader leaves to damocles-worker are warned about, naming their table.
    assert "[metrics]" in text and "does not use" in text
    assert "Traceback" not in text
    assert status.returncode == 0, status.stderr.decode()
    part = json.loads(status.stdout)["worker"]
    assert part["name"] == "cli-name" and part["max_jobs"] == 1 and part["delivered"] == 3
    assert part["manager"] == f"http://127.0.0.1:{rig.port}/rpc/v0"
    # A wrong --socket is the operator's to fix: exit code 2, as serve --connect exits on it.
    assert prove.returncode == 2 and b"answers status only" in prove.stderr, prove.stderr


def test_a_bad_damocles_worker_toml_exits_2_with_the_readers_message(tmp_path):
    toml = tmp_path / "damocles-worker.toml"
    toml.write_text('[worker]\nname = "x"\n\n[[sealing_thread]]\nplan = "wdpost"\n')
    result = dext_run("worker", "--worker-config", str(toml))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert str(toml) in err and "no [sector_manager] table" in err
    assert "Traceback" not in err


def test_worker_config_and_an_ext_prover_cfg_together_exit_2(tmp_path):
    toml = tmp_path / "damocles-worker.toml"
    toml.write_text(worker_toml(1789, tmp_path))
    result = dext_run("worker", "--worker-config", str(toml), "-c", str(tmp_path / "x.cfg"))
    err = result.stderr.decode()
    assert result.returncode == 2 and "not both" in err and "Traceback" not in err
    result = dext_run("worker", "-c", str(tmp_path / "x.cfg"))
    err = result.stderr.decode()
    assert result.returncode == 2 and "--manager ADDRESS is required" in err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--header", "no-colon-here"], "expected 'NAME: VALUE'"),
        # h11 sends headers as ASCII: before, a traceback at the first call.
        (["--header", "X-Site: café"], "a header value is sent as ASCII"),
        (["--header", "Xé: v"], "its name ASCII letters, digits and -"),
        (["--header", "X(a): v"], "its name ASCII letters, digits and -"),
        # The client sets it: before, every call failed (h11 refused the request).
        (["--header", "Host: x"], "argument --header: Host is a header the HTTP client sets"),
        (["--proxy-header", "Content-Length: 0"], "argument --proxy-header: Content-Length is"),
        # Without --proxy there is no source node to send it to: it was ignored, silently.
        (["--proxy-header", "Authorization: Bearer t"], "--proxy-header goes with --proxy ADDR"),
        (["--allowed-miners", str(2**63)], f"miner id {2**63} is over 2**63 - 1"),
        (["--allowed-miners", "1²"], "miner ids are numbers separated by commas"),
        (["--attached", "a=/tmp", "--attached", "a=/var"], "store 'a' is given twice"),
        (["--attached", "a=mnt/a"], "argument --attached: 'a=mnt/a': PATH must be absolute"),
        (["--name", " "], "argument --name: empty; give the worker a name"),
        # Bytes that are not UTF-8: before, an encoding error naming no option (--name) or a
        # traceback (--attached) at the first call to the manager.
        (
            ["--name", os.fsdecode(b"gpu-\xff")],
            "argument --name: 'gpu-?' is not UTF-8 text: byte \\xff (character 5) is not",
        ),
        (
            ["--attached", os.fsdecode(b"st\xff=/mnt/a")],
            "argument --attached: 'st?' is not UTF-8 text: byte \\xff (character 3) is not",
        ),
    ],
)
def test_a_bad_worker_option_exits_2_saying_what_is_wrong(tmp_path, args, words):
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    result = dext_run("worker", *args, "--manager", "127.0.0.1:1", "-c", str(cfg))
    err = result.stderr.decode()
    assert result.returncode == 2 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flag", "given", "words"),
    [
        ("--header", "Authorization Bearer s3cr3t", "got a text with no ':' (not shown"),
        ("--header", "Authorization Bearer s3cr3t: x", "got no header name before its ':'"),
        ("--header", "eyJhbGciOiJIUzI1NiJ9.s3cr3t.sig extra: v", "got no header name before"),
        ("--header", "Authorization: Bearer s3cr3t\x7f", "(in the value of Authorization, not"),
        ("--header", "Authorization: Bearer s3cr3t\x01", "no control characters (in the value"),
        ("--proxy-header", "Authorization=Bearer s3cr3t", "got a text with no ':' (not shown"),
        ("--header", "eyJhbGciOiJIUzI1NiJ9.s3cr3t.sig", "with no ':' (not shown"),  # a token alone
    ],
)
def test_a_bad_header_is_refused_without_showing_its_value(tmp_path, flag, given, words):
    # Its value may be a token, and a unit's stderr goes to the journal.
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    args = ["--proxy", "127.0.0.1:1"] if flag == "--proxy-header" else []
    result = dext_run("worker", flag, given, *args, "--manager", "127.0.0.1:1", "-c", str(cfg))
    err = result.stderr.decode()
    assert result.returncode == 2 and words in err, err
    assert "s3cr3t" not in err and "Traceback" not in err


def test_a_manager_address_that_is_no_url_exits_2_naming_the_option_and_the_address(tmp_path):
    # urlsplit's own error was all that was said: "error: Invalid IPv6 URL".
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    result = dext_run("worker", "--manager", "http://[::1", "-c", str(cfg))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.endswith(
        "worker: error: --manager: 'http://[::1' is not a URL (Invalid IPv6 URL)\n"
    ), err


def test_a_worker_name_too_long_for_a_coordinator_exits_2_saying_so(tmp_path):
    # A coordinator refuses it (its workers table keys a row by it): said at the start. A long
    # list of miners is no such problem (the row is keyed by its digest).
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    result = dext_run("worker", "--manager", "127.0.0.1:1", "-c", str(cfg), "--name", "w" * 1001)
    err = result.stderr.decode()
    assert result.returncode == 2 and "the worker name takes 1001 bytes" in err, err
    assert "--name" in err and "Traceback" not in err


def test_max_jobs_caps_the_free_slots():
    assert free_slots(4, 0, 2) == 2 and free_slots(4, 1, 2) == 1 and free_slots(4, 2, 2) == 0
    assert free_slots(1, 0, 3) == 1 and free_slots(4, 0, None) == 4


def test_a_taken_metrics_port_exits_2_before_anything_starts_and_leaves_no_socket(tmp_path):
    import socket

    store = tmp_path / "store-a"
    store.mkdir()
    toml = tmp_path / "damocles-worker.toml"
    toml.write_text(worker_toml(1789, store))
    sock_path = tmp_path / "worker.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dext_run(
            "worker", "--worker-config", str(toml), "--socket", str(sock_path),
            "--metrics", f"127.0.0.1:{port}",
        )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert str(port) in err and "Traceback" not in err
    assert not sock_path.exists()


def test_a_heartbeat_interval_near_the_managers_timeout_is_warned_about(tmp_path):
    # damocles-manager takes a job back after 15 s without its heartbeat: at 20 s every job
    # was lost, at 8 s one late heartbeat cost it, and the worker said nothing. Here the worker
    # stops at once after the warning: its socket's directory is not private (a usage error).
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(plugin_block("WdPost", "echo"))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)

    def warned(interval: str) -> str:
        result = dext_run(
            "worker", "--manager", "127.0.0.1:1", "-c", str(cfg), "--heartbeat-interval",
            interval, "--socket", str(shared / "w.sock"),
        )  # fmt: skip
        err = result.stderr.decode()
        assert result.returncode == 2 and "not private" in err and "Traceback" not in err, err
        return err

    assert "every job is taken back before its first heartbeat" in warned("20s")
    err = warned("8s")
    assert "--heartbeat-interval 8s: damocles-manager gives a job to another worker" in err
    assert "one late or lost heartbeat costs the job" in err
    assert "keep it at most a third of the manager's HeartbeatTimeout" in err
    assert "--heartbeat-interval" not in warned("3s")


def test_a_worker_does_not_warn_about_the_winpost_children_it_does_not_start(tmp_path):
    # The manager's own ext-prover.cfg, as docs/WORKER.md says it may be given: its [[WinPost]]
    # child shares bellperson's lock files in /tmp with the [[WdPost]] one, and sets a key that
    # has no effect. `run` starts both and says so; the worker starts only the WdPost child.
    # Both stop at once after their warnings: their socket's directory is not private.
    table = (
        f"Bin = {json.dumps(sys.executable)}\nArgs = ['-c', 'pass']\n"
        'Protocol = "jsonl"\nHeartbeatTimeoutSecs = 30\n'
    )
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text(f"[[WdPost]]\n{table}\n[[WinPost]]\n{table}")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    worker = dext_run(
        "worker", "--manager", "127.0.0.1:1", "-c", str(cfg), "--socket", str(shared / "w.sock")
    )
    run = dext_run("run", "-c", str(cfg), "--socket", str(shared / "r.sock"))
    said = {}
    for name, result in [("worker", worker), ("run", run)]:
        err = result.stderr.decode()
        assert result.returncode == 2 and "not private" in err and "Traceback" not in err, err
        said[name] = err
    lock_files = "winning_post#0 and window_post#0 keep bellperson's GPU lock files"
    assert lock_files in said["run"] and "WinPost[0]: HeartbeatTimeoutSecs" in said["run"]
    assert lock_files not in said["worker"], said["worker"]
    assert "WinPost[0]" not in said["worker"], said["worker"]
    # What is said of its own children still is, and what it does not start is named.
    assert "WdPost[0]: HeartbeatTimeoutSecs has no effect" in said["worker"], said["worker"]
    assert "children of other tables are not started (winning_post#0)" in said["worker"]
