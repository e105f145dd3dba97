"""Logs: one text format or JSON lines, level and format from flags or the environment, child
stderr re-logged with its stage/index/pid (as JSON fields too), undecodable child output logged
truncated with the pid or dumped whole to --dump-dir."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.frontend import DEXT, dext_env, make_task, write_config
from helpers.small_disk import mounted_tmpfs

from damocles_ext import logs
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.frontends.started import failure_fields, for_client
from damocles_ext.protocol.jsonl import task_to_json


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.set_dump_dir(None)


def test_json_lines_carry_time_level_logger_message_and_extra_fields(restore_logging):
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out)
    log = logging.getLogger("damocles_ext.test")
    log.debug("not shown at info")
    log.info("child %s said %r", "window_post#0", "hi", extra={"pid": 42, "stage": "window_post"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "info" and first["logger"] == "damocles_ext.test"
    assert first["message"] == "child window_post#0 said 'hi'"
    assert (first["pid"], first["stage"]) == (42, "window_post")
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_format_is_one_line_with_time_level_and_logger(restore_logging):
    out = io.StringIO()
    logs.setup_logging("warning", "text", stream=out)
    logging.getLogger("damocles_ext.x").info("hidden")
    logging.getLogger("damocles_ext.x").warning("shown")
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING damocles_ext.x: shown") and line[:4].isdigit()


def test_flags_win_over_the_environment_which_wins_over_the_default():
    env = {logs.LEVEL_ENV: "debug", logs.FORMAT_ENV: "json"}
    assert logs.resolve(None, None, "warning", env) == ("debug", "json")
    assert logs.resolve("error", "text", "warning", env) == ("error", "text")
    assert logs.resolve(None, None, "warning", {}) == ("warning", "text")
    assert logs.resolve(None, None, "info", {logs.LEVEL_ENV: " INFO "}) == ("info", "text")
    with pytest.raises(UsageError, match=r"DAMOCLES_EXT_LOG_LEVEL='loud' is not one of debug"):
        logs.resolve(None, None, "info", {logs.LEVEL_ENV: "loud"})
    with pytest.raises(UsageError, match=r"DAMOCLES_EXT_LOG_FORMAT='xml' is not one of text, json"):
        logs.resolve(None, None, "info", {logs.FORMAT_ENV: "xml"})


def test_bad_output_is_logged_truncated_with_the_pid(restore_logging):
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out)
    logs.set_dump_dir(None)
    data = "é" * 30 + "x" * 200  # 260 bytes; a cut inside a character must not break the text
    assert logs.report_bad_output("window_post#1", 4242, data.encode(), "bad line") is None
    record = json.loads(out.getvalue())
    assert (record["child"], record["pid"], record["bytes"]) == ("window_post#1", 4242, 260)
    assert "window_post#1 (pid 4242): bad line; it wrote 260 bytes: " in record["message"]
    assert "'" + "é" * 30 + "x" * 40 + "...'" in record["message"]


def test_dump_dir_gets_the_whole_output_in_a_new_file(tmp_path: Path, restore_logging):
    out = io.StringIO()
    logs.setup_logging("info", "text", stream=out)
    logs.set_dump_dir(tmp_path / "dumps")  # created, private
    assert (tmp_path / "dumps").stat().st_mode & 0o777 == 0o700
    first = logs.report_bad_output("c", 7, b"\x00garbage" * 100, "undecodable output")
    second = logs.report_bad_output("c", 7, b"more", "undecodable output")
    assert first != second and first.parent == tmp_path / "dumps"
    assert first.read_bytes() == b"\x00garbage" * 100 and second.read_bytes() == b"more"
    assert first.stat().st_mode & 0o777 == 0o600
    assert f"its 800 bytes were dumped to {first}" in out.getvalue()
    # Names taken already (the same pids in an earlier run: a container's pids repeat and the
    # directory stays): passed over, not a dump lost to "File exists".
    n = int(second.stem.rsplit("-", 1)[1])
    for taken in range(n + 1, n + 4):
        (tmp_path / "dumps" / f"dext-bad-output-7-{os.getpid()}-{taken}.bin").write_bytes(b"old")
    third = logs.report_bad_output("c", 7, b"third", "undecodable output")
    assert third is not None and third.read_bytes() == b"third"
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        logs.set_dump_dir(tmp_path / "file")


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_dump_dir_another_user_planted_in_a_shared_directory_is_refused(
    tmp_path: Path, restore_logging, planted
):
    # --dump-dir /tmp/dumps, made first by another user: as their symlink, it sent the dumps
    # (a child's output, written as root) into any directory they chose; as their directory,
    # they could swap it for such a symlink later.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    dumps = shared / "dumps"
    if planted == "symlink":
        dumps.symlink_to(ours)
    else:
        dumps.mkdir(mode=0o777)
    os.lchown(dumps, 65534, 65534)
    with pytest.raises(UsageError) as refused:
        logs.set_dump_dir(dumps)
    assert str(refused.value) == (
        f"--dump-dir {dumps}: {dumps} is owned by uid 65534, not by us or root, in {shared},"
        " which other users may write to, so the dumps could be sent elsewhere; choose another"
        " directory (one only you or root can change)"
    )
    assert logs.dump_dir_for(7) is None
    assert list(ours.iterdir()) == []


def test_a_dump_dir_under_another_users_symlink_is_refused_before_anything_is_made(
    tmp_path: Path, restore_logging
):
    # --dump-dir /tmp/dumps/new, /tmp/dumps their symlink to a directory they chose: before,
    # `new` was made there (as root) before the path was checked.
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (shared / "dumps").symlink_to(elsewhere)
    os.lchown(shared / "dumps", 65534, 65534)
    with pytest.raises(UsageError, match="is owned by uid 65534, not by us or root, in "):
        logs.set_dump_dir(shared / "dumps" / "new")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_dump_dir_replaced_by_another_user_after_it_was_checked_gets_no_dump(
    tmp_path: Path, restore_logging, planted
):
    # A tmpfiles cleanup removes /tmp/dumps after the start; another user makes their own at
    # its name. Before, the dump went through their symlink (or into their directory).
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    out = io.StringIO()
    logs.setup_logging("info", "text", stream=out)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    dumps = shared / "dumps"
    logs.set_dump_dir(dumps)
    dumps.rmdir()  # the cleanup
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    if planted == "symlink":
        dumps.symlink_to(theirs)
    else:
        dumps.mkdir(mode=0o777)
    os.lchown(dumps, 65534, 65534)
    assert logs.report_bad_output("c", 7, b"secret", "undecodable output") is None
    assert list(theirs.iterdir()) == []
    if planted == "directory":
        assert list(dumps.iterdir()) == []
    said = out.getvalue()
    assert (
        f"c (pid 7): undecodable output; 6 bytes not dumped to {dumps} ({dumps} is owned by uid"
        f" 65534, not by us or root, in {shared}, which other users may write to): 'secret'"
    ) in said, said


def test_a_dump_dir_removed_after_the_start_is_made_again_private(tmp_path: Path, restore_logging):
    dumps = tmp_path / "a" / "dumps"
    logs.set_dump_dir(dumps)
    dumps.rmdir()
    (tmp_path / "a").rmdir()
    assert logs.report_bad_output("c", 7, b"garbage", "undecodable output") is not None
    assert stat.S_IMODE(dumps.stat().st_mode) == 0o700


def test_a_dump_dir_and_its_missing_parents_are_made_usable_under_a_group_writable_umask(
    tmp_path: Path, restore_logging
):
    # RHEL's user private groups (umask 002): os.makedirs made the parents 0775, which the
    # check then refused as writable by others: a usable --dump-dir was an exit 2.
    dumps = tmp_path / "a" / "b" / "dumps"
    old_umask = os.umask(0o002)
    try:
        logs.set_dump_dir(dumps)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(dumps.stat().st_mode) == 0o700
    for parent in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(parent.stat().st_mode) == 0o755, parent


def test_a_dump_the_full_disk_cuts_short_is_removed_and_the_output_logged(
    tmp_path, restore_logging
):
    # Before, the dump file stayed with what fitted (here: nothing), to be read later as the
    # child's whole output.
    out = io.StringIO()
    logs.setup_logging("info", "text", stream=out)
    with mounted_tmpfs(tmp_path / "disk", "size=64k") as disk:
        logs.set_dump_dir(disk.path / "dumps")
        disk.fill()
        assert logs.report_bad_output("c", 7, b"garbage" * 10_000, "undecodable output") is None
        assert list((disk.path / "dumps").iterdir()) == []
    said = out.getvalue()
    assert "c (pid 7): undecodable output; 70000 bytes not dumped to " in said, said
    assert "(No space left on device): 'garbagegarbage" in said, said


def test_a_bad_dump_dir_from_the_environment_is_named_as_the_variable_not_the_option(
    tmp_path: Path,
):
    (tmp_path / "file").write_text("")
    cfg = tmp_path / "ext-prover.cfg"
    cfg.write_text('[[WdPost]]\nPlugin = "echo"\n')
    env = dict(os.environ, **{logs.DUMP_DIR_ENV: str(tmp_path / "file")})
    done = subprocess.run(
        [*DEXT, "serve", "window_post", "-c", str(cfg)],
        input=b"",
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        f"{logs.DUMP_DIR_ENV}={tmp_path / 'file'}: exists and is not a directory; fix or unset it"
    ) in done.stderr.decode()
    assert "--dump-dir" not in done.stderr.decode()


# -- through the commands, with real children ------------------------------------------------------


def _prove(tmp_path: Path, cfg_text: str, *args: str, env: dict | None = None):
    cfg = write_config(tmp_path, cfg_text)
    task = tmp_path / "task.json"
    task.write_bytes(task_to_json(make_task(3)))
    argv = [*DEXT, "prove", "window_post", "--request", str(task), "-c", str(cfg), *args]
    return subprocess.run(
        argv, capture_output=True, env={**dext_env(), **(env or {})}, timeout=60, check=False
    )


def test_child_stderr_is_relogged_with_stage_index_and_pid_as_json_fields(tmp_path: Path):
    done = _prove(
        tmp_path,
        '[[WdPost]]\nPlugin = "echo"\n',
        "--no-progress",
        env={logs.LEVEL_ENV: "info", logs.FORMAT_ENV: "json"},
    )
    assert done.returncode == 0, done.stderr.decode()
    records = [json.loads(line) for line in done.stderr.decode().splitlines()]
    started = next(r for r in records if "started pid" in r["message"])
    pid = int(started["message"].split("started pid ")[1].split(":")[0])
    relayed = [r for r in records if r["logger"] == "damocles_ext.child"]
    assert relayed, records
    for r in relayed:
        assert (r["child"], r["stage"], r["index"], r["pid"]) == (
            "window_post#0",
            "window_post",
            0,
            pid,
        )
        assert r["message"].startswith(f"[window_post#0 pid={pid}] ")
    assert any("ready: stage window_post" in r["message"] for r in relayed)


def test_bad_log_level_in_the_environment_exits_2(tmp_path: Path):
    done = _prove(tmp_path, '[[WdPost]]\nPlugin = "echo"\n', env={logs.LEVEL_ENV: "loud"})
    assert done.returncode == 2
    assert b"DAMOCLES_EXT_LOG_LEVEL='loud' is not one of debug" in done.stderr
    assert b"Traceback" not in done.stderr


JSONL_CHILD = """
import json, sys
sys.stdout.write("window_post processor ready\\n"); sys.stdout.flush()
request = json.loads(sys.stdin.readline())
sys.stdout.write("GARBAGE" + "x" * 300 + "\\n")  # not a response: logged or dumped
sys.stdout.write(json.dumps({"id": request["id"], "err_msg": "gave up"}) + "\\n")
sys.stdout.flush()
sys.stdin.read()
"""

DEXT_CHILD = """
import os, sys
from damocles_ext.protocol import dext
os.write(1, dext.encode(dext.Hello("dext/1", "window_post", os.getpid(), "bad", "1")))
os.read(0, 1 << 20)
os.write(1, b"\\x00\\x00\\x00\\x04\\xc1\\xc1\\xc1\\xc1")  # a frame whose payload is not msgpack
sys.stdin.read()
"""


def _bin_child(tmp_path: Path, code: str, extra: str = "") -> str:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return f'[[WdPost]]\nBin = "{sys.executable}"\nArgs = ["{script}"]\n{extra}'


def test_undecodable_json_line_is_logged_truncated_with_the_child_pid(tmp_path: Path):
    done = _prove(tmp_path, _bin_child(tmp_path, JSONL_CHILD), "--log-level", "warning")
    assert done.returncode == 1  # the child's error answer
    err = done.stderr.decode()
    line = next(x for x in err.splitlines() if "skipped a bad stdout line" in x)
    assert "window_post#0 (pid " in line and "it wrote 308 bytes: 'GARBAGE" in line
    assert line.split("it wrote 308 bytes: ")[1] == "'GARBAGE" + "x" * 93 + "...'"  # 100 bytes


def test_undecodable_output_goes_whole_to_the_dump_dir(tmp_path: Path):
    dumps = tmp_path / "dumps"
    done = _prove(tmp_path, _bin_child(tmp_path, JSONL_CHILD), "--dump-dir", str(dumps))
    assert done.returncode == 1
    (dump,) = dumps.iterdir()
    assert dump.read_bytes() == b"GARBAGE" + b"x" * 300 + b"\n"
    assert f"its 308 bytes were dumped to {dump}" in done.stderr.decode()


def test_broken_dext_frame_is_dumped_from_the_environment_setting(tmp_path: Path):
    dumps = tmp_path / "dumps"
    cfg = _bin_child(tmp_path, DEXT_CHILD, "MaxAttempts = 1\n")
    done = _prove(tmp_path, cfg, env={logs.DUMP_DIR_ENV: str(dumps)})
    assert done.returncode == 1
    (dump,) = dumps.iterdir()
    assert dump.read_bytes() == b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1"
    err = done.stderr.decode()
    assert "undecodable output: dext framing error" in err and str(dump) in err


FORGING_CHILD = r"""
import json, sys
sys.stdout.write("window_post processor ready\n"); sys.stdout.flush()
err = sys.stderr.buffer
err.write(b"abc\r2026-01-01 00:00:00,000 ERROR damocles_ext.supervisor: forged by a carriage return\n")
err.write(b"\x1b[2K\x1b[1G2026-01-01 00:00:00,000 ERROR damocles_ext.supervisor: forged by ANSI\n")
err.write("split \u2028 here \x85 and \x0b there\n".encode())
err.flush()
request = json.loads(sys.stdin.readline())
forged = "\n2026-01-01 00:00:00,000 ERROR damocles_ext.supervisor: forged by an error answer"
sys.stdout.write(json.dumps({"id": request["id"], "err_msg": "gave up" + forged}) + "\n")
sys.stdout.flush()
sys.stdin.read()
"""


def _serve_one(tmp_path: Path, fmt: str, child: str = FORGING_CHILD) -> tuple[str, list[str]]:
    """serve window_post with `child`, one request: the answer's err_msg, stderr's lines."""
    write_config(tmp_path, _bin_child(tmp_path, child, "MaxAttempts = 1\n"))
    done = _serve_request(tmp_path, fmt, 1)
    (answer,) = done.stdout.splitlines()[1:]  # after the ready line
    return json.loads(answer)["err_msg"], done.stderr.decode().splitlines()


def _serve_request(tmp_path: Path, fmt: str, request_id: int) -> subprocess.CompletedProcess:
    """serve window_post with tmp_path's config, one request of id `request_id`, to its end."""
    line = b'{"id": %d, "task": ' % request_id + task_to_json(make_task(3)) + b"}\n"
    done = subprocess.run(
        [*DEXT, "serve", "window_post", "--conf-dir", str(tmp_path), "--log-format", fmt],
        input=line,
        capture_output=True,
        env=dext_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done


def test_a_childs_line_breaks_and_terminal_controls_are_escaped_in_text_logs(tmp_path: Path):
    err_msg, lines = _serve_one(tmp_path, "text")
    assert err_msg.endswith("forged by an error answer")  # the answer is damocles' to read
    assert all(line[:4].isdigit() and " damocles_ext." in line for line in lines), lines
    for line in lines:
        assert not any(c in line for c in "\r\x1b\x0b\x85\u2028"), line
    (cr,) = (x for x in lines if "by a carriage return" in x)
    assert " INFO damocles_ext.child: [window_post#0 pid=" in cr and "] abc\\r2026-01-01" in cr
    (ansi,) = (x for x in lines if "forged by ANSI" in x)
    assert "] \\x1b[2K\\x1b[1G2026-01-01" in ansi
    assert any("split \\u2028 here \\x85 and \\x0b there" in x for x in lines)
    (answer,) = (x for x in lines if "forged by an error answer" in x)
    assert " WARNING damocles_ext.serve: request 1 failed on window_post#0 " in answer
    assert "gave up\\n2026-01-01" in answer


def test_json_logs_are_one_object_a_line_whatever_a_child_writes(tmp_path: Path):
    _, lines = _serve_one(tmp_path, "json")
    records = [json.loads(line) for line in lines]  # splitlines() also cuts at \u2028 and \x85
    (split,) = (r for r in records if "split" in r["message"])
    assert split["message"].endswith("split \u2028 here \x85 and \x0b there")
    assert split["child"] == "window_post#0"
    (answer,) = (r for r in records if "forged by an error answer" in r["message"])
    assert answer["level"] == "warning" and "gave up\n2026-01-01" in answer["message"]


ANSI_ERROR_CHILD = r"""
import json, sys
sys.stdout.write("window_post processor ready\n"); sys.stdout.flush()
request = json.loads(sys.stdin.readline())
said = "gave up\r\x1b[2K\x1b[1Gall fine\n2026-01-01 00:00:00,000 INFO damocles_ext.cli: forged \u2028 here"
sys.stdout.write(json.dumps({"id": request["id"], "err_msg": said}) + "\n")
sys.stdout.flush()
sys.stdin.read()
"""


def test_proves_final_error_escapes_a_childs_error_answer_as_the_text_logs_do(tmp_path: Path):
    # The error line printed the child's text raw: its "\r" and ANSI sequence rewrote the line
    # on a terminal, its "\n" started a forged one.
    cfg = _bin_child(tmp_path, ANSI_ERROR_CHILD, "MaxAttempts = 1\n")
    done = _prove(tmp_path, cfg, "--no-progress")
    assert done.returncode == 1
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("damocles-ext prove: error: request 1 (window_post) failed on "), line
    said = "gave up\\r\\x1b[2K\\x1b[1Gall fine\\n2026-01-01 00:00:00,000 INFO"
    assert said in line and line.endswith("forged \\u2028 here"), line
    # JSON lines escape it themselves: the record holds the text as the child gave it.
    done = _prove(tmp_path, cfg, "--no-progress", "--log-format", "json")
    (record,) = (json.loads(x) for x in done.stderr.decode().splitlines())
    assert record["request_id"] == 1  # the request whose error answer it is
    assert record["message"].endswith("gave up\r\x1b[2K\x1b[1Gall fine\n2026-01-01 00:00:00,000"
                                      " INFO damocles_ext.cli: forged \u2028 here"), record  # fmt: skip


HUGE_ERROR_CHILD = """
import json, sys
sys.stdout.write("window_post processor ready\\n"); sys.stdout.flush()
request = json.loads(sys.stdin.readline())
sys.stdout.write(json.dumps({"id": request["id"], "err_msg": "E" * 1000000}) + "\\n")
sys.stdout.flush()
sys.stdin.read()
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_childs_megabyte_error_answer_is_logged_cut_and_answered_whole(tmp_path: Path, fmt):
    err_msg, lines = _serve_one(tmp_path, fmt, HUGE_ERROR_CHILD)
    assert err_msg.endswith(": " + "E" * 1000000)
    (logged,) = (x for x in lines if "EEEE" in x)
    assert len(logged) < logs.MESSAGE_LIMIT + 1000
    message = json.loads(logged)["message"] if fmt == "json" else logged
    assert "request 1 failed on window_post#0" in message
    assert message.endswith(" more characters not logged)")


@pytest.mark.parametrize("command", ["run", "serve", "serve-options"])
def test_a_command_that_logs_json_says_why_it_stopped_as_a_json_record(tmp_path: Path, command):
    write_config(tmp_path, '[[WdPost]]\nBin = "/nonexistent/prover"\n')
    argv = {
        "run": [*DEXT, "run", "-c", str(tmp_path / "ext-prover.cfg")],
        "serve": [*DEXT, "serve", "window_post", "--conf-dir", str(tmp_path)],
        # An option that does not go with the others, found before the config is read.
        "serve-options": [
            *DEXT,
            "serve",
            "window_post",
            "--conf-dir",
            str(tmp_path),
            "--store",
            "a=/x",
        ],
    }[command]
    env = {**dext_env(), logs.FORMAT_ENV: "json"}
    done = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    assert done.returncode == 2 and done.stdout == b""
    *_, last = (json.loads(line) for line in done.stderr.decode().splitlines())
    assert (last["level"], last["logger"], last["exit_code"]) == ("error", "damocles_ext.cli", 2)
    assert last["message"].startswith(f"damocles-ext {command.split('-')[0]}: error: ")
    if command == "serve-options":
        assert "--store goes with --jobs URL" in last["message"]
    else:
        assert '"/nonexistent/prover" does not exist' in last["message"]


CRASHING_CHILD = """
import sys
sys.stdout.write("window_post processor ready\\n"); sys.stdout.flush()
sys.stdin.readline()
sys.stderr.write("out of GPU memory\\n")
sys.exit(3)
"""


def test_the_supervisors_records_about_a_child_carry_its_fields_as_its_stderr_lines_do(
    tmp_path: Path,
):
    cfg = _bin_child(tmp_path, CRASHING_CHILD, "MaxAttempts = 1\n")
    done = _prove(tmp_path, cfg, "--no-progress", "--log-level", "info", "--log-format", "json")
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.decode().splitlines()]
    (said,) = (r for r in records if r["message"].endswith("] out of GPU memory"))
    fields = {k: said[k] for k in ("child", "stage", "index", "pid")}
    assert fields["child"] == "window_post#0" and fields["index"] == 0
    about = [r for r in records if r["logger"] == "damocles_ext.supervisor"]
    started = next(r for r in about if "started pid" in r["message"])
    exited = next(r for r in about if r["level"] == "error" and "exit code 3" in r["message"])
    for record in (started, exited):
        assert {k: record.get(k) for k in fields} == fields, record


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("char", ["E", "\x00", "\u2028", "\ufffd"])
def test_a_logged_line_stays_within_the_limit_in_bytes_whatever_its_characters(fmt, char):
    # The cut was of characters before the escaping: 20,000 NULs became a 65,000-character
    # line (98,000 in JSON), past journald's 48 KiB LineMax it was meant to stay under.
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    record = logging.LogRecord(
        "damocles_ext.x", logging.WARNING, "", 0, "%s", (char * 20000,), None
    )
    line = formatter.format(record)
    assert logs.MESSAGE_LIMIT < len(line.encode()) < logs.MESSAGE_LIMIT + 200
    shown = json.loads(line)["message"] if fmt == "json" else line
    assert shown.endswith(" more characters not logged)")
    assert "\n" not in line and "\u2028" not in line


CRASH_ON_REQUEST_CHILD = """
import sys
sys.stdout.write("window_post processor ready\\n"); sys.stdout.flush()
sys.stdin.readline()
sys.exit(3)
"""


def test_json_records_about_a_request_carry_its_id_and_those_about_a_crash_the_childs(
    tmp_path: Path,
):
    # Two children that crash on any request: the request is retried once, then given up. The
    # ids were in the messages only: no filtering on one request, nor on the process it was lost
    # with; serve's damocles id (7) and the supervisor's (1) are two numbers.
    block = _bin_child(tmp_path, CRASH_ON_REQUEST_CHILD, "MaxAttempts = 2\n")
    write_config(tmp_path, block + "\n" + block)
    done = _serve_request(tmp_path, "json", 7)
    records = [json.loads(x) for x in done.stderr.decode().splitlines()]
    (retry,) = (r for r in records if "retrying (attempt 2 of 2)" in r["message"])
    assert retry["request_id"] == 1 and retry["message"].startswith("request 1: "), retry
    # The child the attempt was lost with, and that process's pid (as its exit record says).
    crashed = f"{retry['child']} (pid {retry['pid']})"
    assert retry["message"].startswith(f"request 1: {crashed} went down while running it")
    (exited,) = (
        r for r in records if r["message"].startswith(crashed) and "exit code 3" in r["message"]
    )
    assert (exited["child"], exited["stage"], exited["pid"]) == (
        retry["child"],
        retry["stage"],
        retry["pid"],
    )
    (gave_up,) = (r for r in records if "giving up" in r["message"])
    assert gave_up["logger"] == "damocles_ext.serve" and gave_up["level"] == "warning"
    assert (gave_up["caller_request_id"], gave_up["request_id"]) == (7, 1), gave_up
    assert gave_up["message"].startswith("request 7: ")


def test_serve_connects_error_record_names_the_request_by_its_number_in_runs_log():
    # serve --connect has no supervisor of its own: the number in its records is run's, read
    # from the answer as run's control socket words it for its client (its id there is 4).
    said = for_client(4, "request 9 (window_post): failed on window_post#0 (pid 5): no GPU")
    assert said.startswith("request 4 (window_post; request 9 in run's log): ")
    assert failure_fields(7, ProverError(said)) == {"caller_request_id": 7, "request_id": 9}
    # Nothing to go by: no request_id rather than a wrong one (the 4 is the socket's id).
    assert failure_fields(7, ProverError(for_client(4, "no GPU"))) == {"caller_request_id": 7}
    # A number no supervisor gives (over 19 digits: int() refuses over 4300) is none of ours.
    huge = f"request 4 (window_post; request {'9' * 5000} in run's log): x"
    assert failure_fields(7, ProverError(huge)) == {"caller_request_id": 7}


NO_GPU_CHILD = r"""
import json, sys
sys.stdout.write("window_post processor ready\n"); sys.stdout.flush()
for line in sys.stdin:
    sys.stdout.write(json.dumps({"id": json.loads(line)["id"], "err_msg": "no GPU"}) + "\n")
    sys.stdout.flush()
"""


async def test_prove_through_runs_socket_gives_its_final_error_record_runs_number(
    tmp_path: Path, sock_dir: Path
):
    # prove over run's control socket gets its error from the client, which has no number of
    # run's: it is read from the answer, as run's socket words it (`request N in run's log`).
    import trio
    from helpers.frontend import start_run

    cfg = write_config(tmp_path, _bin_child(tmp_path, NO_GPU_CHILD, "MaxAttempts = 1\n"))
    sock = sock_dir / "control.sock"
    task = tmp_path / "task.json"
    task.write_bytes(task_to_json(make_task(3)))
    async with trio.open_nursery() as nursery:
        run, log = await start_run(nursery, cfg, sock, "--log-format", "json")
        argv = [*DEXT, "prove", "window_post", "--request", str(task), "--socket", str(sock),
                "--no-progress", "--log-format", "json"]  # fmt: skip
        for _ in range(2):  # run's second request: its number is not the client's first id
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, env=dext_env()
            )
        run.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await run.wait() == 0, log.text()[-2000:]
        nursery.cancel_scope.cancel()
    assert done.returncode == 1, done.stderr
    (record,) = (json.loads(x) for x in done.stderr.decode().splitlines())
    assert "request 2 in run's log" in record["message"], record
    assert record["request_id"] == 2, record
    # And run's log has its record of that answer, once, which that number finds: before, run
    # logged nothing of a request its child failed (without a retry, a kill), the supervisor
    # raising it to its caller, the socket answering it unsaid.
    ran = [json.loads(x) for x in log.text().splitlines()]
    [answer] = [r for r in ran if r.get("request_id") == 2]
    assert answer["level"] == "warning" and answer["caller_request_id"] == 1, answer
    assert record["message"].endswith(answer["message"]), (record, answer)


async def test_runs_record_of_a_request_refused_while_it_shuts_down_has_its_request_id(
    tmp_path: Path, sock_dir: Path
):
    # A request the supervisor refuses before it starts (run shutting down) has a number of
    # the supervisor's, which the client's error names: run's warning about it carries it as
    # request_id, as its record of a failure does; it carried only caller_request_id.
    import trio
    from helpers.frontend import draining_run

    from damocles_ext.client import connect

    sock = sock_dir / "control.sock"
    async with draining_run(tmp_path, sock, "--log-format", "json") as (_cfg, _run, log, _):
        with trio.fail_after(30):
            async with connect(sock) as second:
                with pytest.raises(ProverError, match="shutting down") as refused:
                    await second.submit(make_task(2))
            said = str(refused.value)
            line = await log.wait_for("refused: the supervisor is shutting down")
    assert said.startswith("request 1 (window_post; request 2 in run's log) refused: "), said
    record = json.loads(line)
    assert record["level"] == "warning" and said.endswith(record["message"]), (said, record)
    assert (record["caller_request_id"], record.get("request_id")) == (1, 2), record


def test_a_note_without_a_pid_carries_none_rather_than_the_childs_current_one():
    # The child's fields hold its current process's pid (one starting, or one gone): a record
    # about the child with no process of its own names none.
    from types import SimpleNamespace

    from damocles_ext.supervisor.effect_log import _child_fields

    kids = {"window_post#0": SimpleNamespace(fields={"child": "window_post#0", "pid": 41})}
    assert _child_fields("window_post#0", None, kids) == {"child": "window_post#0"}
    assert _child_fields("window_post#0", 40, kids) == {"child": "window_post#0", "pid": 40}
    assert kids["window_post#0"].fields["pid"] == 41  # (a copy changed, not the child's)
