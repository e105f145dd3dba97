"""The sector-location service against a server that answers as a damocles-manager source node
does (tests/helpers/damocles_source.py): paths of normal and upgraded sectors, split stores, an
unknown store, the source stopped or hanging mid-run, the cache's freshness (mock_clock), and a
third party's provider through the hook."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
from helpers.damocles_source import METHOD, DamoclesSource
from helpers.gojsonrpc import MethodError

from damocles_ext.hookspecs import hookimpl
from damocles_ext.jobs.client import RpcCallError, RpcClient
from damocles_ext.plugins import get_plugin_manager
from damocles_ext.sectors import (
    Bounds,
    SectorLocation,
    SectorProviderError,
    SectorRef,
    SectorSettings,
)
from damocles_ext.sectors.cache import CacheRules
from damocles_ext.sectors.locator import SectorLocator, open_locator
from damocles_ext.sectors.metrics import SectorMetrics
from damocles_ext.sectors.providers import MAX_INDEX_ANSWER, SourceNode, StoreScan

MINER = 1000


@pytest.fixture
def source():
    with DamoclesSource() as server:
        yield server


@pytest.fixture
def stores(tmp_path):
    made = {name: tmp_path / name for name in ("a", "b")}
    for path in made.values():
        path.mkdir()
    return {name: str(path) for name, path in made.items()}


def put_files(stores, number, sealed="a", cache=None, *, upgrade=False):
    """The sector's sealed file in store `sealed`, its cache dir in `cache` (default: the same)."""
    name = f"s-t0{MINER}-{number}"
    sealed_dir, cache_dir = ("update", "update-cache") if upgrade else ("sealed", "cache")
    sealed_path = Path(stores[sealed]) / sealed_dir / name
    cache_path = Path(stores[cache or sealed]) / cache_dir / name
    sealed_path.parent.mkdir(exist_ok=True)
    sealed_path.write_bytes(b"replica")
    cache_path.mkdir(parents=True, exist_ok=True)
    return str(sealed_path), str(cache_path)


def refs(*numbers, upgrade=False):
    return [SectorRef(MINER, n, upgrade) for n in numbers]


# --- the look-alike answers as damocles does ------------------------------------------------


async def test_the_source_look_alike_answers_found_not_found_and_a_bad_index_type_as_damocles(
    source,
):
    source.put(MINER, 1, "a")
    async with RpcClient(source.url) as client:
        found = await client.call(METHOD, "normal", {"Miner": MINER, "Number": 1})
        missing = await client.call(METHOD, "upgrade", {"Miner": MINER, "Number": 1})
        with pytest.raises(RpcCallError, match="sector indexer of type bogus is not supported"):
            await client.call(METHOD, "bogus", {"Miner": MINER, "Number": 1})
    assert found == {"Found": True, "Instance": {"SealedFile": "a", "CacheDir": "a"}}
    assert missing == {"Found": False, "Instance": {"SealedFile": "", "CacheDir": ""}}


# --- paths from store names -----------------------------------------------------------------


async def test_a_normal_sector_is_located_in_damocles_layout_from_the_source_store_names(
    source, stores
):
    source.put(MINER, 5, "a")
    sealed, cache = put_files(stores, 5)
    async with SectorLocator([SourceNode(source.url, stores)]) as locator:
        [answer] = await locator.locate(refs(5))
    assert answer.status == "found" and not answer.cached and answer.age == 0
    assert answer.location == SectorLocation(sealed, cache, "a", "a")
    assert answer.provider == f"source 127.0.0.1:{source.port}"
    assert source.calls == [(METHOD, ["normal", {"Miner": MINER, "Number": 5}])]


class NewerSource(DamoclesSource):
    """A source node of a newer damocles, whose answers carry a field this one does not know."""

    def _find(self, index_type, sid):
        answer = super()._find(index_type, sid)
        answer["Instance"]["UpdateFile"] = "somewhere"
        answer["Since"] = 1
        return answer


async def test_a_source_of_a_newer_damocles_with_more_fields_still_locates_sectors(stores):
    with NewerSource() as source:
        source.put(MINER, 5, "a")
        sealed, cache = put_files(stores, 5)
        async with SectorLocator([SourceNode(source.url, stores)]) as locator:
            [answer] = await locator.locate(refs(5))
    assert answer.status == "found", answer.detail
    assert answer.location == SectorLocation(sealed, cache, "a", "a")


