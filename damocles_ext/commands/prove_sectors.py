"""`prove window_post --sectors MINER:NUMBER,… --comm-r FILE --seed HEX --proof-type TYPE`: the
task built from sector numbers, their locations from the sector-location service (`--proxy`,
`--conf-dir`'s sector-manager.cfg, `--attached`, the plugins' providers) and their on-chain
comm_r from FILE (sectors/comm_r.py has its form). A number may be a range (`1000:0-23489`, as
`sectors find` takes them), and `--sectors @LIST` reads the items from the file LIST: a deadline's
sectors written out one by one are longer than the 128 KiB Linux allows one argument.

A sector the service does not locate (not found, its files gone, no provider could answer) is
skipped, as damocles-manager's pre-check skips a sector it cannot read, and listed in the
output's faults with the proofs of the rest; why is logged on stderr. No sector located: no
proof, every sector a fault.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import TYPE_CHECKING

from damocles_ext.errors import UsageError
from damocles_ext.logs import one_line

from .common import check_proxy_headers, check_sector_sources, sector_stores

if TYPE_CHECKING:
    from damocles_ext.sectors import SectorAnswer, SectorRef
    from damocles_ext.sectors.model import Unasked
    from damocles_ext.tasks import Output, WindowPoSt

log = logging.getLogger("damocles_ext.prove")

#: The whole lookup takes at most this, or a quarter of the time to --deadline when sooner.
LOCATE_TIMEOUT = 60.0


def task_from_sectors(
    args: argparse.Namespace, deadline: float | None
) -> tuple[WindowPoSt | None, list[int]]:
    """(the task over the located sectors, or None when none is; the numbers skipped)."""
    from damocles_ext.sectors.comm_r import CommRFileError, parse_comm_r_file
    from damocles_ext.tasks import WindowPoSt, is_window_proof_type

    from .inputs import read_input_file
    from .prove import parse_seed

    if args.stage != "window_post":
        raise UsageError(f"prove {args.stage} --comm-r: only window_post is built from sectors")
    if args.manifest is not None or args.save_request is not None:
        raise UsageError("--comm-r builds the task from --sectors; --manifest and --save-request"
                         " do not go with it")  # fmt: skip
    if args.sectors is None:
        raise UsageError("--comm-r needs --sectors MINER:NUMBER,… (the sectors to prove)")
    sectors = _sector_list(args)
    miners = sorted({s.miner for s in sectors})
    if len(miners) > 1:
        raise UsageError(
            f"--sectors: a WindowPoSt is one miner's; these are of miners {miners}: prove each"
            " miner's sectors apart"
        )
    if args.proof_type is None or not is_window_proof_type(args.proof_type):
        given = "" if args.proof_type is None else f" ({args.proof_type} is not one)"
        raise UsageError(
            f"--comm-r needs --proof-type, a WindowPoSt proof type{given}: e.g."
            " StackedDrgWindow32GiBV1_2"
        )
    seed = parse_seed(args.seed, "--comm-r")
    data = read_input_file(args.comm_r, "comm_r file", "JSON file")
    try:
        comm_r = parse_comm_r_file(data, args.comm_r)
    except CommRFileError as exc:
        raise UsageError(str(exc)) from None
    missing = [s for s in sectors if _comm_r_key(s) not in comm_r]
    if missing:
        names = ", ".join(f"{s.miner}:{s.number}" for s in missing[:5])
        raise UsageError(
            f"{args.comm_r}: no comm_r for {names}{' …' if len(missing) > 5 else ''}; add an"
            f' entry "MINER:NUMBER": "COMM_R" for each sector of --sectors'
        )
    stores = sector_stores(args, conf_dir_needs_file=False)
    check_proxy_headers(args.proxy, args.header, "--header")
    check_sector_sources(args.proxy, stores)
    time_left = None if deadline is None else max(0.0, deadline - time.time())
    answers, refused, unasked = locate(args, stores, sectors, time_left)
    if refused and not all(a.found for a in answers):
        # Our access, not the sectors: said as `sectors find` says it, not proved as faults.
        why = "; ".join(f"{name}: {one_line(text)}" for name, text in refused.items())
        raise UsageError(f"a sector provider refused us, so sectors went unlocated: {why}")
    # Each provider whose share of the time ran out: said once; each sector's line says so too.
    said = [say_unasked(left, time_left) for left in unasked.values()]
    replicas = []
    skipped = []
    from damocles_ext.sectors.model import UNASKED_ADVICE
    from damocles_ext.tasks import PoStReplicaInfo

    for answer in answers:
        number = answer.sector.number
        if not answer.found or answer.location is None:
            detail = answer.detail.replace(UNASKED_ADVICE, said[0]) if said else answer.detail
            log.warning("sector %d skipped (a fault): %s", number, detail)
            skipped.append(number)
            continue
        if answer.stale:
            log.warning("sector %d: %s", number, answer.detail)
        location = answer.location
        replicas.append(
            PoStReplicaInfo(
                number,
                comm_r[_comm_r_key(answer.sector)],
                cache_dir=location.cache_dir,
                sealed_file=location.sealed_file,
            )
        )
    if not replicas:
        return None, skipped
    return WindowPoSt(miners[0], args.proof_type, replicas, seed), skipped


def _sector_list(args: argparse.Namespace) -> list[SectorRef]:
    """--sectors' sectors, given in it or, as @LIST, in the file LIST ('@-': stdin); UsageError
    naming the option (and the file) and what is wrong."""
    from damocles_ext.sectors.comm_r import parse_sector_list

    from .inputs import read_input_file

    text, where = args.sectors, "--sectors"
    if text.startswith("@"):
        source, where = text[1:], f"--sectors {text[:200]}"
        if not source:
            raise UsageError("--sectors @: give the file of the sectors after the @ (@LIST)")
        if source == "-" and args.comm_r == "-":
            raise UsageError(
                "--sectors @- and --comm-r - both read stdin: give one of them as a file"
            )
        data = read_input_file(source, "--sectors file", "list of sectors")
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise UsageError(
                f"{where}: not text (byte {exc.start}): give MINER:NUMBER or MINER:FIRST-LAST"
                " items, one a line or comma-separated"
            ) from None
    try:
        return parse_sector_list(text)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def say_unasked(unasked: Unasked, time_left: float | None) -> str:
    """Warn that a provider's share of the lookup's time ran out before it was asked for some
    sectors (they are skipped as faults, not looked up); what to do, for each sector's line."""
    from damocles_ext.sectors import Bounds

    budget = Bounds(batch_timeout=LOCATE_TIMEOUT).budget(time_left)
    advice = "prove fewer sectors at once"
    if budget < LOCATE_TIMEOUT:  # cut by --deadline: one further away gives it more
        advice += (
            ", or give a --deadline further away (the lookup takes a quarter of the time to it,"
            f" at most {LOCATE_TIMEOUT:g} s)"
        )
    later = f"; the providers after it found {unasked.found_later} of those" if unasked.found_later else ""  # fmt: skip
    log.warning(
        "%s: its share (%.1f s) of the %.1f s the sectors' lookup had ran out before it was asked"
        " for %d of the %d sectors (it answered %d in that time%s): %d are skipped as faults; %s",
        unasked.provider, unasked.share, budget, unasked.not_asked, unasked.sectors,
        unasked.answered, later, unasked.missing, advice,
    )  # fmt: skip
    return f"{advice} (said above)"


