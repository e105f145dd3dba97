"""check-config on damocles-manager's own ext-prover.cfg, whose entries run `damocles-ext serve`:
it warns when an entry's `Concurrent` (what damocles-manager sends at once, default 1) is below
the slots the config that serve reads supervises for that stage."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from damocles_ext.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _damocles_ext_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on damocles-manager's machine, `Bin = "damocles-ext"` must be found on PATH: check-config
    # refuses a Bin it cannot find. The installed script sits beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join([bindir, os.environ.get("PATH", "")]))


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """Run check-config; its warnings (exit code 0 asserted)."""
    assert main(["check-config", *args]) == 0
    err = capsys.readouterr().err
    return [line.removeprefix("warning: ") for line in err.splitlines()]


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[str], list[str]]:
    """Run check-config; (its warnings, its errors), exit code 2 asserted: what it says of an
    entry whose serve will exit 2 at its start is an error."""
    assert main(["check-config", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    errors = [line.split(" error: ", 1)[1] for line in err if " error: " in line]
    if errors and re.fullmatch(r".* has \d+ errors:", errors[0]):  # then one a line, indented
        errors = [line.removeprefix("  ") for line in err if line.startswith("  ")]
    return [w.removeprefix("warning: ") for w in err if w.startswith("warning: ")], errors


def _ours(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ext-prover.cfg"
    path.write_text(text)
    return path


OURS = """
[[WdPost]]
Plugin = "echo"
Gpus = [0, 1, 2]

[[WinPost]]
Plugin = "echo"
Concurrent = 2
"""


def test_an_entry_below_the_slots_serve_supervises_is_warned_about_with_what_to_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ours = _ours(tmp_path / "ours", OURS)
    manager = tmp_path / "manager" / "ext-prover.cfg"
    manager.parent.mkdir()
    manager.write_text(f"""
[[WdPost]]
Bin = "damocles-ext"
Args = ["serve", "window_post", "-c", "{ours}"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "--conf-dir", "{ours.parent}"]
Concurrent = 2
""")
    warnings = [w for w in _check(capsys, "-c", str(manager)) if "Concurrent" in w]
    assert warnings == [
        (
            f"{manager}: WdPost[0] has Concurrent = 1 (damocles' default), but the config its"
            f" `damocles-ext serve window_post` reads ({ours}) supervises 3 window_post slots:"
            " damocles-manager sends it at most 1 request(s) at once, so 2 slot(s) stay idle; set"
            " Concurrent = 3 (or more) in that table"
        )
    ]

    # Raised to the slots: no warning; the WinPost entry (2 of 2) never had one.
    manager.write_text(manager.read_text().replace('window_post", "-c", "', 'window_post", "--config=', 1)
                       .replace("[[WinPost]]", "Concurrent = 3\n\n[[WinPost]]"))  # fmt: skip
    assert not [w for w in _check(capsys, "--conf-dir", str(manager.parent)) if "Concurrent" in w]


def test_the_slots_of_a_split_window_post_are_its_vanilla_and_snark_slots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ours = _ours(
        tmp_path / "ours",
        """
[[WdPostVanilla]]
Plugin = "native"
Concurrent = 4

[[WdPostSnark]]
Plugin = "native"
Gpus = [0, 1]
""",
    )
    manager = tmp_path / "manager.cfg"
    manager.write_text(f"""
[[WdPost]]
Bin = "{shutil.which("damocles-ext") or "damocles-ext"}"
Args = ["serve", "window_post", "--conf-dir", "{ours.parent}", "--deadline-after", "35m"]
Concurrent = 5
""")
    [warning] = [w for w in _check(capsys, str(manager)) if "Concurrent" in w]
    assert "has Concurrent = 5, but" in warning and "supervises 6 window_post slots" in warning
    assert warning.endswith("set Concurrent = 6 (or more) in that table")


def test_serve_entries_that_cannot_be_checked_or_would_fail_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    ours = _ours(tmp_path / "ours", OURS)
    manager = tmp_path / "manager.cfg"
    manager.write_text(f"""
