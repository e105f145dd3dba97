"""What the command line prints and how it ends when its reader goes away."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "ext-prover.cfg.example")


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins"],
        ["check-config", "-c", EXAMPLE],
        ["check-config", "--json", EXAMPLE],
        ["simulate", "--hours", "1", "--policies", "a,c"],
    ],
    ids=["help", "plugins", "check-config", "check-config-json", "simulate"],
)
def test_a_closed_stdout_ends_a_command_quietly_without_a_traceback(args: list[str]):
    # `damocles-ext ... | head -0`: the reader is gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "damocles_ext", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == b"", done.stderr.decode()
    assert done.returncode in (0, 1)


def _closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """The command started with fd 1 closed, as `damocles-ext ... >&-` starts it."""
    return subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "damocles_ext", *args],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [["plugins"], ["check-config", "-c", EXAMPLE], ["simulate", "--hours", "1"]],
    ids=["plugins", "check-config", "simulate"],
)
def test_a_stdout_closed_at_start_is_an_error_that_says_so_without_a_traceback(args: list[str]):
    done = _closed_stdout(*args)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "stdout is closed, so the output cannot be written" in done.stderr


def _to_full_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """`damocles-ext ARGS` with its stdout on /dev/full (every write: ENOSPC)."""
    with open("/dev/full", "wb") as full:
        return subprocess.run(
            [sys.executable, "-m", "damocles_ext", *args],
            stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, text=True,
            timeout=60, check=False,
        )  # fmt: skip


def test_serve_whose_stdout_is_full_exits_1_saying_the_ready_line_cannot_be_written():
    done = _to_full_stdout("serve", "window_post", "-c", EXAMPLE)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "cannot write the ready line to stdout: No space left on device" in done.stderr


def test_help_to_a_full_stdout_exits_1_saying_so_without_a_traceback():
    # argparse writes --help while it parses, before any command is known.
    done = _to_full_stdout("serve", "--help")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "cannot write the output to stdout: No space left on device" in done.stderr


def test_a_non_blocking_stdout_whose_reader_is_behind_gets_the_whole_output():
    # O_NONBLOCK is on the open file, shared with whoever set it (a shell, a program that
    # started us): a pipe its reader has not emptied yet is not full, and the output must wait.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: one page, so the output fills it
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    os.write(write_end, b"x" * 3000)  # what the reader has not read yet
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "damocles_ext", "check-config", "--json", "-c", EXAMPLE],
            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    time.sleep(1)  # the reader behind: the command meets a full pipe meanwhile
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert json.loads(data[3000:])["children"], data[3000:]


def test_a_stdin_closed_at_start_reads_as_empty_without_a_traceback():
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-m", "damocles_ext", "prove",
         "window_post", "--request", "-", "-c", EXAMPLE],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr


# -- texts ---------------------------------------------------------------------------------------


def _dext(*args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "damocles_ext", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd, env=env,
    )  # fmt: skip


def _usage_error(*args: str) -> str:
    """The stderr of `damocles-ext ARGS`, which must be a usage error: exit 2, no traceback."""
    done = _dext(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_verify_of_a_task_of_the_other_stage_points_to_verify_not_prove(tmp_path: Path):
    from helpers.frontend import make_task

    from damocles_ext.protocol.jsonl import task_to_json

    task = tmp_path / "task.json"
    task.write_bytes(task_to_json(make_task(1000, stage="window_post")))
    done = _dext("verify", "winning_post", "--request", str(task), "--output", str(task))
    assert done.returncode == 2
    assert done.stderr.rstrip().endswith(
        "StackedDrgWindow2KiBV1_2 is a WindowPoSt proof type: use `verify window_post`"
    ), done.stderr
    done = _dext("prove", "winning_post", "--request", str(task), "-c", EXAMPLE)
    assert done.returncode == 2 and "use `prove window_post`" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["prove", "verify"])
def test_an_input_file_with_no_end_is_refused_not_read_into_memory(command: str):
    # /dev/zero, or a sealed sector given by mistake: refused once past any task's size.
    args = ["-c", EXAMPLE] if command == "prove" else ["--output", "/dev/zero"]
    stderr = _usage_error(command, "window_post", "--request", "/dev/zero", *args)
    assert "request file /dev/zero holds over 256 MiB" in stderr, stderr


def test_simulate_help_says_miners_is_a_count_and_shows_every_default():
    import argparse

    from damocles_ext.commands import simulate

    parser = simulate.add_parser(argparse.ArgumentParser().add_subparsers())
    for action in parser._actions:
        if action.default in (None, False, argparse.SUPPRESS):
            continue
        default = action.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        # "(default 4)", or "machine (default: ...)" where the choices are explained.
        assert f"default {shown}" in action.help or f"{shown} (default:" in action.help, (
            action.option_strings,
            action.help,
        )
    miners = next(a for a in parser._actions if "--miners" in a.option_strings)
    assert miners.help.startswith("how many miners") and "ids" not in miners.help


def test_status_help_shows_a_single_percent_sign():
    done = _dext("status", "--help")
    assert done.returncode == 0
    assert "%%" not in done.stdout and "CPU%" in done.stdout


def test_the_example_configs_winning_post_child_follows_its_own_gpu_lock_advice():
    from damocles_ext.config import load_config

    text = Path(EXAMPLE).read_text()
    assert (
        "For a [[WinPost]] table on GPUs that also run\n# WindowPoSt, false is what we advise"
        in text
    )
    children = load_config(EXAMPLE).children
    window_gpus = {c.gpu for c in children if c.stage == "window_post"}
    shared = [c for c in children if c.stage == "winning_post" and c.gpu in window_gpus]
    assert shared, "the example no longer shows a WinningPoSt child on a WindowPoSt GPU"
    for child in shared:
        assert f"gpu:{child.gpu}" not in child.locks, child


@pytest.fixture(scope="module")
def sectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 2KiB sectors of miner 1000 and a native-prover config, in one directory."""
    work = tmp_path_factory.mktemp("prove")
    (work / "native.cfg").write_text('[[WdPost]]\nPlugin = "native"\n')
    done = _dext("sectors", "create", "--proof-type", "StackedDrgWindow2KiBV1_2", "--count", "4",
                 "--miner", "1000", "--out", str(work / "s"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return work


SEED = "11" * 32


def test_the_native_provers_progress_ends_complete(sectors: Path):
    done = _dext("prove", "window_post", "--manifest", "s/manifest.json", "--seed", SEED,
                 "-c", "native.cfg", "-o", "out.json", cwd=sectors)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # stderr is a pipe: plain lines; the last one is the prover's phase, finished.
    assert done.stderr.splitlines()[-1].startswith("window_post window_post: 4/4 (100%) after ")


def test_prove_to_a_full_stdout_exits_1_saying_so_without_a_traceback(sectors: Path):
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "damocles_ext", "prove", "window_post", "--manifest",
             "s/manifest.json", "--seed", SEED, "-c", "native.cfg", "--no-progress"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False, cwd=sectors,
        )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert "cannot write the output to stdout: No space left on device" in done.stderr


def test_prove_says_a_faulty_sector_means_no_proof_though_it_exits_0(sectors: Path):
    (sectors / "s" / "sealed" / "s-t01000-2").rename(sectors / "moved")
    try:
        done = _dext("prove", "window_post", "--manifest", "s/manifest.json", "--seed", SEED,
                     "-c", "native.cfg", "--no-progress", cwd=sectors)  # fmt: skip
    finally:
        (sectors / "moved").rename(sectors / "s" / "sealed" / "s-t01000-2")
    assert done.returncode == 0, done.stderr
    assert '"proofs":[]' in done.stdout and '"faults":[2]' in done.stdout
    # One line: the supervisor's warning of the faults is prove's own line here; why, the
    # prover's log says (its lines are info).
    assert done.stderr == (
        "1 faulty sector: 2; no proof: prove again without them (--sectors with --manifest);"
        " --log-level info shows why (the prover's log)\n"
    )
    assert "faulty sectors and no proof" in _dext("prove", "--help").stdout


def test_prove_at_log_level_info_shows_why_each_sector_is_faulty(sectors: Path):
    # It showed the numbers only, at every level: a lost file looked like a wrong comm_r.
    (sectors / "s" / "sealed" / "s-t01000-2").rename(sectors / "moved")
    try:
        done = _dext("prove", "window_post", "--manifest", "s/manifest.json", "--seed", SEED,
                     "-c", "native.cfg", "--no-progress", "--log-level", "info", cwd=sectors)  # fmt: skip
    finally:
        (sectors / "moved").rename(sectors / "s" / "sealed" / "s-t01000-2")
    assert done.returncode == 0, done.stderr
    sealed = sectors / "s" / "sealed" / "s-t01000-2"
    assert f"sector 2 is faulty: cannot open sealed file {sealed}: No such file" in done.stderr
    assert done.stderr.count("faulty sector") == 1, done.stderr  # prove's line, not a twin
    assert done.stderr.endswith(
        "1 faulty sector: 2; no proof: prove again without them (--sectors with --manifest)\n"
    )


def test_a_partition_of_faulty_sectors_is_said_in_one_short_line_ending_with_what_to_do(capsys):
    # Every one listed made a 13 KB line for a full partition, its advice at the very end.
    import argparse

    from damocles_ext.commands.prove import _emit
    from damocles_ext.tasks import WindowPoStOutput

    faults = list(range(100_000, 102_349))
    _emit(WindowPoStOutput(proofs=[], faults=faults), None, argparse.Namespace(manifest=None, comm_r=None))  # fmt: skip
    out, err = capsys.readouterr()
    assert err == (
        "2349 faulty sectors: " + ", ".join(str(f) for f in faults[:20]) + " and 2329 more (all"
        " of them in the output's faults); no proof: prove again without them (leave them out"
        " of the task's replicas)\n"
    )
    assert json.loads(out)["faults"] == faults  # the output holds them all


def test_an_observer_plugin_is_listed_with_its_hooks_not_as_zero_provers(tmp_path: Path):
    from helpers.child import child_env, make_plugin_dist

    source = (ROOT / "examples" / "dext-alerts-plugin" / "dext_alerts" / "__init__.py").read_text()
    make_plugin_dist(tmp_path, dist="dext-alerts-plugin", module="dext_alerts_listed",
                     source=source, entry_point="alerts")  # fmt: skip
    done = _dext("plugins", env=child_env([tmp_path]))
    assert done.returncode == 0, done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("alerts: ")]
    assert line.startswith(
        "alerts: observer of dext_child_exited, dext_request_finished, from dext-alerts-plugin 0.1"
    ), line
    assert "testing: 2 prover(s), from" in done.stdout  # prover plugins as before
    as_json = _dext("plugins", "--json", env=child_env([tmp_path]))
    import json

    rows = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert rows["alerts"]["provers"] == []
    assert rows["alerts"]["hooks"] == ["dext_child_exited", "dext_request_finished"]
    assert rows["testing"]["hooks"] == []


