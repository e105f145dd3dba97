"""The README's "Run it on its own" walkthrough, run as written: its config saved as the README
says, then each command in order in an empty directory, with real processes (`damocles-ext run`
in the background, as "in another terminal"). The test reads both from the README, so it breaks
when the README drifts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers.frontend import short_socket_dir

ROOT = Path(__file__).resolve().parent.parent


def walkthrough() -> tuple[str, str, list[str]]:
    """The config's file name, its text, and the shell commands (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run it on its own\n", 1)[1].split("\n## ", 1)[0]
    [name] = re.findall(r"save this as `([^`]+)`", section)
    [config] = re.findall(r"```toml\n(.*?)\n```", section, flags=re.DOTALL)
    [script] = re.findall(r"```sh\n(.*?)\n```", section, flags=re.DOTALL)
    commands = [c.strip() for c in script.replace("\\\n", " ").splitlines() if c.strip()]
    return name, config, commands


def test_the_walkthrough_config_is_the_native_prover_and_comes_first():
    name, config, commands = walkthrough()
    assert name == "native.cfg" and 'Plugin = "native"' in config
    assert all(name in c for c in commands if " -c " in c)
    # A file is made before it is used: task.json by --save-request, out.json by -o.
    first_made = {f: min(i for i, c in enumerate(commands) if m in c)
                  for f, m in (("task.json", "--save-request task.json"),
                               ("out.json", "-o out.json"))}  # fmt: skip
    for f, made in first_made.items():
        used = [i for i, c in enumerate(commands) if f in c and i < made]
        assert not used, (f, [commands[i] for i in used])


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the walkthrough draws its seed with openssl"
)
def test_the_walkthrough_runs_as_written_and_its_proofs_verify(tmp_path: Path):
    name, config, commands = walkthrough()
    work = tmp_path / "work"
    work.mkdir()
    (work / name).write_text(config + "\n")
    env = dict(os.environ)
    # The `damocles-ext` of this checkout, as after the README's install.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    with short_socket_dir("w", tmp_path.name) as runtime:
        env["XDG_RUNTIME_DIR"] = str(runtime)
        background: subprocess.Popen[bytes] | None = None
        code = None
        listening = threading.Event()
        run_log: list[bytes] = []

        def drain(stream) -> None:
            for line in stream:
                run_log.append(line)
                if b"control socket listening on" in line:
                    listening.set()
            listening.set()  # ended: the assertion below says why

        try:
            for command in commands:
                if command.startswith("damocles-ext run "):
                    # "in another terminal": it serves until stopped.
                    background = subprocess.Popen(
                        ["bash", "-c", f"exec {command}"],
                        cwd=work, env=env, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )  # fmt: skip
                    threading.Thread(target=drain, args=(background.stderr,), daemon=True).start()
                    assert listening.wait(60), "run did not start listening"
                    assert background.poll() is None, b"".join(run_log).decode()
                    continue
                done = subprocess.run(
                    ["bash", "-c", command], cwd=work, env=env, capture_output=True,
                    stdin=subprocess.DEVNULL, timeout=120, check=False,
                )  # fmt: skip
                assert done.returncode == 0, (command, done.stderr.decode())
                assert b"Traceback" not in done.stderr, (command, done.stderr.decode())
                if command.startswith("damocles-ext verify"):
                    assert done.stderr.startswith(b"valid: "), done.stderr
                if command.startswith("damocles-ext status"):
                    assert b"window_post#0" in done.stdout and b"winning_post#0" in done.stdout
        finally:
            if background is not None:
                background.send_signal(signal.SIGTERM)
                code = background.wait(timeout=60)
        assert background is not None, "the walkthrough starts no `damocles-ext run`"
        assert code == 0, b"".join(run_log).decode()
    out = json.loads((work / "out.json").read_text())
    assert out["proofs"] and out["faults"] == []
    # The running supervisor proved the same task: the same proofs.
    assert json.loads((work / "out2.json").read_text()) == out