[[WdPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "-c", "{ours}"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "-c", "{tmp_path}/missing.cfg"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "--connect", "{tmp_path}/nobody.sock"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "--connect", "--restart-delay", "5"]
""")
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert [w for w in warnings if "damocles-ext serve" in w] == [
        (
            f"{manager}: WdPost[0] runs `damocles-ext serve winning_post -c {ours}`, but"
            " damocles-manager sends this table's processor window_post requests; serve window_post"
            " instead"
        ),
        (
            f"{manager}: WinPost[0] runs `damocles-ext serve winning_post -c {tmp_path}/missing.cfg`,"
            " but its config cannot be used, so its Concurrent cannot be checked:"
            f" {tmp_path}/missing.cfg: cannot read the config file: no such file (check the path);"
            f" run damocles-ext check-config on {tmp_path}/missing.cfg"
        ),
    ]
    assert errors == [
        (
            f"{manager}: WinPost[1] runs `damocles-ext serve winning_post`, which will exit 2: one"
            " of the arguments -c/--config --conf-dir --connect --jobs is required: children of"
            " serve's own (-c FILE, --conf-dir DIR), a running `damocles-ext run` (--connect), or"
            " a job store that workers prove from (--jobs URL); fix its Args"
        ),
        # WinPost[2], --connect: no `run` answers at its socket, so there is nothing to compare
        (
            f"{manager}: WinPost[3] runs `damocles-ext serve winning_post --connect"
            " --restart-delay 5`, which will exit 2: --restart-delay does not apply to serve"
            " --connect: the `damocles-ext run` it connects to supervises the children; give"
            " --restart-delay to that `run` instead; fix its Args"
        ),
    ]


def test_an_entry_whose_serve_has_an_empty_path_is_said_to_be_refused_by_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # serve refuses an empty --conf-dir or -c: the check must say so, not read the current
    # directory as its config.
    manager = tmp_path / "manager.cfg"
    manager.write_text(
        '[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--conf-dir", ""]\n'
        '[[WinPost]]\nBin = "damocles-ext"\nArgs = ["serve", "winning_post", "-c", ""]\n'
    )
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [w for w in warnings if "damocles-ext serve" in w]
    assert errors == [
        (
            f"{manager}: WdPost[0] runs `damocles-ext serve window_post --conf-dir ''`, which"
            " serve refuses (argument --conf-dir: empty; give the path of a directory); fix its"
            " Args"
        ),
        (
            f"{manager}: WinPost[0] runs `damocles-ext serve winning_post -c ''`, which serve"
            " refuses (argument -c/--config: empty; give the path of a file); fix its Args"
        ),
    ]


def test_our_own_config_gets_no_such_warning(capsys: pytest.CaptureFixture[str]):
    warnings = _check(capsys, "-c", str(ROOT / "ext-prover.cfg.example"))
    assert not [w for w in warnings if "serve" in w]


def test_the_readme_manager_snippet_sets_concurrent_and_passes_its_own_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it as damocles-manager's ext-prover", 1)[1].split("\n## ", 1)[0]
    snippet = re.findall(r"```toml\n(.*?)\n```", section, flags=re.DOTALL)[0]
    wanted = dict(re.findall(r'Args = \["serve", "(\w+)".*?\]\nConcurrent = (\d+)', snippet))
    assert wanted == {"window_post": "8", "winning_post": "1"}
    assert 'Bin = "damocles-ext"' in snippet and "PATH" in section

    # The seed's 8 GPUs for WindowPoSt, one WinningPoSt child: the snippet's numbers.
    ours = _ours(tmp_path / "etc", '[[WdPost]]\nPlugin = "echo"\nGpus = [0, 1, 2, 3, 4, 5, 6, 7]\n'
                 '\n[[WinPost]]\nPlugin = "echo"\n')  # fmt: skip
    manager = tmp_path / "manager.cfg"
    manager.write_text(snippet.replace("/etc/damocles-ext", str(ours.parent)))
    assert not [w for w in _check(capsys, "-c", str(manager)) if "Concurrent" in w]
    # One WindowPoSt slot more than the snippet's Concurrent: warned.
    ours.write_text(ours.read_text().replace("[[WinPost]]", "Concurrent = 2\n\n[[WinPost]]"))
    [warning] = [w for w in _check(capsys, "-c", str(manager)) if "Concurrent" in w]
    assert "supervises 16 window_post slots" in warning


def test_a_connect_entry_is_checked_against_the_run_answering_at_its_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):

    from helpers.frontend import short_socket_dir

    ours = _ours(tmp_path / "ours", OURS)  # 3 window_post slots, 2 winning_post
    with short_socket_dir("m", tmp_path.name) as runtime:
        socket = runtime / "control.sock"
        manager = tmp_path / "manager.cfg"
        manager.write_text(f"""
[[WdPost]]
Bin = "damocles-ext"
Args = ["serve", "window_post", "--connect", "{socket}"]
Concurrent = 2

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "--connect", "{socket}"]
Concurrent = 2
""")
        # Nothing listens yet: nothing to compare with, nothing said.
        assert not [w for w in _check(capsys, "-c", str(manager)) if "Concurrent" in w]

        with _listening(["run", "-c", str(ours), "--socket", str(socket)]):
            warnings = [w for w in _check(capsys, "-c", str(manager)) if "Concurrent" in w]
    assert warnings == [
        (
            f"{manager}: WdPost[0] has Concurrent = 2, but the `damocles-ext run` at {socket}"
            " that its `damocles-ext serve window_post --connect` forwards to supervises 3"
            " window_post slots: damocles-manager sends it at most 2 request(s) at once, so 1"
            " slot(s) stay idle; set Concurrent = 3 (or more) in that table"
        )
    ]  # the WinPost entry's 2 match the run's 2 winning_post slots


@contextlib.contextmanager
def _listening(argv: list[str]) -> Iterator[None]:
    """A damocles-ext process (`run`, `worker`) whose control socket listens, stopped (SIGTERM)
    and waited for at the end."""
    import subprocess
    import threading

    from helpers.frontend import DEXT, dext_env

    proc = subprocess.Popen(
        [*DEXT, *argv], env=dext_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    listening = threading.Event()
    log: list[bytes] = []

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if b"control socket listening on" in line:
                listening.set()
        listening.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert listening.wait(60) and proc.poll() is None, b"".join(log).decode()
        yield
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, b"".join(log).decode()


def test_a_connect_entry_whose_run_has_no_child_of_its_stage_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from helpers.frontend import short_socket_dir

    ours = _ours(tmp_path / "ours", '[[WdPost]]\nPlugin = "echo"\n')  # no [[WinPost]]
    with short_socket_dir("m", tmp_path.name) as runtime:
        socket = runtime / "control.sock"
        manager = tmp_path / "manager.cfg"
        manager.write_text(f"""
