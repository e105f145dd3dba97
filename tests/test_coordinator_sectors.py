"""The coordinator's Venus.SectorIndexerFind: read-only, from the job inputs it has seen and its
own source node, answered exactly as a damocles-manager source node answers; a locator uses the
coordinator as its source as it uses damocles."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio
from helpers.damocles_source import METHOD, DamoclesSource
from test_coordinator import Client, serving
from test_jobs_rules import T0, make_input

from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.frontends.sector_index import SectorIndex
from damocles_ext.jobs.store import TrioJobStore
from damocles_ext.sectors import SectorRef, SectorSettings
from damocles_ext.sectors.locator import SectorLocator
from damocles_ext.sectors.providers import SourceNode, build_providers

MINER = 1000
SPEC = {"AllowedMiners": [MINER], "AllowedProofTypes": ["StackedDrgWindow2KiBV1_2"]}


async def raw_answers(port: int, calls) -> list[tuple[int, bytes]]:
    client = Client(await trio.open_tcp_stream("127.0.0.1", port))
    answers = []
    for params in calls:
        body = b'{"jsonrpc":"2.0","method":"%s","params":%s,"id":1}' % (METHOD.encode(), params)
        answers.append(await client.post(body))
    return answers


async def test_the_coordinator_answers_as_a_damocles_source_node_does(sqlite_store):
    """The same index on both sides (sector 0 normal, sector 1 upgraded, sealed file in
    store-a, cache in store-b): the same HTTP status and body for every question."""
    await TrioJobStore(sqlite_store).create(make_input(miner=MINER, sectors=2))
    calls = [
        b'["normal",{"Miner":1000,"Number":0}]',
        b'["upgrade",{"Miner":1000,"Number":1}]',
        b'["normal",{"Miner":1000,"Number":1}]',  # upgraded: not in the normal index
        b'["normal",{"Miner":1000,"Number":7,"Extra":1}]',
        b'["normal",{"Number":0}]',  # Go: a missing Miner is 0
        b'["sealed",{"Miner":1000,"Number":0}]',
    ]
    with DamoclesSource() as source:
        source.put(MINER, 0, "store-a", "store-b")
        source.put(MINER, 1, "store-a", "store-b", upgrade=True)
        expected = await raw_answers(source.port, calls)
    async with trio.open_nursery() as nursery:
        server = await serving(nursery, sqlite_store)
        client = Client(await trio.open_tcp_stream("127.0.0.1", server.port))
        status, _ = await client.call("Venus.WdPoStAllocateJobs", SPEC, 1, "w1")
        assert status == 200
        got = await raw_answers(server.port, calls)
        nursery.cancel_scope.cancel()
    assert [status for status, _ in got] == [status for status, _ in expected]
    assert [json.loads(body) for _, body in got] == [json.loads(body) for _, body in expected]
    assert b'"Found":true' in got[0][1] and b"not supported" in got[-1][1]


@pytest.mark.parametrize("proxy", [False, True], ids=["alone", "with-a-source"])
async def test_a_miner_or_number_past_uint64_is_invalid_params_as_go_jsonrpc_answers(
    sqlite_store, proxy
):
    """go-jsonrpc cannot unmarshal a number past a uint64 (or below 0): HTTP 500, -32700.
    Before, one past 2^64-1 was Found:false alone and a method error (code 1) with --proxy."""
    calls = [
        b'["normal",{"Miner":18446744073709551616,"Number":1}]',
        b'["normal",{"Miner":1000,"Number":18446744073709551616}]',
        b'["normal",{"Miner":-1,"Number":1}]',
    ]
    async with trio.open_nursery() as nursery:
        with DamoclesSource() as source:
            index = SectorIndex()
            if proxy:
                settings = SectorSettings(proxy=source.url, stores={}, relay_names=True)
                index = SectorIndex(SectorLocator(build_providers(settings)))
            coordinator = Coordinator(TrioJobStore(sqlite_store), sector_index=index)
            server = CoordinatorServer(coordinator, "127.0.0.1", 0)
            await nursery.start(server.serve)
            got = await raw_answers(server.port, calls)
            nursery.cancel_scope.cancel()
        assert source.finds() == 0
    for status, body in got:
        error = json.loads(body)["error"]
        assert status == 500 and error["code"] == -32700, body
        assert "unmarshaling params for 'Venus.SectorIndexerFind' (param: 1)" in error["message"]


async def test_jobs_in_the_store_at_start_are_learned_and_nothing_is_changed(sqlite_store):
    await TrioJobStore(sqlite_store).create(make_input(miner=MINER, sectors=1))
    coordinator = Coordinator(TrioJobStore(sqlite_store))
    await coordinator.learn_sectors()
    index = coordinator.sector_index
    assert index.learned == {("normal", MINER, 0): ("store-a", "store-b")}
    assert not any(hasattr(index, name) for name in ("update", "put", "remove"))


async def test_a_locator_finds_sectors_through_a_chain_of_coordinator_and_damocles_source(
    sqlite_store, tmp_path
):
    """worker's locator -> coordinator (its --proxy, then its jobs) -> damocles source node:
    paths from either, the not-found case, and the source's errors passed on."""
    stores = {"store-a": str(tmp_path / "a"), "store-b": str(tmp_path / "b")}
    await TrioJobStore(sqlite_store).create(make_input(miner=MINER, sectors=1))
    with DamoclesSource() as source:
        source.put(MINER, 5, "store-b")  # only the source node knows sector 5
        upstream = SectorLocator(build_providers(SectorSettings(proxy=source.url, stores=stores)))
        coordinator = Coordinator(TrioJobStore(sqlite_store), sector_index=SectorIndex(upstream))
        await coordinator.learn_sectors()
        async with trio.open_nursery() as nursery:
            server = CoordinatorServer(coordinator, "127.0.0.1", 0)
            await nursery.start(server.serve)
            node = SourceNode(f"127.0.0.1:{server.port}", stores)
            async with SectorLocator([node]) as downstream:
                learned, proxied, unknown = await downstream.locate(
                    [SectorRef(MINER, 0), SectorRef(MINER, 5), SectorRef(MINER, 6)]
                )
                source.stop()
                [down] = await downstream.locate([SectorRef(MINER, 8)])
            nursery.cancel_scope.cancel()
        await upstream.aclose()
    assert (learned.location.sealed_file, learned.location.cache_dir) == (
        str(Path(stores["store-a"]) / "sealed" / f"s-t0{MINER}-0"),
        str(Path(stores["store-b"]) / "cache" / f"s-t0{MINER}-0"),
    )
    assert proxied.location.sealed_file == str(Path(stores["store-b"]) / "sealed" / "s-t01000-5")
    assert proxied.location.cache_store == "store-b"
    assert unknown.status == "not_found"
    assert down.status == "error" and "finding sector 8 of miner 1000" in down.detail
    assert coordinator.sector_index.status()["answered"] == {
        "learned": 1, "service": 1, "not_found": 1, "errors": 1,
    }  # fmt: skip