def test_the_alerts_example_has_a_readme_and_contributing_says_how_to_lint():
    readme = (ROOT / "examples" / "dext-alerts-plugin" / "README.md").read_text()
    assert "pip install ./examples/dext-alerts-plugin" in readme and "DEXT_ALERT_WEBHOOK" in readme
    assert ".venv/bin/ruff check ." in (ROOT / "CONTRIBUTING.md").read_text()


PRINTING_PLUGIN = """
from damocles_ext.hookspecs import hookimpl

print("printed as the plugin is imported")

@hookimpl
def dext_request_finished(request, outcome, duration, slack):
    print("printed by an observer as a request ends")
"""


def test_a_plugin_that_prints_never_reaches_the_protocol_or_the_output(tmp_path: Path):
    from helpers.child import child_env, make_plugin_dist
    from helpers.frontend import make_task

    from damocles_ext.protocol.jsonl import task_to_json

    make_plugin_dist(tmp_path, dist="printing", module="printing_plugin", source=PRINTING_PLUGIN)
    env = child_env([tmp_path])
    cfg = tmp_path / "echo.cfg"
    cfg.write_text('[[WdPost]]\nPlugin = "echo"\n')
    (tmp_path / "task.json").write_bytes(task_to_json(make_task()))
    # serve: damocles-manager reads the first line of stdout as the ready line, and then answers.
    serve = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "serve", "window_post", "-c", str(cfg)],
        input=b"", capture_output=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout == b"window_post processor ready\n"
    assert b"printed as the plugin is imported" in serve.stderr
    # prove -c: stdout is the output JSON alone, also with "-o -".
    for extra in ((), ("-o", "-")):
        done = _dext("prove", "window_post", "--request", "task.json", "-c", "echo.cfg",
                     "--no-progress", *extra, cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith('{"proofs":') and done.stdout.count("\n") == 1, done.stdout
        assert "printed as the plugin is imported" in done.stderr
        assert "printed by an observer as a request ends" in done.stderr
    assert not (tmp_path / "-").exists()


def test_ctrl_c_while_the_commands_are_loaded_ends_quietly_with_130():
    # The parser imports its command's module (tens of ms): a SIGINT then, as an impatient
    # operator sends it, is the same quiet exit 130 as one during the command. SIGINT as a shell
    # leaves it: Python raises no KeyboardInterrupt if it was ignored when it started (as it is
    # for a test runner started in the background, or under nohup).
    code = (
        "import signal, damocles_ext.cli as cli\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "build = cli.build_parser\n"
        "def interrupted(argv=None):\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    return build(argv)\n"
        "cli.build_parser = interrupted\n"
        "raise SystemExit(cli.main(['plugins']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False, text=True
    )
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("unbuffered", [True, False])
def test_stdout_stays_unbuffered_under_python_u_and_buffered_without(unbuffered: bool):
    # `python -u` (or PYTHONUNBUFFERED): what a command writes is out at once, also when the
    # process then dies before it could flush; without it, stdout keeps its buffer.
    code = (
        "import os, sys, damocles_ext.cli as cli\n"
        "cli._guard_stdio()\n"
        "sys.stdout.write('written')\n"
        "os._exit(0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, *(["-u"] if unbuffered else []), "-c", code],
        capture_output=True,
        timeout=60,
        check=False,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("written" if unbuffered else "")


@pytest.mark.parametrize(
    ("args", "option", "what"),
    [
        (["check-config", ""], "FILE", "a file"),
        (["check-config", "-c", ""], "-c/--config", "a file"),
        (["run", "--conf-dir", ""], "--conf-dir", "a directory"),
        (
            ["prove", "window_post", "--request", "t.json", "-c", EXAMPLE, "--dump-dir", ""],
            "--dump-dir",
            "a directory",
        ),
        (["prove", "window_post", "--request", ""], "--request", "a file"),
        (["verify", "window_post", "--request", "t.json", "--output", ""], "--output", "a file"),
        (["wdpost", "list", "--jobs", "sqlite:///j.db", "--conf-dir", ""], "--conf-dir", "a directory"),
        (["worker", "--worker-config", ""], "--worker-config", "a file"),
        (
            ["sectors", "create", "--proof-type", "StackedDrgWindow2KiBV1_2", "--count", "1",
             "--miner", "1", "--out", ""],
            "--out",
            "a directory",
        ),
    ],
    ids=["check-config", "config", "conf-dir", "dump-dir", "request", "output", "wdpost",
         "worker-config", "sectors-out"],
)  # fmt: skip
def test_an_empty_path_is_refused_naming_the_option_not_taken_for_the_current_directory(
    args: list[str], option: str, what: str, tmp_path: Path, monkeypatch, capsys
):
    from damocles_ext import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    assert f"argument {option}: empty; give the path of {what}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran


def test_check_config_json_of_a_file_whose_name_is_not_utf8_writes_it_as_json_escapes(
    tmp_path: Path,
):
    path = os.fsencode(tmp_path) + b"/ext-prover-\xff.cfg"
    with open(path, "w") as f:
        f.write('[[WdPost]]\nPlugin = "echo"\n')
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "check-config", "--json", path],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"\\udcff" in done.stdout
    data = json.loads(done.stdout)
    assert os.fsencode(data["source"]) == path  # the same bytes back
    assert data["children"][0]["plugin"] == "echo"


def test_text_output_the_locale_cannot_encode_is_written_not_a_traceback(tmp_path: Path):
    # PYTHONIOENCODING=utf-8 gives stdout the strict error handler of a UTF-8 locale such as
    # en_US.UTF-8 (which refuses a surrogate); =ascii the encoding of a locale of another script.
    root = os.fsencode(tmp_path) + b"/tmp-\xff"
    (tmp_path / "c.cfg").write_text('[[WdPost]]\nPlugin = "echo"\nGpus = [0]\n')
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "DAMOCLES_EXT_TMP_ROOT": root}
    done = subprocess.run(
        [sys.executable, "-m", "damocles_ext", "check-config", "-c", tmp_path / "c.cfg"],
        capture_output=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"TMPDIR=" + root + b"/window_post-gpu0/" in done.stdout  # the path's own bytes

    from test_jobs_rules import make_input

    from damocles_ext.jobs import rules
    from damocles_ext.jobs.store import JobStore

    url = f"sqlite:///{tmp_path}/jobs.db"
    with JobStore.open(url) as store:
        store.create(make_input(), time.time())
        store.allocate(rules.AllocationSpec((), ()), 1, "gpu-\u00e9", time.time())
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    for args in (["wdpost", "list", "--jobs", url], ["status", "--jobs", url]):
        done = subprocess.run(
            [sys.executable, "-m", "damocles_ext", *args],
            capture_output=True, check=False, timeout=60, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert b"gpu-\\xe9" in done.stdout and b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["check-config", EXAMPLE, "other.cfg"], "check-config"),
        (["status", "--json", "--bogus"], "status"),
        (["wdpost", "list", "--jobs", "sqlite:///j.db", "--bogus"], "wdpost list"),
    ],
    ids=["check-config", "status", "wdpost-list"],
)
def test_an_unrecognized_argument_is_blamed_on_the_subcommand_given_with_its_usage(
    args: list[str], command: str
):
    stderr = _usage_error(*args)
    assert stderr.startswith(f"usage: damocles-ext {command} [-h]"), stderr
    assert f"damocles-ext {command}: error: unrecognized arguments: {args[-1]}\n" in stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["check-config", "--conf-dri", "/etc/x"], "--conf-dri (did you mean --conf-dir?)"),
        (["worker", "--maneger", "h:1789"], "--maneger h:1789 (did you mean --manager?)"),
        (["serve", "window_post", "--conf-dri", "x", "--log-levl=debug"],
         ("--conf-dri x --log-levl=debug (did you mean --conf-dir for --conf-dri, --log-level for"
          " --log-levl?)")),
    ],
    ids=["check-config", "worker", "serve-two"],
)  # fmt: skip
def test_a_mistyped_option_is_said_with_the_option_it_is_close_to(args: list[str], said: str):
    stderr = _usage_error(*args)
    assert f"damocles-ext {args[0]}: error: unrecognized arguments: {said}\n" in stderr, stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [(["check-config", "-c", "x.cfg", "--log-format", "json"],
      ("argument FILE: not allowed with argument -c/--config (--log-format is not an option of"
       " damocles-ext check-config: --log-format is an option of damocles-ext serve, run, prove"
       " and 2 more)")),
     (["check-config", "-c", "x.cfg", "--conf-dri", "d"],
      "(--conf-dri is not an option of damocles-ext check-config: did you mean --conf-dir?)"),
     (["run", "--conf-dri", "/etc/x"],
      ("one of the arguments -c/--config --conf-dir is required (--conf-dri is not an option of"
       " damocles-ext run: did you mean --conf-dir?)")),
     (["coordinator", "--jbos", "sqlite:///x"],
      ("the following arguments are required: --jobs (--jbos is not an option of damocles-ext"
       " coordinator: did you mean --jobs?)")),
     (["check-config", "--conf-dri=/x"],
      ("is required (--conf-dri is not an option of damocles-ext check-config: did you mean"
       " --conf-dir?)"))],
    ids=["foreign", "mistyped", "run-required", "coordinator-required", "check-config-equals"],
)  # fmt: skip
def test_an_option_the_command_does_not_take_is_named_when_argparse_stops_at_another_error(
    args: list[str], said: str
):
    # argparse stops at what it could not fit (the option's value taken for the positional
    # FILE; a required argument the mistyped option left missing) before it would say the
    # option is unknown: the error names the option, the mistake to fix, and the close one.
    stderr = _usage_error(*args)
    assert said in stderr, stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [(["worker", "--manager", "h:1", "-c", "x.cfg", "--miner", "1000"],
      ("unrecognized arguments: --miner 1000 (--miner is an option of damocles-ext sectors"
       " create; did you mean --allowed-miners?)\n")),
     (["wdpost", "list", "--miner", "1000"],
      ("(--miner is not an option of damocles-ext wdpost list: --miner is an option of"
       " damocles-ext sectors create)\n")),
     (["serve", "window_post", "--count", "3"],
      "unrecognized arguments: --count 3 (--count is an option of damocles-ext sectors create)\n"),
     (["sectors", "create", "--manager", "h:1"],
      ("(--manager is not an option of damocles-ext sectors create: --manager is an option of"
       " damocles-ext worker, wdpost list, wdpost reset and 2 more)\n")),
     (["serve", "--sectors"],
      ("(--sectors is not an option of damocles-ext serve: --sectors is an option of"
       " damocles-ext prove)\n")),
     (["sectors", "find", "--sectors"],
      ("(--sectors is not an option of damocles-ext sectors find: --sectors is an option of"
       " damocles-ext prove)\n"))],
    ids=["given-already", "wdpost-list", "serve-count", "sectors-create", "serve", "sectors-find"],
)  # fmt: skip
def test_an_option_of_another_command_is_said_to_be_its_and_not_taken_for_a_typo(
    args: list[str], said: str
):
    # difflib at 0.75 took these for typos of an option of the command, or of one given
    # already: --miner for --manager, --count for --connect, --sectors for --store. Each is
    # another command's option: that is said, with an option of the command that holds the
    # word (--allowed-miners) if any.
    stderr = _usage_error(*args)
    assert stderr.endswith(said), stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [(["check-config", "--CONF-DIR", "/x"],
      "check-config: error: unrecognized arguments: --CONF-DIR (did you mean --conf-dir?)\n"),
     (["check-config", "--conf_dir", "/x"],
      "check-config: error: unrecognized arguments: --conf_dir (did you mean --conf-dir?)\n"),
     (["status", "--", "--jsn"], "damocles-ext status: error: unrecognized arguments: -- --jsn\n"),
     (["--bogus", "status", "--jsn"],
      "damocles-ext: error: unrecognized arguments: --bogus --jsn (did you mean --json?)\n")],
    ids=["case", "underscore", "after-double-dash", "before-and-after"],
)  # fmt: skip
def test_the_option_meant_is_found_whatever_its_case_not_after_double_dash_and_in_each_parser(
    args: list[str], said: str
):
    # difflib is case-sensitive (--CONF-DIR got no hint); what follows `--` is no option (it
    # got one); with extras before and after the subcommand only the top parser's options were
    # looked at (--jsn, a typo of status's --json, got none).
    stderr = _usage_error(*args)
    assert stderr.endswith(said), stderr