[[WdPost]]
Bin = "damocles-ext"
Args = ["serve", "window_post", "--connect", "{socket}"]

[[WinPost]]
Bin = "damocles-ext"
Args = ["serve", "winning_post", "--connect", "{socket}"]
""")
        with _listening(["run", "-c", str(ours), "--socket", str(socket)]):
            _, errors = _refused(capsys, "-c", str(manager))
    # In serve's own words (it exits 2 with them before its ready line).
    assert errors == [
        (
            f"{manager}: WinPost[0] runs `damocles-ext serve winning_post --connect {socket}`, which"
            f" will exit 2: the supervisor at {socket} has no [[WinPost]] child, so it cannot prove"
            " winning_post requests; add a [[WinPost]] table to the config of that `damocles-ext"
            " run` and restart it"
        )
    ], errors


def test_a_connect_entry_at_the_socket_of_a_worker_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import socket as sockets

    from helpers.frontend import empty_store, short_socket_dir

    ours = _ours(tmp_path / "ours", '[[WdPost]]\nPlugin = "echo"\n')
    with short_socket_dir("m", tmp_path.name) as runtime, sockets.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        peer.listen()  # the worker's manager: takes its connection, never answers
        socket = runtime / "w.sock"
        manager = tmp_path / "manager.cfg"
        manager.write_text(f"""
