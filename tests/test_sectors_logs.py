"""What the sector-location service logs when a provider fails and answers again: an operator
whose source node goes down learns it from the log of the worker or coordinator that asks it
(once, not once per sector), and learns when it answers again."""

from __future__ import annotations

import logging

from helpers.damocles_source import DamoclesSource
from test_sectors import MINER, put_files, refs, stores  # noqa: F401 - the fixture

from damocles_ext.sectors import SectorProviderError
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


async def test_a_second_outage_soon_after_the_first_is_said_with_its_end_not_silenced(
    stores,  # noqa: F811 - the fixture
    mock_clock,
    caplog,
):
    """The time of the last warning was kept across outages: a second outage that began
    within a minute of the first one's warning was never said, nor was its end."""
    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    with DamoclesSource() as source:
        source.put(MINER, 1, "a")
        put_files(stores, 1)
        node = SourceNode(source.url, stores)
        rules = CacheRules(fresh_for=0, refresh_lead=0)
        async with SectorLocator([node, StoreScan(stores)], rules=rules) as locator:

            async def outage() -> None:
                source.stop()
                await locator.locate(refs(1))
                source.start()
                mock_clock.jump(node.down_for)
                [back] = await locator.locate(refs(1))
                assert back.provider == node.name

            await outage()
            first = said(caplog, logging.WARNING) + said(caplog, logging.INFO)
            mock_clock.jump(10)
            await outage()  # 12 s after the first warning
            mock_clock.jump(60)
            await locator.locate(refs(1))  # answered, a minute on
            await locator.locate(refs(1))
    warnings = said(caplog, logging.WARNING)
    assert len(first) == 2 and len(warnings) == 2, (first, warnings)
    summary = warnings[1]
    assert node.name in summary and "1 outage" in summary and "cannot connect" in summary
    assert "answers again" in summary and "1 lookup failed" in summary
    assert len(said(caplog, logging.INFO)) == 1  # the first outage's end


class Flapping:
    """A provider that fails while `down`, as a source node that comes and goes."""

    name = "flapping"
    down = False
    where = None  # not known: an answer all the same

    async def find(self, sector):
        if self.down:
            raise SectorProviderError(f"{sector}: connection refused")
        return self.where


async def test_a_flapping_provider_is_summarised_at_most_once_a_minute_and_never_silenced(
    mock_clock, caplog
):
    caplog.set_level(logging.INFO, "damocles_ext.sectors")
    flapping = Flapping()
    async with SectorLocator([flapping]) as locator:
        for _ in range(10):  # ten outages in 20 s
            flapping.down = True
            await locator.locate(refs(1))
            await locator.locate(refs(1))
            flapping.down = False
            mock_clock.jump(1)
            await locator.locate(refs(1))
            mock_clock.jump(1)
        lines = said(caplog, logging.WARNING) + said(caplog, logging.INFO)
        assert len(lines) == 2, lines  # the first outage, its end; the others are counted
        flapping.down = True
        await locator.locate(refs(1))  # the 11th begins, 20 s after the first warning
        await locator.locate(refs(1))
        flapping.down = False
        await locator.locate(refs(1))
    # Closed before a minute had passed: what was not said yet is said then.
    warnings = said(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert "10 outages" in warnings[1] and "20 lookups failed" in warnings[1]
    assert "connection refused" in warnings[1]