def test_an_abbreviated_option_of_the_command_is_not_called_foreign():
    # --conf-di is argparse's abbreviation of --conf-dir: the error is the real one, alone.
    stderr = _usage_error("check-config", "-c", "x.cfg", "--conf-di", "d")
    assert stderr.endswith("error: argument --conf-dir: not allowed with argument -c/--config\n")


@pytest.mark.parametrize(
    ("args", "said"),
    [(["--json", "status"],
      "--json (--json is an option of damocles-ext status: put it after the command)"),
     (["wdpost", "--all", "list", "--jobs", "sqlite:///j.db"],
      "--all (--all is an option of damocles-ext wdpost list: put it after the command)"),
     (["--json", "status", "--json"],
      ("--json (--json is an option of damocles-ext status, given after it too: leave out the"
       " one before the command)")),
     (["wdpost", "--all", "list", "--all", "--jobs", "sqlite:///j.db"],
      ("--all (--all is an option of damocles-ext wdpost list, given after it too: leave out"
       " the one before the command)"))],
    ids=["before", "before-list", "before-and-after", "before-and-after-list"],
)  # fmt: skip
def test_an_option_given_before_its_subcommand_is_not_blamed_on_that_subcommand(args, said):
    # The subcommand takes it (its usage lists it): it was only given in the wrong place, and
    # the error says where it goes (it said only "unrecognized arguments: --json"). Given after
    # it as well, the one before was blamed on the subcommand, which had taken the other, with
    # the advice to put it after the command, where it was already.
    stderr = _usage_error(*args)
    assert stderr.endswith(f"damocles-ext: error: unrecognized arguments: {said}\n"), stderr