[[WdPost]]
Bin = "damocles-ext"
Args = ["serve", "window_post", "--connect", "{socket}"]
""")
        worker = [
            "worker", "--manager", f"127.0.0.1:{peer.getsockname()[1]}", "-c", str(ours),
            "--attached", f"store-a={empty_store()}", "--socket", str(socket),
        ]  # fmt: skip
        with _listening(worker):
            _, errors = _refused(capsys, "-c", str(manager))
    assert errors == [
        (
            f"{manager}: WdPost[0] runs `damocles-ext serve window_post --connect {socket}`, which"
            f" will exit 2: {socket} is the control socket of a `damocles-ext worker`, which answers"
            " status only and proves the jobs it pulls from its manager, not requests; give"
            " --connect the --socket path of a `damocles-ext run` instead"
        )
    ], errors


def test_an_entry_that_runs_serve_jobs_is_not_checked_against_slots_it_does_not_have(
    tmp_path, capsys
):
    manager = tmp_path / "manager" / "ext-prover.cfg"
    manager.parent.mkdir()
    (manager.parent / "sector-manager.cfg").write_text("[Common]\n")
    # Its --conf-dir is damocles-manager's own directory (sector-manager.cfg), not a config of
    # children: reading an ext-prover.cfg there would be a false warning.
    manager.write_text(
        "[[WdPost]]\n"
        'Bin = "damocles-ext"\n'
        f'Args = ["serve", "window_post", "--jobs", "sqlite:///{tmp_path}/j.db", "--conf-dir",'
        f' "{manager.parent}"]\n'
        "[[WdPost]]\n"
        'Bin = "damocles-ext"\n'
        f'Args = ["serve", "window_post", "--jobs", "sqlite:///{tmp_path}/j.db", "-c", "x.cfg"]\n'
    )
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [w for w in warnings if "WdPost[" in w] and len(errors) == 1, (warnings, errors)
    assert "WdPost[1]" in errors[0] and "-c/--config does not apply to serve --jobs" in errors[0]


@pytest.mark.parametrize(
    ("jobs", "said"),
    [
        ("mysql://x/y", "'mysql' is not supported"),
        ("sqlite:///", "names no file"),
        ("sqlite:////nonexistent/dir/jobs.db", "directory '/nonexistent/dir' does not exist"),
        ("postgresql://u@h/db?sslmod=require", "sslmod"),
    ],
)
def test_an_entry_whose_serve_jobs_url_serve_refuses_is_an_error(tmp_path, capsys, jobs, said):
    # serve exits 2 before its ready line on these: check-config said nothing.
    manager = tmp_path / "ext-prover.cfg"
    manager.write_text(
        f'[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--jobs", "{jobs}"]\n'
    )
    _, errors = _refused(capsys, "-c", str(manager))
    [error] = errors
    assert "which will exit 2: serve --jobs: " in error and said in error, error


def test_a_serve_jobs_url_is_judged_where_serve_will_read_it(tmp_path, capsys, monkeypatch):
    # A relative SQLite path is damocles-manager's directory's, not check-config's: not judged
    # here; a URL serve refuses is an error even beside a relative --conf-dir (which makes the
    # rest a warning: read from another directory than serve's).
    monkeypatch.chdir(tmp_path)
    manager = tmp_path / "ext-prover.cfg"
    manager.write_text(
        '[[WdPost]]\nBin = "damocles-ext"\n'
        'Args = ["serve", "window_post", "--jobs", "sqlite:///state/jobs.db"]\n'
        '[[WdPost]]\nBin = "damocles-ext"\n'
        'Args = ["serve", "window_post", "--jobs", "mysql://x/y", "--conf-dir", "conf"]\n'
    )
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [m for m in warnings + errors if "WdPost[0]" in m], (warnings, errors)
    [error] = [e for e in errors if "WdPost[1]" in e]
    assert "'mysql' is not supported" in error


def test_an_entry_that_runs_serve_jobs_is_an_error_when_serve_will_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """serve --jobs reads its --conf-dir's sector-manager.cfg, and refuses winning_post, before
    its ready line (so damocles-manager's start fails): check-config passed such entries."""
    manager = tmp_path / "manager" / "ext-prover.cfg"
    manager.parent.mkdir()
    # damocles' docs (09.poster-node.md) with a JobLifetime missing its unit, which
    # damocles-manager refuses too ("missing unit in duration").
    (manager.parent / "sector-manager.cfg").write_text(
        "[Common.Proving.WorkerProver]\n"
        "# The maximum number of attempts of the WindowPoSt task, optional, number type\n"
        "JobMaxTry = 2\n"
        "# WindowPoSt task heartbeat timeout, optional, time string type\n"
        'HeartbeatTimeout = "15s"\n'
        "# WindowPoSt task timeout, optional, time string type\n"
        'JobLifetime = "25"\n'
    )
    jobs = f"sqlite:///{tmp_path}/j.db"
    manager.write_text(
        f'[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--jobs", "{jobs}",'
        f' "--conf-dir", "{manager.parent}"]\n'
        f'[[WinPost]]\nBin = "damocles-ext"\nArgs = ["serve", "winning_post", "--jobs", "{jobs}"]\n'
    )
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [w for w in warnings if "--jobs" in w]
    assert errors == [
        (
            f"{manager}: WdPost[0] runs `damocles-ext serve window_post --jobs {jobs} --conf-dir"
            f" {manager.parent}`, which will exit 2: {manager.parent}/sector-manager.cfg:"
            " [Common.Proving.WorkerProver] JobLifetime: '25' is not a Go duration: each number"
            ' needs a unit (ns, us, ms, s, m, h), e.g. "15s" or "25h0m0s"'
        ),
        (
            f"{manager}: WinPost[0] runs `damocles-ext serve winning_post --jobs {jobs}`, which"
            " will exit 2: serve winning_post --jobs: WinningPoSt must stay local: a block's"
            " proof has about 20 s, too little to wait for a job store and a remote worker;"
            " serve winning_post with children of its own (-c or --conf-dir with an"
            " ext-prover.cfg) or --connect"
        ),
    ]


def test_two_entries_serving_one_config_are_warned_about_as_children_started_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # damocles' own 8-GPU practice has one [[WdPost]] per GPU: pointing each at one serve of a
    # Gpus config starts every child once per entry, all of them on the same GPUs.
    ours = _ours(tmp_path / "ours", OURS)
    manager = tmp_path / "manager.cfg"
    entry = f'[[WdPost]]\nBin = "damocles-ext"\nConcurrent = 3\nArgs = ["serve", "window_post", "-c", "{ours}"]\n'
    manager.write_text(entry + entry.replace('"-c", ', '"--conf-dir", ').replace(str(ours), str(ours.parent)))  # fmt: skip
    assert [w for w in _check(capsys, str(manager)) if "serves too" in w] == [
        (
            f"{manager}: WdPost[1] runs `damocles-ext serve window_post --conf-dir {ours.parent}`"
            f" on the config WdPost[0] serves too ({ours}): damocles-manager starts a processor"
            " for each table, so the children of that config (3 window_post slots) start once"
            " per table, on the same GPUs, and neither serve's Locks, GPU lock or queue sees the"
            " other's proofs; keep one table and set its Concurrent to 3 (or more)"
        )
    ]
    # One entry per stage, as the README has it: no such warning.
    manager.write_text(entry + entry.replace("WdPost", "WinPost").replace("window_post", "winning_post"))  # fmt: skip
    assert not [w for w in _check(capsys, str(manager)) if "serves too" in w]


def test_entries_serving_one_config_on_gpus_of_their_own_are_not_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # One [[WdPost]] per GPU (its Envs), each serving a config whose children pin no GPU: each
    # serve's children run on its own GPU. With children that pin theirs, they share them.
    ours = _ours(tmp_path / "ours", '[[WdPost]]\nPlugin = "echo"\n')
    entry = (
        '[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "-c", "{ours}"]\n'
        'Envs = {{ CUDA_VISIBLE_DEVICES = "{gpu}" }}\n'
    )
    manager = tmp_path / "manager.cfg"
    manager.write_text(entry.format(ours=ours, gpu=0) + entry.format(ours=ours, gpu=1))
    assert not [w for w in _check(capsys, str(manager)) if "serves too" in w]
    manager.write_text(entry.format(ours=ours, gpu=0) + entry.format(ours=ours, gpu=0))
    assert [w for w in _check(capsys, str(manager)) if "serves too" in w]
    pinned = _ours(tmp_path / "pinned", OURS)
    manager.write_text(entry.format(ours=pinned, gpu=0) + entry.format(ours=pinned, gpu=1))
    assert [w for w in _check(capsys, str(manager)) if "serves too" in w]


def test_an_entry_whose_serve_reads_the_managers_own_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # `--conf-dir` of damocles-manager's own directory: that serve would start another, for ever.
    manager = _ours(tmp_path / "manager", "")
    manager.write_text(
        f'[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--conf-dir",'
        f' "{manager.parent}"]\n'
    )
    assert main(["check-config", "-c", str(manager)]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {manager}: WdPost[0] runs `damocles-ext serve window_post --conf-dir"
        f" {manager.parent}`, which reads this same file: each serve would start another,"
        " without end." in err
    ), err
    # As `serve --jobs` it reads damocles-manager's directory for its sector-manager.cfg: fine.
    manager.write_text(manager.read_text().replace('"--conf-dir"', '"--jobs", "sqlite:///j.db", "--conf-dir"'))  # fmt: skip
    assert not [w for w in _check(capsys, "-c", str(manager)) if "same file" in w]


def test_two_serve_jobs_entries_listening_on_one_port_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """damocles-manager starts a processor per table: a second `serve --jobs --listen` on the
    port of the first cannot listen and exits 2 before its ready line, failing the start."""
    manager = tmp_path / "manager" / "ext-prover.cfg"
    manager.parent.mkdir()
    jobs = f"sqlite:///{tmp_path}/j.db"

    def entry(listen: str) -> str:
        return (
            f'[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--jobs", "{jobs}",'
            f' "--store", "a={tmp_path}", "--listen", "{listen}"]\nConcurrent = 8\n'
        )

    manager.write_text(entry("127.0.0.1:1790") + entry("0.0.0.0:1790") + entry("127.0.0.1:1791"))
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [w for w in warnings if "--listen" in w] and len(errors) == 1, (warnings, errors)
    assert errors[0].startswith(f"{manager}: WdPost[1] runs `damocles-ext serve window_post")
    assert "which will exit 2: WdPost[0] listens on the same port (1790)" in errors[0]
    assert "keep one table and raise its Concurrent" in errors[0]


@pytest.mark.parametrize(
    ("a", "b", "collide"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "10.0.0.5", False),
        ("0.0.0.0", "127.0.0.1", True),
        ("0.0.0.0", "::1", False),  # an IPv4 wildcard leaves IPv6 addresses free (Linux binds both)
        ("::", "127.0.0.1", True),
        ("0.0.0.0", "::", True),
        ("::0", "10.0.0.5", True),  # '::' written otherwise is still the wildcard
        ("[::1]", "::1", True),
        ("::", "localhost", True),  # a name: as it resolves (from /etc/hosts, no DNS)
        ("localhost", "LOCALHOST", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),  # IPv4-mapped: the IPv4 address
    ],
)
def test_listening_hosts_collide_as_linux_binds_them(a: str, b: str, collide: bool):
    from damocles_ext.commands.check_config import _hosts_collide

    assert _hosts_collide(a, b) is collide
    assert _hosts_collide(b, a) is collide


