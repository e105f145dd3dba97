"""What the sector-location service logs when a provider fails and answers again: an operator
whose source node goes down learns it from the log of the worker or coordinator that asks it
(once, not once per sector), and learns when it answers again."""

from __future__ import annotations

import logging

from helpers.damocles_source import DamoclesSource
from test_sectors import MINER, put_files, refs, stores  # noqa: F401 - the fixture

from damocles_ext.sectors.cache import CacheRules
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.providers import SourceNode, StoreScan


def said(caplog, level):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "damocles_ext.sectors" and r.levelno == level
    ]


async def test_a_source_outage_is_logged_once_with_what_answers_meanwhile_and_its_end(
    stores,  # noqa: F811 - the fixture
    mock_clock,
    caplog,
):
    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    with DamoclesSource() as source:
        for n in (1, 2, 3):
            source.put(MINER, n, "a")
            put_files(stores, n)
        node = SourceNode(source.url, stores)
        scan = StoreScan(stores)
        # Nothing fresh: every lookup asks the source.
        rules = CacheRules(fresh_for=0, refresh_lead=0)
        async with SectorLocator([node, scan], rules=rules) as locator:
            assert all(a.found for a in await locator.locate(refs(1, 2, 3)))
            assert said(caplog, logging.WARNING) == []
            source.stop()
            down = await locator.locate(refs(1, 2, 3))
            mock_clock.jump(30)
            await locator.locate(refs(1, 2, 3))  # still down, 30 s later: not said again
            warnings = said(caplog, logging.WARNING)
            source.start()  # back on the same port
            mock_clock.jump(node.down_for)
            [probe] = await locator.locate(refs(1))  # one lookup asks it again first
            back = await locator.locate(refs(1, 2, 3))
    # The scan answered while the source was down: no fault, and yet the outage is said.
    assert all(a.found and a.provider == scan.name for a in down)
    assert len(warnings) == 1, warnings
    [warning] = warnings
    assert node.name in warning and "cannot connect" in warning and source.url in warning
    assert f"asked of {scan.name}" in warning and "last known locations" in warning
    assert probe.provider == node.name
    assert all(a.found and a.provider == node.name for a in back)
    [info] = said(caplog, logging.INFO)
    assert node.name in info and "answers again" in info and "6 lookups" in info