async def test_the_source_comes_first_its_store_names_pass_on_and_jobs_answer_when_it_is_down(
    sqlite_store,
):
    """A sector moved since its job was made is answered where the source says it is now, in a
    store this coordinator has not mounted (a damocles proxy node needs none); with the source
    down, from what it last heard of the source (names only: no files here to check), then
    from the job."""
    from damocles_ext.jobs.rpc import SectorId
    from damocles_ext.sectors.cache import CacheRules

    sector, sid = SectorRef(MINER, 0), SectorId(MINER, 0)
    moved = {"Found": True, "Instance": {"SealedFile": "store-c", "CacheDir": "store-c"}}
    await TrioJobStore(sqlite_store).create(make_input(miner=MINER, sectors=1))  # store-a, store-b
    with DamoclesSource() as source:
        source.put(MINER, 0, "store-c")  # moved to a store only the workers have
        settings = SectorSettings(proxy=source.url, stores={}, relay_names=True)
        rules = CacheRules(fresh_for=1e-9, refresh_lead=0)  # never fresh: asked each time
        index = SectorIndex(SectorLocator(build_providers(settings), rules=rules))
        coordinator = Coordinator(TrioJobStore(sqlite_store), sector_index=index)
        await coordinator.learn_sectors()
        assert await index.find("normal", sid) == moved
        source.stop()
        assert await index.find("normal", sid) == moved
        locator = index.locator.status()
        assert (locator["stale_answers"], locator["missing"]) == (1, 0)
        index.locator.cache.forget(sector)
        assert await index.find("normal", sid) == {
            "Found": True, "Instance": {"SealedFile": "store-a", "CacheDir": "store-b"},
        }  # fmt: skip
        await index.locator.aclose()
    assert index.status()["answered"] == {"learned": 1, "service": 2, "not_found": 0, "errors": 0}