def _serve_jobs_entry(base: Path, *args: str) -> Path:
    """damocles-manager's file in `base`, its WdPost entry a `serve window_post --jobs` on a
    store in `base`, with `args` after it."""
    manager = base / "manager.cfg"
    argv = ["serve", "window_post", "--jobs", f"sqlite:///{base}/j.db", *args]
    manager.write_text(f'[[WdPost]]\nBin = "damocles-ext"\nArgs = {json.dumps(argv)}\n')
    return manager


def _serve_with_token_file(tmp_path: Path, token_file: str) -> Path:
    """damocles-manager's file, its WdPost entry a `serve --jobs --listen --token-file`."""
    return _serve_jobs_entry(tmp_path, "--store", f"a={tmp_path}", "--listen", "127.0.0.1:0",
                             "--token-file", token_file)  # fmt: skip


def _findings_kept_out(manager: Path) -> dict:
    """check-config's findings on damocles-manager's file `manager`, made by a user to whom
    what the test closed is closed (helpers/kept_out: nobody, when the suite runs as root)."""
    import json

    from helpers.kept_out import said_when_kept_out

    from damocles_ext.commands.check_config import manager_entry_findings
    from damocles_ext.config import load_config

    class Found(Exception):
        pass

    def findings() -> None:
        raise Found(json.dumps(manager_entry_findings(load_config(str(manager)))._asdict()))

    said = said_when_kept_out(findings)
    assert said.startswith("Found: "), said
    return json.loads(said.removeprefix("Found: "))