def _comm_r_key(sector: SectorRef) -> SectorRef:
    """The comm_r file's key of a sector (upgraded or not: one comm_r per sector number)."""
    from damocles_ext.sectors import SectorRef

    return SectorRef(sector.miner, sector.number)


def locate(
    args: argparse.Namespace,
    stores: dict[str, str],
    sectors: list[SectorRef],
    time_left: float | None,
) -> tuple[list[SectorAnswer], dict[str, str], dict[str, Unasked]]:
    """The service's answers for `sectors`, within a share of `time_left`, the providers that
    refused us (a token or header: our configuration), each with why, and those whose share of
    the time ran out before they were asked for some sectors."""
    import trio

    from damocles_ext.plugins import get_plugin_manager
    from damocles_ext.sectors import Bounds, SectorSettings
    from damocles_ext.sectors.locator import open_locator

    settings = SectorSettings(proxy=args.proxy, stores=stores, headers=tuple(args.header))
    bounds = Bounds(batch_timeout=LOCATE_TIMEOUT)

    async def main() -> tuple[list[SectorAnswer], dict[str, str], dict[str, Unasked]]:
        locator = await open_locator(settings, plugin_manager=get_plugin_manager(), bounds=bounds)
        async with locator:
            answers = await locator.locate(sectors, time_left=time_left)
        return answers, dict(locator.refused), dict(locator.unasked)

    return trio.run(main)


def with_skipped(output: Output, skipped: list[int]) -> Output:
    """The prover's output with the skipped sectors added to its faults."""
    from damocles_ext.tasks import WindowPoStOutput

    if not isinstance(output, WindowPoStOutput):
        return output
    faults = sorted(set(output.faults) | set(skipped))
    return WindowPoStOutput(proofs=output.proofs, faults=faults)
