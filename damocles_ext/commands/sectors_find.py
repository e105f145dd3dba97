"""`damocles-ext sectors find MINER NUMBER…`: where each sector's sealed file and cache directory
are, from a damocles source node (`--proxy`), the stores (`--conf-dir`, `--attached`) and the
plugins' providers, through the sector-location service (damocles_ext/sectors).

Exit codes: 0 every sector was found, its files there, 1 some were not (each says why: not
found, found in part by the scan of the stores, its files not where it was found or last known,
no provider could answer), 2 bad input
(arguments, the store config, nothing to ask, a source node that refuses the token and so leaves
sectors unanswered: said once, not once per sector; the answers found are still printed).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING

from damocles_ext.logs import one_line
from damocles_ext.sectors.comm_r import MAX_SECTORS, parse_numbers

from .common import (
    add_sector_source_args,
    check_proxy_headers,
    check_sector_sources,
    positive_duration,
    sector_stores,
    stdout_to_stderr,
)

if TYPE_CHECKING:
    from damocles_ext.sectors import SectorAnswer, SectorRef
    from damocles_ext.sectors.model import Unasked

DEFAULT_TIMEOUT = 30.0
# ASCII digits only, as the worker's --allowed-miners: \d takes fullwidth or Arabic-Indic digits too.
_MINER = re.compile(r"(?:[ft]0)?([0-9]+)")


def add_find_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    find = sub.add_parser(
        "find",
        help="where sectors are: sealed file, cache dir, from which provider, how fresh",
        description=(
            "Print where each sector's sealed file and cache directory are, asking the plugins'"
            " sector providers, the damocles source node given with --proxy"
            " (Venus.SectorIndexerFind, read-only), then the stores in damocles' layout."
            " Store names the source answers become paths through --conf-dir's"
            " sector-manager.cfg ([[Common.PersistStores]]) and --attached. Exit code 0: every"
            " sector found, its files there; 1: some not (each says why); 2: bad input."
        ),
    )
    find.add_argument(
        "miner", metavar="MINER", type=_miner, help="the miner: 1000, f01000 or t01000"
    )
    find.add_argument(
        "numbers",
        metavar="NUMBER",
        nargs="+",
        type=_numbers,
        help="sector numbers; A-B is every number from A to B",
    )
    find.add_argument(
        "--upgrade",
        action="store_true",
        help="the sectors are upgraded (SnapDeals): look in the upgrade index (update/,"
        " update-cache/)",
    )
    add_sector_source_args(find)
    find.add_argument(
        "--timeout",
        metavar="DURATION",
        type=positive_duration,
        default=DEFAULT_TIMEOUT,
        help=f"the providers' lookups take at most this (default: {DEFAULT_TIMEOUT:g}s); the"
        " bookkeeping and table of hundreds of thousands of sectors add to it. Sectors a source"
        " had no time to be asked for say so, with the --timeout that would do",
    )
    find.add_argument("--json", action="store_true", help="print one JSON object per line")
    return find


def _miner(text: str) -> int:
    m = _MINER.fullmatch(text.strip())
    if m is None or len(m.group(1).lstrip("0")) > 20 or int(m.group(1)) >= 2**64:
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a miner; give its actor id: 1000, f01000 or t01000"
        )
    return int(m.group(1))


def _numbers(text: str) -> range:
    # The parser `prove --sectors` takes its ranges with: the same checks, the same words.
    try:
        return parse_numbers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_find(args: argparse.Namespace) -> int:
    import trio

    from damocles_ext.errors import UsageError
    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.sectors import Bounds, SectorRef, SectorSettings
    from damocles_ext.sectors.locator import open_locator

    stores = sector_stores(args)
    check_proxy_headers(args.proxy, args.header, "--header")
    check_sector_sources(args.proxy, stores)
    numbers = [n for r in args.numbers for n in r]
    if len(numbers) > MAX_SECTORS:
        raise UsageError(f"{len(numbers)} sectors asked for; at most {MAX_SECTORS} at once")
    sectors = [SectorRef(args.miner, n, args.upgrade) for n in numbers]
    settings = SectorSettings(proxy=args.proxy, stores=stores, headers=tuple(args.header))
    bounds = Bounds(batch_timeout=args.timeout, lookup_timeout=min(5.0, args.timeout))

    refused: dict[str, str] = {}
    unasked: dict[str, Unasked] = {}

    async def main() -> tuple[list[SectorAnswer], dict[SectorRef, str], list[str]]:
        end = trio.current_time() + args.timeout
        locator = await open_locator(settings, plugin_manager=get_plugin_manager(), bounds=bounds)
        async with locator:
            answers = await locator.locate(sectors)
        refused.update(locator.refused)
        unasked.update(locator.unasked)
        left = max(1.0, end - trio.current_time())
        missing: list[str] = []
        absent: dict[SectorRef, str] = {}

        async def look_at_stores() -> None:
            missing.extend(await stores_not_there(stores, left))

        async def look_at_files() -> None:
            absent.update(await files_not_there(answers, left))

        async with trio.open_nursery() as nursery:  # both within what is left, not one after
            if not all(a.found for a in answers):
                nursery.start_soon(look_at_stores)
            nursery.start_soon(look_at_files)
        return answers, absent, missing

    with stdout_to_stderr():  # what plugins print as they load and find is not the answer
        answers, absent, missing = trio.run(main)
    for problem in missing:  # the likeliest cause of "not known to any provider"
        print(f"damocles-ext sectors find: warning: {problem}", file=sys.stderr)
    details = [
        "; ".join(filter(None, (answer.detail, absent.get(answer.sector, ""))))
        for answer in answers
    ]
    unanswered = not all(a.found for a in answers)
    for name, why in refused.items():  # the same for every sector it was asked: said once
        kind = "error" if unanswered else "warning"  # (another provider found them all)
        print(f"damocles-ext sectors find: {kind}: {name}: {one_line(why)}", file=sys.stderr)
        details = [d.replace(why, f"{name} refused us (said above)") for d in details]
    from damocles_ext.jobs.listing import go_duration
    from damocles_ext.sectors.model import UNASKED_ADVICE

    for name, left in unasked.items():  # its share of --timeout ran out: said once, with what to do
        kind = "error" if unanswered else "warning"
        advice = more_time(left, args.timeout)
        print(
            f"damocles-ext sectors find: {kind}: {name}: its share of --timeout"
            f" {go_duration(args.timeout)} ({left.share:.1f} s) ran out before it was asked for"
            f" {left.not_asked} of the {left.sectors} sectors (it answered {left.answered} in that"
            f" time{f'; the providers after it found {left.found_later} of those' if left.found_later else ''});"
            f" {advice}",
            file=sys.stderr,
        )
        ours = left.why.replace(UNASKED_ADVICE, advice)  # the sectors' lines: --timeout's words
        details = [d.replace(left.why, ours) for d in details]
    if args.json:
        import json

        for answer, detail in zip(answers, details, strict=True):
            print(json.dumps({**answer.to_dict(), "detail": detail}))
    else:
        sys.stdout.write(render(answers))
        for detail in details:
            if detail:  # (a provider's own words: its control characters escaped)
                print(one_line(detail), file=sys.stderr)
    if refused and unanswered:
        return 2  # our access, the operator's configuration, left sectors unanswered
    return 0 if all(a.found for a in answers) and not absent else 1


async def stores_not_there(
    stores: dict[str, str],
    timeout: float,  # noqa: ASYNC109 - the threads are abandoned at it, not cancelled
) -> list[str]:
    """What is wrong with each store directory that is not one here (not mounted, a typo in its
    path), looked at in worker threads within `timeout`: the scan finds nothing in it."""
    import trio

    from damocles_ext.sectors.files import DEFAULT_THREADS, in_thread, path_problem
    from damocles_ext.threads import NoThreadError

    limiter = trio.CapacityLimiter(DEFAULT_THREADS)
    problems: dict[str, str] = {}

    async def check(name: str, path: str) -> None:
        try:
            problem = await in_thread(path_problem, path, True, limiter=limiter, timeout=timeout)
        except (TimeoutError, NoThreadError) as exc:
            problem = f"{path}: {exc}"
        if problem:
            problems[name] = (
                f"store {name!r}: {problem}: is the store mounted, and given at the right path"
                " (--attached, or --conf-dir's [[Common.PersistStores]])? No sector is found in it"
            )

    async with trio.open_nursery() as nursery:
        for name, path in stores.items():
            nursery.start_soon(check, name, path)
    return [problems[name] for name in sorted(problems)]


async def files_not_there(
    answers: list[SectorAnswer],
    timeout: float,  # noqa: ASYNC109 - the threads are abandoned at it, not cancelled
) -> dict[SectorRef, str]:
    """Why the files of each found sector are not where its provider says (moved away, a store
    not mounted here), for the sectors whose files are not there: a prover here would answer
    them faulty. Looked at in worker threads (files.py), one per store directory, within
    `timeout` (a stalled mount says so)."""
    import trio

    from damocles_ext.sectors.files import DEFAULT_THREADS, check_locations

    groups: dict[tuple[str, str], list[SectorAnswer]] = {}
    for answer in answers:
        where = answer.location
        if answer.found and where is not None and where.sealed_file:
            key = (os.path.dirname(where.sealed_file), os.path.dirname(where.cache_dir))
            groups.setdefault(key, []).append(answer)
    limiter = trio.CapacityLimiter(DEFAULT_THREADS)
    absent: dict[SectorRef, str] = {}

    async def check(group: list[SectorAnswer]) -> None:
        locations = [a.location for a in group if a.location is not None]
        problems = await check_locations(locations, limiter=limiter, timeout=timeout)
        for answer, problem in zip(group, problems, strict=True):
            if problem:
                absent[answer.sector] = (
                    f"{answer.sector}: {answer.provider} says it is there, but its files are not:"
                    f" {problem} (moved since, or its store not mounted here?); a prover here"
                    " would answer it faulty"
                )

    async with trio.open_nursery() as nursery:
        for group in groups.values():
            nursery.start_soon(check, group)
    return absent


def more_time(unasked: Unasked, timeout: float) -> str:
    """What to do about the sectors a provider had no time to be asked for in `timeout`."""
    import math

    from damocles_ext.jobs.listing import go_duration

    needed = unasked.time_for_all(timeout)
    if needed is None:  # it answered nothing in its share: its pace says nothing
        return (
            "it answered none of those it was asked for (why: below); ask for fewer sectors per"
            " call, or give a longer --timeout if it is slow but up"
        )
    return (
        f"give --timeout {go_duration(math.ceil(needed))} or more (in proportion to the"
        " sectors, at the pace it answered), or ask for fewer sectors per call"
    )


def _name(sector: SectorRef) -> str:
    return f"f0{sector.miner}/{sector.number}"


def freshness(answer: SectorAnswer) -> str:
    """ "fresh", "cached, 12s old", "stale, 3h0m0s old" or "-"."""
    from damocles_ext.jobs.listing import go_duration

    if answer.age is None:
        return "-"
    if not answer.cached:
        return "fresh"
    kind = "stale" if answer.stale else "cached"
    return f"{kind}, {go_duration(round(answer.age))} old"


def render(answers: list[SectorAnswer]) -> str:
    """The table `sectors find` prints."""
    from damocles_ext.jobs.listing import tabwrite

    rows = [["SECTOR", "STATUS", "SEALED FILE", "CACHE DIR", "PROVIDER", "FRESHNESS"]]
    for a in answers:
        loc = a.location
        rows.append(
            [
                _name(a.sector) + (" (upgrade)" if a.sector.upgrade else ""),
                a.status.replace("_", " "),
                "-" if loc is None else loc.sealed_file,
                "-" if loc is None else loc.cache_dir,
                a.provider or "-",
                freshness(a),
            ]
        )
    return tabwrite(rows)