def _closed_why(closed: str) -> str:
    """What check-config says of a file kept from its user (`closed`: the file itself, mode 0,
    or a directory on its path), run as nobody when the suite runs as root."""
    you = f"you (uid {os.geteuid() or 65534})"
    if closed == "file":
        return f"cannot be read by {you}: it is uid {os.geteuid()}'s, mode 0000"
    return f"cannot be looked at by {you}: a directory on its path is closed to you"


#: How long check-config may take on a token file before the test takes it for waiting on it.
HANG_AFTER = 30.0  # seconds


def _check_config_bounded(manager: Path) -> tuple[int, str]:
    """(exit code, stderr) of check-config on `manager`, run in a child process that is killed
    after HANG_AFTER s: should check-config wait on a token file (a FIFO without a writer), the
    test fails, where an in-process call would hold the test run for ever."""
    import subprocess

    from helpers.frontend import dext_run

    try:
        done = dext_run("check-config", "-c", str(manager), input=b"", timeout=HANG_AFTER)
    except subprocess.TimeoutExpired:
        pytest.fail(f"check-config gave no answer within {HANG_AFTER} s: it waits on the file")
    return done.returncode, done.stderr.decode()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (os.mkfifo, "is a FIFO (named pipe), not a regular file: serve needs a regular file"),
        (lambda p: os.symlink("/dev/zero", p), "is a character device, not a regular file"),
        (lambda p: Path(p).mkdir(), "is a directory, not a regular file"),
        (lambda p: None, "does not exist; create it (the token on its first line"),
        (lambda p: Path(p).write_text(""), "has no token on its first line; write the token"),
        (lambda p: Path(p).write_text("s\u00e9cret\n"), "cannot be sent in an HTTP header"),
    ],
    ids=["fifo", "device", "directory", "missing", "empty", "not-ascii"],
)
def test_a_token_file_serve_cannot_use_is_an_error_never_waited_on(
    tmp_path: Path, make, expected: str
):
    # check-config read the file itself, as it parsed serve's arguments: a FIFO held it for ever
    # (now refused by what it is, from its stat, and opened O_NONBLOCK if at all), and what serve
    # will refuse (exit 2 before its ready line: damocles-manager's start fails) was a warning.
    token = tmp_path / "token"
    make(str(token))
    manager = _serve_with_token_file(tmp_path, str(token))
    code, err = _check_config_bounded(manager)
    assert code == 2, err
    [line] = [line for line in err.splitlines() if "--token-file" in line]
    assert line.startswith(f"damocles-ext check-config: error: {manager}: WdPost[0] runs `"), err
    assert f"--token-file {token}`, which will exit 2: " in line and expected in line, err
    assert repr(str(token)) in line


def test_a_token_file_serve_can_use_gets_nothing_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert not [w for w in _check(capsys, str(_serve_with_token_file(tmp_path, str(token))))
                if "token" in w]  # fmt: skip


@pytest.mark.parametrize("here", ["usable", "missing", "empty"])
def test_a_relative_token_file_is_warned_about_and_not_looked_for_in_the_wrong_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, here: str
):
    # damocles-manager starts serve in its own working directory: what check-config's has at
    # that name (a usable token, nothing, an empty file) says nothing about what serve finds.
    monkeypatch.chdir(tmp_path)
    if here != "missing":
        (tmp_path / "token").write_text("s3cret\n" if here == "usable" else "")
    manager = _serve_with_token_file(tmp_path, "token")
    warnings = [w for w in _check(capsys, str(manager)) if "token" in w]
    assert warnings == [
        (
            f"{manager}: WdPost[0] runs `damocles-ext serve window_post --jobs"
            f" sqlite:///{tmp_path}/j.db --store a={tmp_path} --listen 127.0.0.1:0 --token-file"
            " token`, whose --token-file 'token' is a relative path: serve reads it from"
            " damocles-manager's working directory, which check-config cannot know, so it was"
            " not looked for (not in check-config's own either); write it absolute"
        )
    ]