def test_a_word_after_the_subcommand_that_repeats_its_name_is_blamed_on_the_subcommand():
    # Only an option given before the subcommand too is the top command's to blame; a stray word
    # after it that happens to be the subcommand's own name is the subcommand's.
    stderr = _usage_error("status", "status")
    assert stderr.endswith("damocles-ext status: error: unrecognized arguments: status\n"), stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [(["chek-config", "--conf-dir", "x"], "'worker') (did you mean check-config?)\n"),
     (["statu", "--json"], "'worker') (did you mean status?)\n"),
     (["wdpost", "lst", "--jobs", "sqlite:///j.db"], "'remove-all') (did you mean list?)\n"),
     (["Check_Config", "-c", "x"], "'worker') (did you mean check-config?)\n"),
     (["xyz", "--json"], "'coordinator', 'worker')\n")],
    ids=["check-config", "status", "wdpost-list", "case-and-underscore", "nothing-close"],
)  # fmt: skip
def test_a_mistyped_subcommand_is_said_with_the_one_it_is_close_to_and_no_option_called_foreign(
    args: list[str], said: str
):
    # The options after a mistyped subcommand were all called foreign to damocles-ext ("--json
    # is not an option of damocles-ext: --json is an option of ... status"): the parser cannot
    # know which subcommand they were for; the subcommand is the mistake to fix.
    stderr = _usage_error(*args)
    assert stderr.endswith(said), stderr
    assert "not an option" not in stderr, stderr