async def test_a_sector_its_scan_finds_in_part_is_answered_from_its_job_not_the_scans_store(
    sqlite_store, tmp_path
):
    """The scan of its --store says sector 0 is missing (its cache directory there, its sealed
    file gone): no index says it is in that store, so its job's store names answer it, as
    before the scan said why; a sector no job names is not found."""
    from damocles_ext.jobs.rpc import SectorId

    (tmp_path / "cache" / f"s-t0{MINER}-0").mkdir(parents=True)
    (tmp_path / "cache" / f"s-t0{MINER}-2").mkdir()
    await TrioJobStore(sqlite_store).create(make_input(miner=MINER, sectors=1))  # store-a, store-b
    index = SectorIndex(SectorLocator(build_providers(SectorSettings(stores={"x": str(tmp_path)}))))
    coordinator = Coordinator(TrioJobStore(sqlite_store), sector_index=index)
    await coordinator.learn_sectors()
    assert (await index.locator.locate([SectorRef(MINER, 0)]))[0].status == "missing"
    assert await index.find("normal", SectorId(MINER, 0)) == {
        "Found": True, "Instance": {"SealedFile": "store-a", "CacheDir": "store-b"},
    }  # fmt: skip
    assert await index.find("normal", SectorId(MINER, 2)) == {
        "Found": False, "Instance": {"SealedFile": "", "CacheDir": ""},
    }  # fmt: skip
    await index.locator.aclose()


@pytest.mark.usefixtures("no_leftover_processes")
async def test_a_coordinator_with_a_source_and_no_stores_starts_and_passes_the_names_on(tmp_path):
    """With --proxy it relays the source's store names (a damocles proxy node needs no stores of
    its own): no --store or --conf-dir is asked for."""
    from helpers.frontend import CoordinatorProcess

    with DamoclesSource() as source:
        source.put(MINER, 5, "store-c")
        coordinator = CoordinatorProcess(
            f"sqlite:///{tmp_path}/jobs.db", "--proxy", f"127.0.0.1:{source.port}"
        )
        async with trio.open_nursery() as nursery:
            await coordinator.start(nursery)
            try:
                [(status, body)] = await raw_answers(
                    coordinator.port, [b'["normal",{"Miner":1000,"Number":5}]']
                )
            finally:
                coordinator.stop()
    assert status == 200
    assert json.loads(body)["result"] == {
        "Found": True, "Instance": {"SealedFile": "store-c", "CacheDir": "store-c"},
    }  # fmt: skip


