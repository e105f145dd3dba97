"""The command line's parser built for the one command given: the same command as in the whole
parser, and only its module imported (a prover child's start, and any command's, pays for its
own command only)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from damocles_ext import cli


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every (sub)command's help below `parser`, by its prog."""
    helps = {parser.prog: parser.format_help()}
    if (commands := cli._subcommands(parser)) is not None:
        for sub in dict.fromkeys(commands.choices.values()):
            helps |= _helps(sub)
    return helps


def _command_names() -> list[str]:
    commands = cli._subcommands(cli.build_parser())
    assert commands is not None
    return list(commands.choices)


@pytest.mark.parametrize("name", _command_names())
def test_a_command_built_alone_is_the_command_the_whole_parser_has(name: str):
    whole = {
        prog: text
        for prog, text in _helps(cli.build_parser()).items()
        if prog.split()[1:2] == [name]
    }
    alone = cli.build_parser([name, "--help"])
    assert alone.partial
    assert {prog: text for prog, text in _helps(alone).items() if prog != "damocles-ext"} == whole
    assert len(whole) >= 1


@pytest.mark.parametrize("argv", [[], ["--version"], ["statu"], ["check_config"], ["-h", "run"]])
def test_what_names_no_command_builds_the_whole_parser(argv: list[str]):
    # A mistyped command is told the commands there are, and the ones spelt alike.
    parser = cli.build_parser(argv)
    commands = cli._subcommands(parser)
    assert not parser.partial and commands is not None
    assert list(commands.choices) == _command_names() and len(commands.choices) > 10


def test_a_command_imports_its_own_module_and_no_other_commands():
    code = (
        "import json, sys, damocles_ext.cli as cli\n"
        "cli.build_parser(sys.argv[1:])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('damocles_ext.commands.'))))\n"
    )
    loaded = {}
    for argv in (["child", "--plugin", "echo", "window_post"], ["status"], []):
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
        )
        loaded[argv[0] if argv else ""] = json.loads(done.stdout)
    assert loaded["child"] == ["damocles_ext.commands.child", "damocles_ext.commands.common"]
    assert "damocles_ext.commands.serve" not in loaded["status"]
    assert "damocles_ext.commands.status" in loaded["status"]
    assert len(loaded[""]) > len(cli.COMMANDS)  # the whole parser: every command's module