def test_an_option_before_the_subcommand_whose_value_was_taken_for_it_is_said():
    # `--socket s status`: argparse takes s for the subcommand; the option before it is the
    # mistake (the subcommand's, given before its name), and is said with where it belongs.
    stderr = _usage_error("--socket", "s", "status")
    assert stderr.endswith(
        "'worker') (--socket is not an option of damocles-ext: --socket is an option of"
        " damocles-ext run, prove, status and 1 more)\n"
    ), stderr


def test_check_config_json_is_utf8_json_whatever_the_locales_encoding(tmp_path: Path):
    (tmp_path / "c.cfg").write_text(
        '[[WdPost]]\nPlugin = "echo"\nLocks = ["gpu-\u00e9", "x-\U0001f600"]\n', encoding="utf-8"
    )
    for encoding in ("ascii", "latin-1"):
        done = subprocess.run(
            [sys.executable, "-m", "damocles_ext", "check-config", "--json", "-c", tmp_path / "c.cfg"],
            capture_output=True, check=False, timeout=60,
            env={**os.environ, "PYTHONIOENCODING": encoding},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout.decode("utf-8"))
        assert "gpu-\u00e9" in json.dumps(doc, ensure_ascii=False), doc


def test_check_config_says_each_child_on_one_line_whatever_its_values_hold(tmp_path: Path):
    # A line break or an ESC in an Envs or Args value split a child's line or drove the terminal.
    (tmp_path / "c.cfg").write_text(
        '[[WdPost]]\nBin = "/bin/true"\nArgs = ["a\\nb"]\nEnvs = { X = "\\u001b[2Jy" }\n'
    )
    done = _dext("check-config", "-c", str(tmp_path / "c.cfg"))
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert "\x1b" not in line and "\\x1b[2Jy" in line and "a\\nb" in line, line


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc"])
def test_a_bad_shutdown_grace_is_the_same_clear_usage_error_for_every_command(value, capsys):
    # The coordinator declares its own --shutdown-grace (its default, 10 s, bounds the answers
    # to RPC calls in flight, not proofs: no add_shutdown_arg), but checks it as the others do.
    from damocles_ext import cli

    said = {}
    for args in (["serve", "window_post", "-c", "x"], ["run", "-c", "x"], ["worker"],
                 ["coordinator", "--jobs", "sqlite:///x.db"]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            cli.main([*args, "--shutdown-grace", value])
        assert exited.value.code == 2, args
        said[args[0]] = capsys.readouterr().err.splitlines()[-1].partition(": error: ")[2]
    assert said["coordinator"].startswith("argument --shutdown-grace: "), said
    assert len(set(said.values())) == 1, said


@pytest.mark.parametrize(
    "args",
    [["sectors", "find", "f01000", "5", "--attached", "a=/x"], ["prove", "window_post"],
     ["worker"], ["coordinator", "--jobs", "sqlite:///x.db"]],
    ids=["sectors-find", "prove", "worker", "coordinator"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("value", "wrong"),
    [("nonsense", "'nonsense' is not an RPC address"),
     ("host:99999", "the port in 'host:99999' must be a number from 1 to 65535"),
     # The source node's server, not a coordinator, is the one to put TLS in front of.
     ("https://node:1789", ("'https://node:1789': only http:// is spoken here (no TLS); put a"
      " TLS-terminating proxy in front of the server at that address if the network needs one")),
     # Said as "cannot connect" (exit 1), and read as [::1]:1.
     ("a b:1", "'a b' is not a host name (it holds ' ')"),
     ("[::1:1", "'[::1:1': an IPv6 address is written in [ and ], as [::1]:1789")],
)  # fmt: skip
def test_a_bad_proxy_address_is_a_usage_error_naming_the_option_and_the_forms(
    args, value, wrong, capsys, tmp_path, monkeypatch
):
    # It was said without the option's name ("error: 'nonsense' is not an RPC address"), and
    # only once the command ran (`sectors find`, `coordinator`) or a job's sector was looked for.
    from damocles_ext import cli

    monkeypatch.chdir(tmp_path)  # before, the coordinator went on to create its x.db
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--proxy", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    said = err.splitlines()[-1].partition(": error: ")[2]
    assert said.startswith(f"argument --proxy: {wrong}"), err
    assert said.endswith("; give HOST:PORT (as damocles-manager --proxy takes it),"
                         " http://HOST:PORT[/rpc/v0] or a multiaddr such as /ip4/1.2.3.4/tcp/1789")  # fmt: skip
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["worker", "coordinator", "run", "serve"])
def test_the_long_running_commands_help_names_every_signal_that_stops_them(command):
    # stop_signals(): SIGHUP stops them gracefully too, unless it is ignored (nohup), when it
    # is left ignored: the help says both, as serve's did.
    done = _dext(command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "SIGTERM, SIGINT or SIGHUP (unless ignored)" in text.split("options:")[0], text


def test_an_option_given_twice_with_different_values_is_refused_and_nothing_is_done(
    sectors: Path,
):
    # argparse kept the last of a repeated option silently: `-o a.json -o b.json` wrote b.json,
    # `check-config -c nope -c native.cfg` checked native.cfg and exited 0.
    prove = ["prove", "window_post", "--manifest", "s/manifest.json", "--seed", SEED,
             "-c", "native.cfg", "--no-progress"]  # fmt: skip
    done = _dext(*prove, "-o", "a.json", "--output=b.json", cwd=sectors)
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(
        "damocles-ext prove: error: argument -o/--output: given twice ('a.json' and 'b.json'):"
        " give it once\n"
    ), done.stderr
    assert not (sectors / "a.json").exists() and not (sectors / "b.json").exists()
    stderr = _usage_error("check-config", "-c", "nope", "-c", EXAMPLE)
    assert f"argument -c/--config: given twice ('nope' and '{EXAMPLE}'): give it once" in stderr
    # The same value twice is one value; an option meant to repeat (--option) still repeats.
    done = _dext("check-config", "-c", EXAMPLE, "--config", EXAMPLE)
    assert done.returncode == 0, done.stderr
    from damocles_ext.cli import build_parser

    args = build_parser().parse_args(
        ["coordinator", "--jobs", "sqlite:///j.db", "--jobs", "sqlite:///j.db",
         "--store", "a=/a", "--store", "b=/b"]
    )  # fmt: skip
    assert args.jobs == "sqlite:///j.db" and len(args.store) == 2, args
