"""The README's "Many machines" section stays true: every `damocles-ext` command in its shell
blocks and every `Args` of its ext-prover.cfg blocks is accepted by the CLI's own parser (nothing
is run), its TOML blocks are valid TOML, and the damocles-worker it shows talks to the port the
coordinator it shows listens on."""

from __future__ import annotations

import itertools
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from damocles_ext.cli import build_parser
from damocles_ext.config.damocles_worker import parse_damocles_worker_config

ROOT = Path(__file__).resolve().parent.parent


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Many machines", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", section(), flags=re.DOTALL)


def shell_commands() -> list[list[str]]:
    commands = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("damocles-ext "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def ext_prover_args() -> list[list[str]]:
    return [
        entry["Args"]
        for block in blocks("toml")
        for entry in tomllib.loads(block).get("WdPost", [])
    ]


def test_the_section_shows_commands_and_configs():
    assert {c[0] for c in shell_commands()} >= {"coordinator", "wdpost", "worker"}
    args = ext_prover_args()
    assert len(args) == 2 and all(a[:2] == ["serve", "window_post"] and "--jobs" in a for a in args)


def cases() -> list:
    return shell_commands() + ext_prover_args()


@pytest.mark.parametrize("argv", cases(), ids=shlex.join)
def test_each_command_is_one_the_cli_accepts(argv: list[str], tmp_path: Path):
    if "--token-file" in argv:  # read as it is parsed: give it one that exists
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        argv = list(argv)
        argv[argv.index("--token-file") + 1] = str(token)
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"damocles-ext {shlex.join(argv)}: refused by the parser (exit {exc.code})")


def test_the_workers_shown_talk_to_the_coordinator_shown():
    [worker] = [tomllib.loads(b) for b in blocks("toml") if "sector_manager" in b]
    address = worker["sector_manager"]["rpc_client"]["addr"]
    [coordinator] = [c for c in shell_commands() if c[0] == "coordinator"]
    listen = coordinator[coordinator.index("--listen") + 1]
    assert address.endswith(f"/tcp/{listen.rsplit(':', 1)[1]}")
    # damocles-ext's own worker, shown as the alternative, asks the same coordinator.
    [ours] = [c for c in shell_commands() if c[0] == "worker"]
    assert ours[ours.index("--manager") + 1] == address
    assert [t["plan"] for t in worker["sealing_thread"]] == ["wdpost"]
    stores = {v.split("=", 1)[0] for k, v in itertools.pairwise(coordinator) if k == "--store"}
    assert {a["name"] for a in worker["attached"]} <= stores


def test_the_worker_config_shown_is_one_a_damocles_worker_toml_reader_takes(tmp_path: Path):
    [text] = [b for b in blocks("toml") if "sector_manager" in b]

    def here(match: re.Match) -> str:  # the reader checks the directories exist, as damocles does
        place = tmp_path / match.group(1).lstrip("/")
        place.mkdir(parents=True, exist_ok=True)
        return f'location = "{place}"'

    config = parse_damocles_worker_config(re.sub(r'location = "([^"]+)"', here, text), "README")
    assert config.warnings == ()
    assert [t.allowed_miners for t in config.threads] == [()]
    # No token: a damocles-worker sends no header (its run.rs connects without any).
    assert config.token is None and [a.name for a in config.attached] == ["store-a"]