async def test_a_source_answering_an_endless_body_fails_the_lookup_after_a_small_answer(stores):
    sent = 0

    async def endless(stream):
        nonlocal sent
        await stream.receive_some(65536)  # the request
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        await stream.send_all(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while sent < 128 * 1024 * 1024:
                await stream.send_all(chunk)
                sent += len(chunk)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, endless, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with SectorLocator([SourceNode(f"127.0.0.1:{port}", stores)]) as locator:
            [answer] = await locator.locate(refs(5))
        nursery.cancel_scope.cancel()
    assert answer.status == "error"
    assert f"larger than {MAX_INDEX_ANSWER} bytes" in answer.detail, answer.detail
    assert MAX_INDEX_ANSWER == 64 * 1024
    # Read no further than that: what the server got out is what the sockets' buffers hold.
    assert sent < 32 * 1024 * 1024


async def test_an_upgraded_sector_is_asked_in_the_upgrade_index_and_found_in_update_dirs(
    source, stores
):
    source.put(MINER, 7, "a", upgrade=True)
    sealed, cache = put_files(stores, 7, upgrade=True)
    async with SectorLocator([SourceNode(source.multiaddr, stores)]) as locator:
        [answer] = await locator.locate(refs(7, upgrade=True))
    assert answer.location == SectorLocation(sealed, cache, "a", "a")
    assert "/update/" in sealed and "/update-cache/" in cache
    assert source.calls == [(METHOD, ["upgrade", {"Miner": MINER, "Number": 7}])]


async def test_a_sector_split_over_two_stores_gets_each_path_from_its_own_store(source, stores):
    source.put(MINER, 6, "a", "b")
    sealed, cache = put_files(stores, 6, "a", "b")
    async with SectorLocator([SourceNode(source.url, stores)]) as locator:
        [answer] = await locator.locate(refs(6))
    assert answer.location == SectorLocation(sealed, cache, "a", "b")
    assert sealed.startswith(stores["a"]) and cache.startswith(stores["b"])


class WordySource(DamoclesSource):
    """A source node whose error for sector 9 is 60,000 characters long."""

    def _find(self, index_type, sid):
        if isinstance(sid, dict) and sid.get("Number") == 9:
            raise MethodError("sector indexer failed: " + "x" * 60_000)
        return super()._find(index_type, sid)


async def test_a_source_error_or_store_name_of_60_kb_gives_each_sector_a_reason_of_a_few_lines(
    stores,
):
    """The source's words went whole into each sector's reason: a source answering 60 KB errors
    (within the 64 KiB an answer may take) made a worker log 60 KB per sector of a job, a
    coordinator relay it to each proxy node's call, `sectors find` print it per sector."""
    with WordySource() as source:
        source.put(MINER, 8, "s" * 30_000)  # sealed and cache: 60 KB
        async with SectorLocator([SourceNode(source.url, stores)]) as locator:
            erred, named = await locator.locate(refs(9, 8))
    assert erred.status == named.status == "error"
    assert "sector indexer failed: xxx" in erred.detail and "(cut; " in erred.detail
    assert "store 'sss" in named.detail and "(30000 chars)" in named.detail
    assert "add the store that holds it" in named.detail
    assert len(erred.detail) < 1500 and len(named.detail) < 1500


async def test_an_unknown_store_name_is_an_error_naming_the_store_and_the_sector(source, stores):
    source.put(MINER, 8, "elsewhere")
    async with SectorLocator([SourceNode(source.url, stores)]) as locator:
        [answer] = await locator.locate(refs(8))
        status = locator.status()
    assert answer.status == "error" and answer.location is None
    assert "store 'elsewhere' is not known here" in answer.detail
    assert f"sector 8 of miner {MINER}" in answer.detail and "--store NAME=PATH" in answer.detail
    assert sum(status["source_errors"].values()) == 1


async def test_a_sector_the_source_does_not_know_is_not_found_and_not_an_error(source, stores):
    metrics = SectorMetrics()
    async with SectorLocator([SourceNode(source.url, stores)], metrics=metrics) as locator:
        [answer] = await locator.locate(refs(9))
        status = locator.status()
    assert answer.status == "not_found" and "not known to any provider" in answer.detail
    assert status["not_found"] == 1 and status["source_errors"] == {}
    assert metrics.registry.get_sample_value("damocles_ext_sector_not_found_total") == 1


# --- the cache ------------------------------------------------------------------------------


async def test_a_fresh_location_is_answered_from_the_cache_without_asking_the_source(
    source, stores, mock_clock
):
    source.put(MINER, 5, "a")
    put_files(stores, 5)
    rules = CacheRules(fresh_for=600, refresh_lead=60)
    async with SectorLocator([SourceNode(source.url, stores)], rules=rules) as locator:
        await locator.locate(refs(5))
        mock_clock.jump(599)
        [again] = await locator.locate(refs(5))
        assert source.finds() == 1
        assert again.found and again.cached and again.age == pytest.approx(599)
        mock_clock.jump(2)
        [asked] = await locator.locate(refs(5))
        status = locator.status()
    assert source.finds() == 2 and not asked.cached and asked.age == 0
    assert status["lookups"] == 3 and status["cache_hits"] == 1
    assert status["hit_rate"] == pytest.approx(1 / 3, abs=1e-3)


async def test_with_the_source_stopped_cached_locations_are_answered_if_their_files_are_there(
    source, stores, mock_clock
):
    for n in (1, 2, 3):
        source.put(MINER, n, "a")
        put_files(stores, n)
    metrics = SectorMetrics()
    node = SourceNode(source.url, stores)
    async with SectorLocator([node], metrics=metrics) as locator:
        first = await locator.locate(refs(1, 2, 3))
        assert all(a.found and not a.cached for a in first)
        source.stop()
        shutil.rmtree(first[2].location.cache_dir)  # sector 3's files vanish meanwhile
        mock_clock.jump(3600)
        one, two, three = await locator.locate(refs(1, 2, 3), time_left=1800)
        status = locator.status()
    for answer, before in ((one, first[0]), (two, first[1])):
        assert answer.found and answer.cached and answer.stale
        assert answer.age == pytest.approx(3600) and answer.location == before.location
        assert answer.provider == node.name and "last known location" in answer.detail
    assert three.status == "missing" and three.location == first[2].location
    assert "does not exist" in three.detail and "cannot connect" in three.detail
    assert status["stale_answers"] == 2 and status["missing"] == 1
    assert status["source_errors"] == {node.name: 3}
    assert "cannot connect" in status["last_source_error"]["message"]
    sample = metrics.registry.get_sample_value
    assert sample("damocles_ext_sector_stale_answers_total") == 2
    assert sample("damocles_ext_sector_source_errors_total", {"provider": node.name}) == 3


async def test_a_location_older_than_keep_for_is_not_given_when_the_source_is_down(
    source, stores, mock_clock
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    rules = CacheRules(fresh_for=60, refresh_lead=10, keep_for=3600)
    async with SectorLocator([SourceNode(source.url, stores)], rules=rules) as locator:
        await locator.locate(refs(1))
        source.stop()
        mock_clock.jump(3600)
        [answer] = await locator.locate(refs(1))
    assert answer.status == "error" and "no location of it is known" in answer.detail


async def test_a_sector_the_source_no_longer_knows_is_forgotten(source, stores, mock_clock):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    async with SectorLocator([SourceNode(source.url, stores)]) as locator:
        await locator.locate(refs(1))
        source.remove(MINER, 1)
        mock_clock.jump(3600)
        [gone] = await locator.locate(refs(1))
        assert gone.status == "not_found" and locator.cached(refs(1)[0]) is None


async def test_an_unreachable_source_is_not_asked_again_for_down_for_seconds(
    source, stores, mock_clock
):
    source.put(MINER, 1, "a")
    put_files(stores, 1)
    node = SourceNode(source.url, stores, down_for=2)
    async with SectorLocator([node], rules=CacheRules(fresh_for=0, refresh_lead=0)) as locator:
        source.stop()
        [refused] = await locator.locate(refs(1))
        source.start()  # back on the same port
        [skipped] = await locator.locate(refs(1))
        assert source.finds() == 0
        mock_clock.jump(2)
        [found] = await locator.locate(refs(1))
    assert refused.status == skipped.status == "error" and "cannot connect" in refused.detail
    assert "not asked, the source node could not be reached" in skipped.detail
    assert found.found and source.finds() == 1 and node.down is None


async def test_an_error_answer_names_the_providers_that_did_not_know_the_sector(source, stores):
    # The source down and the scan of the attached stores finding nothing: the operator is told
    # the scan was asked too (the next thing to look at), not the source's error alone.
    node = SourceNode(source.url, stores)
    source.stop()
    async with SectorLocator([node, StoreScan(stores)]) as locator:
        [answer] = await locator.locate(refs(9))
    assert answer.status == "error" and "cannot connect" in answer.detail
    assert f"(not known to {StoreScan(stores).name})" in answer.detail, answer.detail
    assert "no location of it is known from before" in answer.detail


class ErringSource(DamoclesSource):
    """A source node whose index answers sector 9 with the method's error (a coordinator whose
    own source is down, and which knows nothing of the sector)."""

    def _find(self, index_type, sid):
        if isinstance(sid, dict) and sid.get("Number") == 9:
            raise MethodError("finding sector 9 of miner 1000: no location of it is known")
        return super()._find(index_type, sid)


async def test_a_source_back_whose_first_answer_is_an_error_is_no_longer_taken_for_down(
    stores, mock_clock
):
    """The lookup asking the source again after an outage got the method's error for its
    sector: the source answered, yet it stayed marked down, so the next lookups went on asking
    it one at a time, the others failing at once with 'could not be reached'."""
    with ErringSource() as source:
        for n in (1, 2):
            source.put(MINER, n, "a")
            put_files(stores, n)
        node = SourceNode(source.url, stores, down_for=2)
        rules = CacheRules(fresh_for=0, refresh_lead=0)
        async with SectorLocator([node], rules=rules) as locator:
            source.stop()
            [refused] = await locator.locate(refs(1))
            source.start()
            mock_clock.jump(2)
            [erred] = await locator.locate(refs(9))
            both = await locator.locate(refs(1, 2))
    assert refused.status == "error" and node.down is None
    assert erred.status == "error" and "no location of it is known" in erred.detail
    assert [a.status for a in both] == ["found", "found"], [a.detail for a in both]


async def test_a_source_that_does_not_answer_is_asked_by_one_lookup_at_a_time_until_it_does(
    source, stores, mock_clock
):
    """A source that takes calls and never answers (hung, or its host black-holed) held every
    lookup for its whole bound, one after the other: a coordinator relaying a proxy node's
    hundred lookups had all its connections held, and turned its workers' heartbeats away."""
    for n in range(1, 8):
        source.put(MINER, n, "a")
        put_files(stores, n)
    node = SourceNode(source.url, stores, down_for=2)
    rules = CacheRules(fresh_for=0, refresh_lead=0)
    async with SectorLocator([node], rules=rules, bounds=Bounds(lookup_timeout=5)) as locator:
        source.hold()
        mock_clock.autojump_threshold = 0.5  # time moves when every task waits on the source
        [cut] = await locator.locate(refs(1))
        assert source.finds() == 1 and node.down is not None
        at_once = await locator.locate(refs(2, 3, 4))
        assert source.finds() == 1  # not asked: it did not answer a moment ago
        mock_clock.jump(2)
        probed = await locator.locate(refs(5, 6, 7))
        assert source.finds() == 2  # one lookup asks it again; the others do not wait on it
        source.release()
        mock_clock.jump(2)
        [found] = await locator.locate(refs(1))
        mock_clock.autojump_threshold = float("inf")
    assert cut.status == "error" and "no answer in the time this lookup had" in cut.detail
    assert all("not asked" in a.detail and "did not answer" in a.detail for a in at_once)
    assert sum("not asked" in a.detail for a in probed) == 2
    assert found.found and node.down is None


class GatedSource(DamoclesSource):
    """A source node that answers each sector only once the test opens its gate (a slow one);
    `asked[n]` is set when sector n's call has come."""

    def __init__(self, numbers):
        super().__init__()
        self.asked = {n: threading.Event() for n in numbers}
        self.gates = {n: threading.Event() for n in numbers}

    def _find(self, index_type, sid):
        number = sid.get("Number") if isinstance(sid, dict) else None
        if number in self.gates:
            self.asked[number].set()
            self.gates[number].wait()
        return super()._find(index_type, sid)


async def test_a_slow_source_that_answers_other_calls_meanwhile_is_not_marked_down(
    stores, mock_clock
):
    """A lookup cut after a second without its answer marked the source down even when the
    source answered other calls in that time: a slow but working source (a loaded machine, a
    large batch) was not asked again for down_for, then by one lookup at a time."""
    with GatedSource([1, 2]) as source:
        for n in (1, 2):
            source.put(MINER, n, "a")
            put_files(stores, n)
        node = SourceNode(source.url, stores, connections=2, down_for=2)
        first_answered = trio.Event()
        cut = []

        async def first() -> None:
            assert await node.find(refs(1)[0]) is not None
            first_answered.set()

        async def second() -> None:
            with trio.move_on_after(3):
                await node.find(refs(2)[0])
            cut.append(True)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                nursery.start_soon(second)
                for n in (1, 2):
                    await trio.to_thread.run_sync(source.asked[n].wait)
                mock_clock.jump(1.5)
                source.gates[1].set()  # the source answers the first call, slowly
                await first_answered.wait()
                mock_clock.jump(2)  # the second is cut 3.5 s after it was asked
        finally:
            for gate in source.gates.values():
                gate.set()
            await node.aclose()
    assert cut and node.down is None


async def lookup_past_the_sources_share(stores, mock_clock, scan: bool, share: float):
    """Sectors 1-4 asked of a source that answers one at a time, 1 after half of its `share`,
    and is still on 2 as its share ends; with `scan`, a scan of the stores after it. (locator,
    source, node, answers)."""
    with GatedSource([1, 2]) as source:
        for n in range(1, 5):
            source.put(MINER, n, "a")
        node = SourceNode(source.url, stores, connections=1)
        # One lookup at a time; the batch's 8 s less a 2 s reserve, shared by the providers.
        bounds = Bounds(batch_timeout=8, lookup_timeout=5, concurrency=1)
        answers: list = []
        try:
            locator = SectorLocator([node, StoreScan(stores)] if scan else [node], bounds=bounds)
            async with locator, trio.open_nursery() as nursery:

                async def lookup() -> None:
                    answers.extend(await locator.locate(refs(1, 2, 3, 4)))

                nursery.start_soon(lookup)
                await trio.to_thread.run_sync(source.asked[1].wait)
                mock_clock.jump(share / 2)
                source.gates[1].set()  # sector 1 answered
                await trio.to_thread.run_sync(source.asked[2].wait)
                mock_clock.jump(share / 2 + 1)  # sector 2's lookup is cut at the end of the share
        finally:
            for gate in source.gates.values():
                gate.set()
    return locator, source, node, answers


async def test_sectors_the_source_had_no_time_to_be_asked_for_say_so_not_that_they_timed_out(
    stores, mock_clock
):
    """A batch larger than the source could be asked for in its share of the time: the sectors
    never asked were each said to have had "no answer in the time this lookup had (at most 5 s)",
    as if the source had been slow on every one (`sectors find 0-23489`, 6,400 such rows)."""
    locator, source, node, answers = await lookup_past_the_sources_share(
        stores, mock_clock, scan=False, share=6.0
    )
    one, two, three, four = answers
    assert one.found and source.finds() == 2
    assert (
        two.status == "error" and "no answer in the time this lookup had (at most 5 s" in two.detail
    )
    for never in (three, four):
        assert never.status == "error" and "no answer in the time" not in never.detail
        assert (
            f"{never.sector}: not asked: the 6.0 s this provider had of the lookup's time ran out"
            " before its turn; 2 of 4 sectors were not asked (it answered 1 in that time); give"
            " the lookup more time, in proportion to its sectors, or ask for fewer sectors at once"
        ) in never.detail, never.detail
    # What a command says once, with its own advice (sectors find: --timeout).
    [(name, left)] = locator.unasked.items()
    assert name == left.provider == node.name
    assert (left.share, left.asked, left.answered, left.not_asked) == (6.0, 2, 1, 2)


@pytest.mark.parametrize("on_disk", [(3, 4), (3,)], ids=["scan-finds-all", "scan-finds-some"])
async def test_sectors_a_source_had_no_time_for_are_said_unasked_only_if_no_provider_found_them(
    stores, mock_clock, on_disk
):
    # The scan after the source was given the very sectors the source was not asked for: when
    # it found them all, a command still said they were "skipped as faults" (prove --comm-r)
    # or asked for a longer --timeout (sectors find).
    for n in on_disk:
        put_files(stores, n)
    locator, _, node, answers = await lookup_past_the_sources_share(
        stores,
        mock_clock,
        scan=True,
        share=3.0,  # half of the 6 s: the scan has the rest
    )
    found = [a.sector.number for a in answers if a.found]
    assert found == [1, *on_disk]
    for answer in answers[2:]:  # the source's word of them stays only on those not found
        assert ("not asked" in answer.detail) is (not answer.found), answer.detail
    if on_disk == (3, 4):
        assert locator.unasked == {}
    else:
        [(name, left)] = locator.unasked.items()
        assert name == node.name and (left.not_asked, left.found_later, left.missing) == (2, 1, 1)


# --- time bounds ----------------------------------------------------------------------------


async def test_a_hanging_source_is_answered_for_within_the_deadline_from_the_cache_and_scan(
    source, stores, mock_clock
):
    """A source that answers only after its caller's deadline (held until released) costs a
    batch at most its budget: the known sectors come from the cache (files checked), a sector
    never asked before from the scan of the stores."""
    for n in (1, 2):
        source.put(MINER, n, "a")
        put_files(stores, n)
    node = SourceNode(source.url, stores)
    # The scan sees store b only: sectors 1 and 2 (in a) must come from the cache.
    async with SectorLocator([node, StoreScan({"b": stores["b"]})]) as locator:
        await locator.locate(refs(1, 2))
        source.put(MINER, 3, "b")
        put_files(stores, 3, "b")
        mock_clock.jump(3600)
        source.hold()
        # Time moves only when every task waits (0.5 s of real time): the held calls' timers.
        mock_clock.autojump_threshold = 0.5
        start = trio.current_time()
        time_left = 20.0
        answers = await locator.locate(refs(1, 2, 3), time_left=time_left)
        took = trio.current_time() - start
        mock_clock.autojump_threshold = float("inf")
        source.release()
        status = locator.status()
    assert took <= Bounds().budget(time_left) == 5.0
    one, two, three = answers
    assert one.found and one.cached and two.found and two.cached
    assert three.found and three.provider == "scan of 1 store" and not three.cached
    assert three.location.sealed_store == "b"
    assert status["source_errors"][node.name] == 3


class Counting:
    """A provider that takes 1 s a lookup and counts how many it had at once at most."""

    name = "counting"

    def __init__(self):
        self.now = self.most = 0

    async def find(self, sector):
        self.now += 1
        self.most = max(self.most, self.now)
        await trio.sleep(1)
        self.now -= 1
        return SectorLocation(f"/s/{sector.number}", f"/c/{sector.number}")


async def test_lookups_to_one_provider_run_at_most_concurrency_at_once(autojump_clock):
    provider = Counting()
    locator = SectorLocator([provider], bounds=Bounds(concurrency=3, lookup_timeout=5))
    start = trio.current_time()
    answers = await locator.locate(refs(*range(12)))
    assert all(a.found for a in answers) and provider.most == 3
    assert trio.current_time() - start == pytest.approx(4)


async def test_a_large_batch_is_asked_by_a_few_tasks_not_one_per_sector(autojump_clock):
    # A million sectors as a million parked tasks took minutes and gigabytes to start and cancel,
    # far past the lookup's time, and the source was never asked.
    class Spawned(trio.abc.Instrument):
        count = 0

        def task_spawned(self, task):
            self.count += 1

    spawned = Spawned()
    provider = Recording()
    locator = SectorLocator([provider], bounds=Bounds(concurrency=4))
    trio.lowlevel.add_instrument(spawned)
    try:
        answers = await locator.locate(refs(*range(20_000)))
    finally:
        trio.lowlevel.remove_instrument(spawned)
    assert all(a.found for a in answers) and len(provider.asked) == 20_000
    assert spawned.count <= 4 + 1  # the workers (and the nursery's own)


async def test_a_lookup_never_queues_behind_the_background_refresh(autojump_clock):
    class Busy:
        name = "busy"

        def __init__(self):
            self.release = trio.Event()

        async def find(self, sector):
            if sector.number < 1000:  # the refresh's sectors: the provider is slow on them
                await self.release.wait()
            return SectorLocation(f"/s/{sector.number}", f"/c/{sector.number}")

    provider = Busy()
    rules = CacheRules(fresh_for=600, refresh_lead=120)
    locator = SectorLocator([provider], rules=rules, bounds=Bounds(concurrency=16))
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        locator.want(refs(*range(200)), within=60)  # due at once: 200 lookups in the background
        await trio.sleep(1)
        start = trio.current_time()
        [answer] = await locator.locate(refs(5000))
        assert answer.found and trio.current_time() == start  # no wait for a slot
        provider.release.set()
        nursery.cancel_scope.cancel()


async def test_the_refresh_and_lookups_together_keep_to_concurrency_calls(autojump_clock):
    provider = Counting()  # a provider that wants its calls one at a time
    rules = CacheRules(fresh_for=600, refresh_lead=120)
    locator = SectorLocator([provider], rules=rules, bounds=Bounds(concurrency=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        locator.want(refs(*range(20)), within=60)
        await trio.sleep(0.5)
        answers = await locator.locate(refs(100, 101))
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert all(a.found for a in answers) and provider.most == 1


async def test_a_slow_provider_leaves_the_next_one_its_share_of_the_time(autojump_clock):
    class Slow:
        name = "slow"

        async def find(self, sector):
            await trio.sleep_forever()

    class Quick:
        name = "quick"

        async def find(self, sector):
            return SectorLocation("/s", "/c")

    bounds = Bounds(lookup_timeout=100, batch_timeout=8, check_timeout=2)
    locator = SectorLocator([Slow(), Quick()], bounds=bounds)
    start = trio.current_time()
    [answer] = await locator.locate(refs(1))
    # The providers' phase is 8 - 2 s: half of it for the first provider.
    assert answer.provider == "quick" and trio.current_time() - start == pytest.approx(3)
    assert locator.status()["source_errors"] == {"slow": 1}


async def test_a_stalled_store_makes_the_last_known_check_say_missing_not_hang(
    autojump_clock, monkeypatch, tmp_path
):
    from damocles_ext.sectors import files

    class Down:
        name = "down"
        up = True

        async def find(self, sector):
            if self.up:
                return SectorLocation(str(tmp_path / "s"), str(tmp_path / "c"))
            raise OSError("unreachable")

    provider = Down()
    locator = SectorLocator([provider], rules=CacheRules(fresh_for=60, refresh_lead=10))
    await locator.locate(refs(1))
    provider.up = False
    stalled = threading.Event()  # a stat(2) on a dead mount: returns when the test ends
    monkeypatch.setattr(files, "location_problem", lambda location: stalled.wait() and "")
    await trio.sleep(120)
    try:
        start = trio.current_time()
        [answer] = await locator.locate(refs(1), time_left=60)
        assert trio.current_time() - start <= Bounds().budget(60)
    finally:
        stalled.set()
    assert answer.status == "missing" and "did not answer within" in answer.detail


async def test_a_stalled_store_fails_only_the_sectors_on_it(mock_clock, monkeypatch, tmp_path):
    from damocles_ext.sectors import files

    # Time jumps only after 0.5 s of real idleness: the healthy store's thread answers first.
    mock_clock.autojump_threshold = 0.5

    real = files.location_problem
    (tmp_path / "ok" / "sealed").mkdir(parents=True)
    (tmp_path / "ok" / "sealed" / "s").write_bytes(b"")
    (tmp_path / "ok" / "cache" / "c").mkdir(parents=True)
    places = {
        1: SectorLocation(str(tmp_path / "dead/sealed/s"), str(tmp_path / "dead/cache/c")),
        2: SectorLocation(str(tmp_path / "ok/sealed/s"), str(tmp_path / "ok/cache/c")),
    }

    class Down:
        name = "down"
        up = True

        async def find(self, sector):
            if self.up:
                return places[sector.number]
            raise OSError("unreachable")

    provider = Down()
    locator = SectorLocator([provider], rules=CacheRules(fresh_for=60, refresh_lead=10))
    await locator.locate(refs(1, 2))
    provider.up = False
    stalled = threading.Event()

    def stat_or_hang(location):
        if "/dead/" in location.sealed_file:
            stalled.wait()
        return real(location)

    monkeypatch.setattr(files, "location_problem", stat_or_hang)
    await trio.sleep(120)
    try:
        dead, ok = await locator.locate(refs(1, 2), time_left=60)
    finally:
        stalled.set()
    assert dead.status == "missing" and "did not answer within" in dead.detail
    assert ok.found and ok.cached and ok.stale


# --- background refresh ---------------------------------------------------------------------


class Recording:
    name = "recording"

    def __init__(self):
        self.asked: list[tuple[float, SectorRef]] = []

    async def find(self, sector):
        self.asked.append((trio.current_time(), sector))
        return SectorLocation(f"/s/{sector.number}", f"/c/{sector.number}")


async def test_wanted_sectors_are_refreshed_before_they_are_needed_and_then_answered_fresh(
    autojump_clock,
):
    provider = Recording()
    rules = CacheRules(fresh_for=600, refresh_lead=120)
    locator = SectorLocator([provider], rules=rules)
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        start = trio.current_time()
        locator.want(refs(1, 2), within=3600)
        await trio.sleep(3600)
        answers = await locator.locate(refs(1, 2))
        nursery.cancel_scope.cancel()
    assert [round(t - start) for t, _ in provider.asked] == [3480, 3480]
    assert all(a.found and a.cached for a in answers) and locator.status()["refreshes"] == 2


async def test_a_wanted_sector_no_provider_knows_is_asked_once_not_again_and_again(
    autojump_clock,
):
    class Nobody:
        name = "nobody"
        asked = 0

        async def find(self, sector):
            self.asked += 1

    provider = Nobody()
    locator = SectorLocator([provider], rules=CacheRules(fresh_for=600, refresh_lead=120))
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        locator.want(refs(1), within=600)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert provider.asked == 1


async def test_a_sector_looked_up_often_is_refreshed_ahead_so_lookups_never_wait(autojump_clock):
    provider = Recording()
    rules = CacheRules(fresh_for=100, refresh_lead=10, refresh_ahead=0.8)
    locator = SectorLocator([provider], rules=rules)
    async with trio.open_nursery() as nursery:
        await nursery.start(locator.refresh_forever)
        start = trio.current_time()
        hits = []
        for _ in range(10):  # a lookup every 30 s for 5 minutes
            [answer] = await locator.locate(refs(1))
            hits.append(answer.cached)
            await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert hits == [False] + [True] * 9
    times = [round(t - start) for t, _ in provider.asked]
    assert times[:4] == [0, 80, 160, 240]


# --- the hook -------------------------------------------------------------------------------


class SiteDatabase:
    """A third party's provider: the site's own records of where sectors are."""

    def __init__(self, root):
        self.root = root

    @hookimpl
    def dext_sector_providers(self, settings):
        root = self.root

        class Provider:
            name = "site-db"

            async def find(self, sector):
                if sector.number != 42:
                    return None
                return SectorLocation(f"{root}/x/{sector.number}", f"{root}/y/{sector.number}")

        return [Provider()]


async def test_a_plugin_provider_is_asked_before_the_built_in_ones(source, stores):
    source.put(MINER, 5, "a")
    put_files(stores, 5)
    pm = get_plugin_manager(entry_points=False)
    pm.register(SiteDatabase("/site"), name="site")
    settings = SectorSettings(proxy=source.url, stores=stores)
    async with await open_locator(settings, plugin_manager=pm) as locator:
        assert [p.name for p in locator.providers] == [
            "site-db",
            f"source 127.0.0.1:{source.port}",
            "scan of 2 stores",
        ]
        site, ours = await locator.locate(refs(42, 5))
    assert site.provider == "site-db" and site.location.sealed_file == "/site/x/42"
    assert ours.provider.startswith("source") and ours.found
    assert source.calls == [(METHOD, ["normal", {"Miner": MINER, "Number": 5}])]


@pytest.mark.parametrize("answered", [None, [], "sealed"], ids=["none", "list", "str"])
async def test_a_provider_batch_answer_that_is_not_a_mapping_fails_its_lookup_not_the_locator(
    stores, answered
):
    """A provider's find_batch answering None (a forgotten return) or a list escaped the
    locator as an AttributeError: the lookup raised, and the background refresh, which asks
    it again, took the worker or the coordinator down with it."""
    sealed, _ = put_files(stores, 5)

    class Forgetful:
        name = "site-db"

        async def find(self, sector):
            return None

        async def find_batch(self, sectors):
            return answered

    async with SectorLocator([Forgetful(), StoreScan(stores)]) as locator:
        [answer] = await locator.locate(refs(5))
        await locator.refresh(refs(5))
    assert answer.found and answer.location.sealed_file == sealed
    assert "site-db: sector 5 of miner 1000: find_batch answered" in answer.detail
    assert "not a mapping of sectors to locations" in answer.detail


async def test_a_provider_batch_answer_whose_lookups_raise_fails_its_lookup_not_the_locator(
    stores,
):
    """A find_batch answering a mapping of its own (a lazy view of its database) whose `get`
    raises: that raised out of the locator, outside the guard around the provider's call."""
    from collections.abc import Mapping

    sealed, _ = put_files(stores, 5)

    class Lazy(Mapping):
        def __getitem__(self, key):
            raise ConnectionError("the site database went away")

        def __iter__(self):
            return iter(())

        def __len__(self):
            return 0

        def get(self, key, default=None):
            return self[key]

    class Site:
        name = "site-db"

        async def find(self, sector):
            return None

        async def find_batch(self, sectors):
            return Lazy()

    async with SectorLocator([Site(), StoreScan(stores)]) as locator:
        [answer] = await locator.locate(refs(5))
        await locator.refresh(refs(5))
    assert answer.found and answer.location.sealed_file == sealed
    assert "site-db: sector 5 of miner 1000: ConnectionError: the site database went away" in (
        answer.detail
    )


async def test_a_provider_location_of_pathlib_paths_fails_its_lookup_and_the_next_answers(
    stores,
):
    """A provider's SectorLocation of pathlib.Path objects was taken as found: `sectors find`
    then died on it with a traceback (its table and its --json take text)."""
    import json

    sealed, cache = put_files(stores, 5)

    class Pathlib:
        name = "site-db"

        async def find(self, sector):
            return SectorLocation(Path(sealed), Path(cache))

    async with SectorLocator([Pathlib(), StoreScan(stores)]) as locator:
        [answer] = await locator.locate(refs(5))
    assert answer.found and answer.provider == "scan of 2 stores"
    assert answer.location == SectorLocation(sealed, cache, "a", "a")
    assert "site-db: sector 5 of miner 1000: answered SectorLocation(" in answer.detail
    assert "not a SectorLocation of str paths" in answer.detail
    json.dumps(answer.to_dict())


async def test_a_plugin_provider_that_calls_sys_exit_fails_its_lookup_and_the_next_answers(
    source, stores
):
    import sys

    source.put(MINER, 5, "a")
    put_files(stores, 5)

    class Exits:
        @hookimpl
        def dext_sector_providers(self, settings):
            class Provider:
                name = "exits"

                async def find(self, sector):
                    sys.exit(3)

            return [Provider()]

    pm = get_plugin_manager(entry_points=False)
    pm.register(Exits(), name="exits")
    async with await open_locator(
        SectorSettings(proxy=source.url, stores=stores), plugin_manager=pm
    ) as locator:
        [answer] = await locator.locate(refs(5))
    assert answer.found and answer.provider.startswith("source")


class PluginStop(BaseException):
    """A plugin's own BaseException (as gevent's GreenletExit is one)."""


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


class UnprintableProviderError(SectorProviderError):
    def __str__(self):
        raise RuntimeError("no text")


HOSTILE = {
    "asyncio-cancelled": asyncio.CancelledError,
    "own-base-exception": PluginStop,
    "unprintable": Unprintable,
    "unprintable-provider-error": UnprintableProviderError,
}


@pytest.mark.parametrize("batch", [False, True], ids=["find", "find_batch"])
@pytest.mark.parametrize("raised", list(HOSTILE), ids=list(HOSTILE))
async def test_a_provider_raising_a_base_exception_or_an_unprintable_one_fails_its_lookup_only(
    stores, raised, batch
):
    """A provider's asyncio.CancelledError or BaseException of its own escaped the locator (the
    worker's job, the coordinator's index, `sectors find` died of it), and one whose str()
    raised escaped as that error: each is now that provider's error for its sectors, and the
    next provider answers, in a lookup and in the background refresh."""
    sealed, _ = put_files(stores, 5)
    closed = []

    class Hostile:
        name = "hostile"

        async def find(self, sector):
            raise HOSTILE[raised]()

        async def aclose(self):
            raise HOSTILE[raised]()

    if batch:

        async def find_batch(self, sectors):
            raise HOSTILE[raised]()

        Hostile.find_batch = find_batch

    class Closes(StoreScan):
        async def aclose(self):
            closed.append(True)

    async with SectorLocator([Hostile(), Closes(stores)]) as locator:
        [answer] = await locator.locate(refs(5))
        await locator.refresh(refs(5))
    assert answer.found and answer.location.sealed_file == sealed
    assert answer.provider == "scan of 2 stores"
    name = HOSTILE[raised].__name__
    assert f"hostile: sector 5 of miner 1000: {name}" in answer.detail or (
        raised == "unprintable-provider-error" and f"hostile: <{name} whose text" in answer.detail
    ), answer.detail
    assert closed == [True]  # the next provider's close still ran


@pytest.mark.parametrize("raised", ["asyncio-cancelled", "own-base-exception", "unprintable"])
async def test_a_dext_sector_providers_raising_a_base_exception_or_an_unprintable_one_is_a_clear_error(
    raised,
):
    from damocles_ext.errors import UsageError

    class Broken:
        @hookimpl
        def dext_sector_providers(self, settings):
            raise HOSTILE[raised]()

    pm = get_plugin_manager(entry_points=False)
    pm.register(Broken(), name="broken")
    with pytest.raises(UsageError, match="dext_sector_providers failed") as caught:
        await open_locator(SectorSettings(), plugin_manager=pm)
    assert HOSTILE[raised].__name__ in str(caught.value)
    assert str(caught.value).startswith("plugin 'broken': its dext_sector_providers failed: ")


class _Unnamed:
    """A provider but for its name: a tuple, which the locator keys its logs and counts by."""

    name = ("site-db",)

    async def find(self, sector):
        return None


@pytest.mark.parametrize(
    "returned", [["not a provider"], [_Unnamed()], 42], ids=["str", "name-not-str", "no-list"]
)
async def test_a_plugin_returning_something_else_than_a_provider_is_a_clear_error(returned):
    # A provider whose name is no str was taken, and raised TypeError out of every lookup of a
    # running worker or coordinator; a hook's answer that is no list, a TypeError at start.
    from damocles_ext.errors import UsageError

    class Broken:
        @hookimpl
        def dext_sector_providers(self, settings):
            return returned

    class Fine:
        @hookimpl
        def dext_sector_providers(self, settings):
            return None  # (pluggy leaves it out of the results: they cannot tell whose is whose)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Broken(), name="broken")
    pm.register(Fine(), name="fine")  # registered last: called first
    with pytest.raises(UsageError, match="not a sector provider") as caught:
        await open_locator(SectorSettings(), plugin_manager=pm)
    assert str(caught.value).startswith("plugin 'broken': its dext_sector_providers returned ")


async def test_with_the_source_down_proofs_come_from_cached_locations_and_gone_sectors_are_faults(
    source, tmp_path, mock_clock
):
    """The prover's view: the source stops, a sector's files vanish; the located sectors still
    make a WindowPoSt that verifies, and the vanished one is a fault to declare, not an error."""
    from helpers.post import sectors

    from damocles_ext.post.reference import window_post
    from damocles_ext.post.verify import verify_window_post
    from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt

    proof_type = "StackedDrgWindow2KiBV1"
    manifest = sectors(tmp_path / "store", proof_type, 3, random_seed=11, miner=MINER)
    comm_r = {r.sector_id: bytes.fromhex(r.comm_r) for r in manifest.replicas}
    for number in comm_r:
        source.put(MINER, number, "s")
    wanted = refs(*sorted(comm_r))
    async with SectorLocator([SourceNode(source.url, {"s": str(tmp_path / "store")})]) as loc:
        await loc.locate(wanted)
        source.stop()
        gone = wanted[-1]
        Path(loc.cached(gone).location.sealed_file).unlink()
        mock_clock.jump(3600)
        answers = await loc.locate(wanted, time_left=1800)
    replicas = [
        PoStReplicaInfo(a.sector.number, comm_r[a.sector.number], a.location.cache_dir,
                        a.location.sealed_file)
        for a in answers
        if a.found
    ]  # fmt: skip
    task = WindowPoSt(MINER, proof_type, replicas, bytes(32))
    output = await trio.to_thread.run_sync(window_post, task)
    verify_window_post(task, output)
    assert output.proofs and not output.faults and len(replicas) == 2
    assert [a.sector for a in answers if a.status == "missing"] == [gone]


async def test_something_else_than_a_source_node_at_the_address_is_named_as_such():
    # A proxy in front of a stopped source answers HTML: the error says what should be there.
    async def html(stream):
        async with stream:
            await stream.receive_some(65536)
            page = b"<html>502 Bad Gateway</html>"
            await stream.send_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(page), page)
            )

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, html, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with SectorLocator([SourceNode(f"127.0.0.1:{port}", {})]) as locator:
            [answer] = await locator.locate(refs(1))
        nursery.cancel_scope.cancel()
    assert answer.status == "error"
    assert "a proxy in front answered for the server behind it, which is down" in answer.detail
    assert "check that server and that the address is a damocles source node's RPC" in (
        answer.detail
    )
    assert "worker-prover" not in answer.detail


async def test_a_last_known_path_with_a_nul_character_is_missing_not_a_crash():
    # A plugin's provider gave such a path: os.stat raised ValueError out of the check of the
    # last known location, and the whole lookup (a worker's job, a `sectors find`) with it.
    class Flapping:
        name = "flapping"
        up = True

        async def find(self, sector):
            if not self.up:
                raise RuntimeError("down")
            return SectorLocation("/s/\0x", "/c/x")

    provider = Flapping()
    locator = SectorLocator([provider], rules=CacheRules(fresh_for=0, refresh_lead=0))
    [first] = await locator.locate(refs(5))
    assert first.found
    provider.up = False  # asked again (nothing is fresh), fails: the last known is checked
    [answer] = await locator.locate(refs(5))
    assert answer.status == "missing" and "NUL character" in answer.detail