@pytest.mark.parametrize("closed", ["file", "directory"])
def test_a_token_file_closed_to_this_user_is_a_note_for_damocles_managers_user(closed: str):
    # serve runs as damocles-manager's user, which may read a file that the user running
    # check-config (another one) may not: that is no sign the file is missing or unusable.

    from helpers.kept_out import a_closed_directory

    with a_closed_directory() as directory:
        base = directory.parent
        if closed == "file":
            token = base / "token"
            token.write_text("s3cret\n")
            token.chmod(0)
        else:
            token = directory / "inside"
        manager = _serve_with_token_file(base, str(token))

        found = _findings_kept_out(manager)
    assert found["errors"] == [] and not [w for w in found["warnings"] if "token" in w], found
    [note] = found["notes"]
    why = _closed_why(closed)
    assert note.startswith(f"{manager}: WdPost[0] runs `damocles-ext serve window_post "), note
    assert note.endswith(
        f"--token-file {token}`: its token file {str(token)!r} {why}; serve runs as"
        " damocles-manager's user, so check that user can read it (whether it holds a token was"
        " not seen here)"
    ), note


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "fifo"])
def test_check_config_says_of_a_token_file_what_serve_says_of_it(tmp_path: Path, case: str):
    # check-config had its own reading of the file, with its own words: a missing file "does not
    # exist" there, "cannot read ...: No such file or directory" from serve. Both read it now
    # with serve's own --token-file reading: what follows "which will exit 2:" is serve's error.
    from helpers.frontend import dext_run

    token = tmp_path / "token"
    {"directory": token.mkdir, "empty": lambda: token.write_text(""),
     "fifo": lambda: os.mkfifo(token), "missing": lambda: None}[case]()  # fmt: skip
    manager = _serve_with_token_file(tmp_path, str(token))
    code, err = _check_config_bounded(manager)
    assert code == 2, err
    [line] = [line for line in err.splitlines() if "--token-file" in line]
    said = line.split(f"--token-file {token}`, which will exit 2: ", 1)[1]
    served = dext_run("serve", "window_post", "--jobs", f"sqlite:///{tmp_path}/j.db", "--store",
                      f"a={tmp_path}", "--listen", "127.0.0.1:0", "--token-file", str(token),
                      input=b"", timeout=30)  # fmt: skip
    assert served.returncode == 2, served.stderr
    assert f"argument --token-file: {said}\n" in served.stderr.decode(), (said, served.stderr)


def test_parsing_serves_arguments_keeps_the_token_file_a_path_never_reading_it(tmp_path: Path):
    # serve reads --token-file as its argument is parsed; check-config's parse of the same
    # arguments must not (a FIFO would hold it, a file only damocles-manager's user reads would
    # fail it): it checks the file itself (_check_token_file).
    from damocles_ext.commands import check_config

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(tmp_path / "missing"), str(fifo)):
        args = ["window_post", "--jobs", "sqlite:///x.db", "--listen", "127.0.0.1:0"]
        parsed = check_config._parse_serve([*args, "--token-file", path])
        assert parsed.token_file == path


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--listen", "127.0.0.1:0", "--token-file", ""], ("which serve refuses (argument"
         " --token-file: empty; give the path of a file); fix its Args")),
        (["--token-file", "/etc/hostname"], "which will exit 2: --token-file goes with --listen"),
    ],
    ids=["empty-token-file", "token-file-without-listen"],
)  # fmt: skip
def test_a_serve_entry_that_serve_refuses_at_its_start_is_an_error_not_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
):
    # serve exits 2 for these before its ready line (damocles-manager's start of it fails), and
    # check-config said them as warnings, with exit code 0.
    manager = _serve_jobs_entry(tmp_path, "--store", f"a={tmp_path}", *args)
    warnings, errors = _refused(capsys, "-c", str(manager))
    assert not [w for w in warnings if "WdPost[0]" in w], warnings
    [error] = errors
    assert error.startswith(f"{manager}: WdPost[0] runs `damocles-ext ") and said in error, error