@pytest.mark.usefixtures("no_leftover_processes")
async def test_the_coordinators_metrics_count_the_lookups_it_makes_through_its_source(tmp_path):
    # Each provider's source-errors series is served at 0 before its first failure, so that
    # increase() sees the first failures (the alert in OBSERVABILITY.md): a series that first
    # appears at 3 has no increase, and a short outage would never show.
    from helpers.frontend import CoordinatorProcess
    from test_metrics import scrape, value

    stores = [f"store-{n}={tmp_path / n}" for n in ("a", "b")]
    with DamoclesSource() as source:
        source.put(MINER, 5, "store-a", "store-b")
        coordinator = CoordinatorProcess(
            f"sqlite:///{tmp_path}/jobs.db",
            "--proxy", f"127.0.0.1:{source.port}", "--metrics", "127.0.0.1:0",
            *(arg for store in stores for arg in ("--store", store)),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await coordinator.start(nursery)
            try:
                assert coordinator.metrics_url is not None
                before = await scrape(coordinator.metrics_url)
                [(status, body)] = await raw_answers(
                    coordinator.port, [b'["normal",{"Miner":1000,"Number":5}]']
                )
                assert status == 200 and json.loads(body)["result"]["Found"] is True
                metrics = await scrape(coordinator.metrics_url)
            finally:
                coordinator.stop()
    errors = "damocles_ext_sector_source_errors_total"
    assert value(before, errors, provider=f"source 127.0.0.1:{source.port}") == 0
    assert value(before, errors, provider="scan of 2 stores") == 0
    assert value(metrics, "damocles_ext_sector_lookups_total") == 1


@pytest.mark.usefixtures("no_leftover_processes")
async def test_a_coordinator_with_a_source_stops_at_once_on_sigterm_and_logs_as_asked(tmp_path):
    """Its refresh of the source's sectors is stopped with the rest: a SIGTERM does not wait out
    the stop grace (the time the answers under way are given) when nothing is under way. And it
    logs as every long-running command does: --log-format json gives JSON lines."""
    import signal

    from helpers.frontend import CoordinatorProcess

    from damocles_ext.frontends.coordinator import STOP_GRACE

    with DamoclesSource() as source:
        coordinator = CoordinatorProcess(
            f"sqlite:///{tmp_path}/jobs.db", "--proxy", f"127.0.0.1:{source.port}",
            "--store", f"store-a={tmp_path / 'a'}", "--log-format", "json",
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await coordinator.start(nursery)
            assert coordinator.proc is not None
            try:
                coordinator.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(STOP_GRACE / 2):
                    assert await coordinator.proc.wait() == 0
            finally:
                coordinator.stop()
    lines = [json.loads(line) for line in coordinator.stderr.decode().splitlines()]
    messages = [(line["logger"], line["message"]) for line in lines]
    assert ("damocles_ext.coordinator", "stopped") in messages, messages
    assert all("time" in line and "level" in line for line in lines)


def test_the_sectors_learned_share_one_copy_of_their_store_names_and_miner():
    # Each decoded job input brings its own copies of its store names: kept per sector, the
    # index's 2,000,000 sectors at most took 650 MiB, half of it copies of a few names.
    from damocles_ext.jobs.model import WdPoStInput

    def decoded(sector: int) -> WdPoStInput:  # as the store reads a job: fresh strings each time
        sectors = [{"SectorId": sector, "CommR": [1] * 32, "Upgrade": False,
                    "Accesses": {"SealedFile": "store-a", "CacheDir": "store-b"}}]  # fmt: skip
        return msgspec.json.decode(
            json.dumps(
                {
                    "Sectors": sectors,
                    "MinerId": 12345,
                    "ProofType": "StackedDrgWindow32GiBV1_2",
                    "Seed": [0] * 32,
                }
            ),
            type=WdPoStInput,
        )

    index = SectorIndex()
    index.learn([decoded(1)])
    index.learn([decoded(2)])
    (k1, v1), (k2, v2) = index.learned.items()
    assert (k1, v1) == (("normal", 12345, 1), ("store-a", "store-b")) and v2 == v1
    assert v1 is v2 and k1[1] is k2[1]


async def test_past_its_limit_the_index_learned_at_start_keeps_the_newest_jobs_sectors(
    sqlite_store, monkeypatch
):
    # list_jobs gives the newest first: learned in that order, the trim past MAX_LEARNED took
    # the current jobs' sectors away and kept day-old ones (a proxy node's "not found").
    from damocles_ext.frontends import sector_index

    monkeypatch.setattr(sector_index, "MAX_LEARNED", 3)
    old, new = make_input(miner=MINER, sectors=3, seed=1), make_input(miner=MINER + 1, sectors=3)
    sqlite_store.create(old, T0 - 86400)
    sqlite_store.create(new, T0)
    coordinator = Coordinator(TrioJobStore(sqlite_store))
    await coordinator.learn_sectors()
    assert sorted(coordinator.sector_index.learned) == [
        ("normal", MINER + 1, 0), ("normal", MINER + 1, 2), ("upgrade", MINER + 1, 1),
    ]  # fmt: skip


def test_past_its_limit_the_index_forgets_the_oldest_learned_and_keeps_the_order(monkeypatch):
    from damocles_ext.frontends import sector_index

    monkeypatch.setattr(sector_index, "MAX_LEARNED", 4)
    index = SectorIndex()
    for miner in range(MINER, MINER + 5):  # 3 sectors each: 15 learned, 11 forgotten
        index.learn([make_input(miner=miner, sectors=3)])
    index.learn([make_input(miner=MINER + 3, sectors=1)])  # learned again: the newest now
    assert list(index.learned) == [
        ("normal", MINER + 4, 0), ("upgrade", MINER + 4, 1), ("normal", MINER + 4, 2),
        ("normal", MINER + 3, 0),
    ]  # fmt: skip
