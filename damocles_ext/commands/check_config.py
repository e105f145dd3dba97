"""`damocles-ext check-config`: validate an ext-prover.cfg and show the children it would start."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from damocles_ext.config import ChildSpec


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `check-config` and its options."""
    parser = subparsers.add_parser(
        "check-config",
        help="validate an ext-prover.cfg and list the children it would start",
        description=(
            "Validate an ext-prover.cfg (damocles-manager's format plus damocles-ext's keys) and "
            "print one line per child that would start. Every error in the file is reported; "
            "the exit code is 2 when there is any."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "file", nargs="?", metavar="FILE", help="the config file to read (same as -c FILE)"
    )
    source.add_argument("-c", "--config", metavar="FILE", help="the config file to read")
    source.add_argument(
        "--conf-dir",
        metavar="DIR",
        help="read DIR/ext-prover.cfg, like damocles-manager --conf-dir",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the resolved config as JSON instead"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config (ConfigError on bad input), print its children, warnings to stderr."""
    import msgspec

    from damocles_ext.config import load_conf_dir, load_config

    path = args.config if args.config is not None else args.file
    config = load_config(path) if path is not None else load_conf_dir(args.conf_dir)
    check_plugins(config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(config).decode()) + "\n")
        return 0
    width = max(len(child.name) for child in config.children)
    for child in config.children:
        print(describe_child(child, width))
    return 0


def check_plugins(config) -> None:
    """Raise ConfigError naming each Plugin that is not installed or whose options it refuses."""
    from damocles_ext.config import TABLE_OF_STAGE, ConfigError
    from damocles_ext.plugins import get_plugin_manager, prover_problems

    plugin_children = [c for c in config.children if c.kind == "plugin"]
    if not plugin_children:
        return
    pm = get_plugin_manager()
    errors: list[str] = []
    seen: set[tuple[str, int]] = set()
    for child in plugin_children:
        if (child.stage, child.block) in seen:
            continue  # a Gpus block expands to several children with one Plugin
        seen.add((child.stage, child.block))
        table = TABLE_OF_STAGE[child.stage]
        for problem in prover_problems(pm, child.plugin, dict(child.plugin_options), child.stage):
            errors.append(f"{table}[{child.block}].Plugin: {problem}")
    if errors:
        raise ConfigError(config.source, errors)


def describe_child(child: ChildSpec, width: int = 0) -> str:
    """One line: name, program or plugin, concurrency, weight, env vars set, locks, cpuset."""
    from damocles_ext import config as cfg

    table = cfg.TABLE_OF_STAGE[child.stage]
    parts = [
        f"{child.name:<{width}}",
        f"({table}[{child.block}])",
        f"run: {cfg.describe_argv(child)}",
        f"concurrent={child.concurrent}",
        f"weight={child.weight}",
    ]
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in child.envs.items())
    parts.append(f"env: {envs or '-'}")
    parts.append(f"locks: {','.join(child.locks) or '-'}")
    parts.append(f"cpuset: {cfg.format_cpuset(child.cpuset) if child.cpuset else '-'}")
    extras = []
    if child.protocol != "auto":
        extras.append(f"protocol={child.protocol}")
    if child.ready_timeout != cfg.DEFAULT_READY_TIMEOUT:
        extras.append(f"ready_timeout={child.ready_timeout:g}s")
    if not child.inherit_envs:
        extras.append("inherit_envs=false")
    if not child.auto_restart:
        extras.append("auto_restart=false")
    if child.max_attempts != cfg.DEFAULT_MAX_ATTEMPTS:
        extras.append(f"max_attempts={child.max_attempts}")
    if child.request_timeout is not None:
        extras.append(f"request_timeout={child.request_timeout:g}s")
    if child.heartbeat_timeout is not None:
        extras.append(f"heartbeat_timeout={child.heartbeat_timeout:g}s")
    if child.stdin_timeout is not None:
        extras.append(f"stdin_timeout={child.stdin_timeout:g}s")
    if child.cancel_grace != cfg.DEFAULT_CANCEL_GRACE:
        extras.append(f"cancel_grace={child.cancel_grace:g}s")
    if extras:
        parts.append(" ".join(extras))
    return "  ".join(parts)