def test_what_serve_jobs_warns_of_as_it_reads_its_conf_dir_check_config_warns_of_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # A --conf-dir without sector-manager.cfg (damocles' defaults apply: a HeartbeatTimeout the
    # manager may not have) and a key damocles does not know: serve says both as it starts, and
    # check-config, which read the same file, said nothing.
    bare, typo = tmp_path / "bare", tmp_path / "typo"
    bare.mkdir()
    typo.mkdir()
    (typo / "sector-manager.cfg").write_text("[Common.Proving.WorkerProver]\nJobMaxTries = 3\n")
    manager = tmp_path / "ext-prover.cfg"
    jobs = f"sqlite:///{tmp_path}/j.db"
    manager.write_text(
        "".join(
            f'[[WdPost]]\nBin = "damocles-ext"\nArgs = ["serve", "window_post", "--jobs",'
            f' "{jobs}", "--conf-dir", "{conf}"]\n'
            for conf in (bare, typo)
        )
    )
    warnings = [w for w in _check(capsys, "-c", str(manager)) if "--jobs" in w]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"{manager}: WdPost[0] runs `damocles-ext serve window_post")
    said = f"which warns: --conf-dir {bare}: there is no sector-manager.cfg in it; damocles'"
    assert said + " defaults apply" in warnings[0], warnings[0]
    assert warnings[1].startswith(f"{manager}: WdPost[1] runs ")
    assert "which warns: " in warnings[1] and "'JobMaxTries'" in warnings[1], warnings[1]


def test_a_relative_conf_dir_that_serve_jobs_may_not_find_stays_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    # Read from check-config's directory, not damocles-manager's: what it finds there is no
    # certainty of what serve finds, so no exit code 2 for it.
    monkeypatch.chdir(tmp_path)
    manager = _serve_jobs_entry(tmp_path, "--conf-dir", "nowhere")
    [warning] = [w for w in _check(capsys, "-c", str(manager)) if "WdPost[0]" in w]
    assert "which will exit 2: --conf-dir nowhere: does not exist" in warning, warning
    assert "a relative --conf-dir is read from the directory damocles-manager runs in" in warning


@pytest.mark.parametrize("closed", ["file", "directory"])
def test_a_serve_jobs_sector_manager_cfg_closed_to_this_user_is_a_note_not_an_error(closed: str):
    # serve --jobs reads its --conf-dir's sector-manager.cfg as damocles-manager's user; the user
    # running check-config may be another, to whom it is closed: no sign serve will exit 2.

    from helpers.kept_out import a_closed_directory

    with a_closed_directory() as directory:
        base = directory.parent
        conf_dir = base / "manager-home" if closed == "file" else directory
        if closed == "file":
            conf_dir.mkdir()
            cfg = conf_dir / "sector-manager.cfg"
            cfg.write_text("[Common]\n")
            cfg.chmod(0)
        manager = _serve_jobs_entry(base, "--conf-dir", str(conf_dir))

        found = _findings_kept_out(manager)
    assert found["errors"] == [] and found["warnings"] == [], found
    [note] = found["notes"]
    # It said "you may not read: --conf-dir D: permission denied (...); give damocles-manager's
    # config directory (...)": advice that D was the wrong directory, in a note that it may be
    # the right one. Now it is said as of a token file closed to this user.
    why = _closed_why(closed)
    assert note == (
        f"{manager}: WdPost[0] runs `damocles-ext serve window_post --jobs sqlite:///{base}/j.db"
        f" --conf-dir {conf_dir}`: its --conf-dir's sector-manager.cfg"
        f" {str(conf_dir / 'sector-manager.cfg')!r} {why}; serve runs as damocles-manager's user,"
        " so check that user can read it (what it holds was not seen here)"
    )
    assert "give damocles-manager's config directory" not in note


def test_a_scanned_stores_sectorstore_json_closed_to_this_user_is_a_note_naming_it():
    # serve --jobs reads the stores its sector-manager.cfg's ScanPersistStores finds, as
    # damocles-manager's user: a sectorstore.json closed to the user running check-config was
    # an error (exit 2), though that user may read it.
    from helpers.kept_out import a_closed_directory

    with a_closed_directory() as directory:
        base = directory.parent
        conf_dir = base / "manager-home"
        conf_dir.mkdir()
        (base / "stores" / "s1").mkdir(parents=True)
        meta = base / "stores" / "s1" / "sectorstore.json"
        meta.write_text('{"Name": "s1"}')
        meta.chmod(0)
        (conf_dir / "sector-manager.cfg").write_text(
            f"[Common]\nScanPersistStores = ['{base}/stores/*']\n"
        )
        manager = _serve_jobs_entry(base, "--conf-dir", str(conf_dir))
        found = _findings_kept_out(manager)
    assert found["errors"] == [] and found["warnings"] == [], found
    [note] = found["notes"]
    assert note == (
        f"{manager}: WdPost[0] runs `damocles-ext serve window_post --jobs sqlite:///{base}/j.db"
        f" --conf-dir {conf_dir}`: a store of its sector-manager.cfg, whose file {str(meta)!r}"
        f" {_closed_why('file')}; serve runs as damocles-manager's user, so check that user can"
        " read it (what it holds was not seen here)"
    )
