"""`damocles-ext plugins`: the installed prover plugins, their provers and where each came from."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plugins` and its options."""
    parser = subparsers.add_parser(
        "plugins",
        help="list installed prover plugins and their provers",
        description=(
            "List the plugins found in the entry-point group damocles_ext, the provers each "
            "offers (with the stages they serve) or the observer hooks it implements, and the "
            "distribution and file each came from. "
            "Plugins that failed to load are listed with their error."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the plugin list; exit 0 even when some plugin failed to load (it is listed)."""
    import logging

    from damocles_ext.plugins import get_plugin_manager, list_plugins

    # Load failures are part of the listing below; no need to warn about them twice.
    logging.getLogger("damocles_ext.plugins").setLevel(logging.ERROR)
    from .common import stdout_to_stderr

    with stdout_to_stderr():  # what plugins print as they load is not the listing
        rows = list_plugins(get_plugin_manager())
    if args.json:
        import json

        data = [
            {
                "name": r.name,
                "origin": r.origin,
                "error": r.error,
                "hooks": list(r.hooks),
                "provers": [
                    {"name": p.name, "stages": list(p.stages), "description": p.description}
                    for p in r.provers
                ],
            }
            for r in rows
        ]
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    if not rows:
        print("no plugins installed (entry-point group damocles_ext is empty)")
        return 0
    width = max((len(p.name) for r in rows for p in r.provers), default=0)
    for r in rows:
        if r.error is not None:
            print(f"{r.name}: FAILED TO LOAD: {r.error}")
            print(f"  from {r.origin}")
            continue
        offers = []
        if r.provers or not r.hooks:
            offers.append(f"{len(r.provers)} prover(s)")
        if r.hooks:
            offers.append(f"observer of {', '.join(r.hooks)}")
        print(f"{r.name}: {'; '.join(offers)}, from {r.origin}")
        for p in r.provers:
            line = f"  {p.name:<{width}}  {', '.join(p.stages)}"
            print(f"{line}  {p.description}" if p.description else line)
    return 0
