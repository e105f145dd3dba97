"""`damocles-ext wdpost … --manager ADDRESS`: the operator's commands over the worker-prover RPC,
against a coordinator in this process (real HTTP, a real SQLite store); the table must be the one
the store-side commands print."""

from __future__ import annotations

import socket
import time

import pytest
import trio
from test_jobs_rules import make_input

from damocles_ext import cli
from damocles_ext.frontends.coordinator import Coordinator, CoordinatorServer
from damocles_ext.jobs import listing, model, rules
from damocles_ext.jobs.store import JobStore, TrioJobStore

T0 = 1_700_000_000.0
ANY = rules.AllocationSpec


def fill(store: JobStore) -> dict[str, model.JobRecord]:
    """Five jobs: ready, running, succeeded with a fault, failed at max try, succeeded."""
    made = {}
    for name, miner, at, kw in [
        ("ready", 1000, 0, {"deadline_idx": 3, "partitions": [1, 2]}),
        ("busy", 1001, 60, {"deadline_idx": 4, "partitions": [0]}),
        ("faulty", 1002, 120, {}),
        ("failed", 1003, 180, {}),
        ("fine", 1004, 240, {}),
    ]:
        made[name], _ = store.create(make_input(miner=miner, sectors=miner - 999), T0 + at, **kw)

    def take(name: str, worker: str, at: float) -> model.JobRecord:
        [job] = store.allocate(ANY((made[name].Input.MinerId,)), 1, worker, T0 + at)
        return job

    take("busy", "10.0.0.7", 100)
    faulty = take("faulty", "gpu-2", 130)
    failed = take("failed", "gpu-2", 190)
    store.heartbeat([made["busy"].Id], "10.0.0.7", T0 + 205)
    store.heartbeat([made["faulty"].Id], "gpu-2", T0 + 205)
    store.sweep(T0 + 210)  # gpu-2 went silent on "failed": retried
    failed = take("failed", "gpu-3", 220)
    fine = take("fine", "gpu-3", 250)
    store.finish(faulty.Id, model.JobOutput(proofs=(b"p",), faults=(5,)), "", T0 + 528,
                 lease=faulty.lease)  # fmt: skip
    store.finish(failed.Id, None, "sector 5:\tcache\nmissing", T0 + 3820, lease=failed.lease)
    store.finish(fine.Id, model.JobOutput(proofs=(b"q",), faults=()), "", T0 + 300,
                 lease=fine.lease)  # fmt: skip
    store.heartbeat([made["busy"].Id], "10.0.0.7", T0 + 497)
    return made


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path}/jobs.db"


async def dext(*argv: str) -> int:
    # The command runs its own trio loop: in a thread, beside the test's.
    return await trio.to_thread.run_sync(cli.main, list(argv))


async def serving(nursery: trio.Nursery, store: JobStore, **kw) -> CoordinatorServer:
    # On the test's clock (time.time as patched): its answers' Date, the listing's now.
    server = CoordinatorServer(
        Coordinator(TrioJobStore(store, clock=time.time)), "127.0.0.1", 0, **kw
    )
    await nursery.start(server.serve)
    return server


@pytest.mark.parametrize(
    "flags", [[], ["--all"], ["--detail"], ["--all", "--detail"]], ids=" ".join
)
async def test_list_over_rpc_prints_the_table_the_store_side_prints(
    store_url, capsys, monkeypatch, flags
):
    # The Elapsed and Heartbeat columns depend on the time: both runs see the same one.
    monkeypatch.setattr(time, "time", lambda: T0 + 4000)
    with JobStore.open(store_url) as store:
        made = fill(store)
        async with trio.open_nursery() as nursery:
            server = await serving(nursery, store)
            assert await dext("wdpost", "list", *flags, "--jobs", store_url) == 0
            from_store = capsys.readouterr().out
            address = f"/ip4/127.0.0.1/tcp/{server.port}"
            assert await dext("wdpost", "list", *flags, "--manager", address) == 0
            from_rpc = capsys.readouterr().out
            nursery.cancel_scope.cancel()
    assert from_rpc == from_store
    lines = from_rpc.splitlines()
    shown = {line.split()[0]: line for line in lines[1:]}
    assert ("Faults(1)" in shown.get(made["faulty"].Id, "")) == ("--all" in flags)
    assert (made["fine"].Id in shown) == ("--all" in flags)
    assert "2(Max)" in shown[made["failed"].Id] and "Failed" in shown[made["failed"].Id]
    busy = shown[made["busy"].Id].split()
    assert busy[5 if "--detail" in flags else 4] == "2"  # the Sectors cell, from the count
    assert "sector 5: cache missing" in shown[made["failed"].Id]


def test_the_briefs_of_a_damocles_manager_read_as_its_cli_reads_them():
    # damocles-manager zeroes the brief's input but the miner, and empties its output; an older
    # one sends a bare list without MaxTry.
    brief = {
        "Id": "3FgfEnvrub1", "State": "finished", "DeadlineIdx": 9, "Partitions": None,
        "Input": {"Sectors": None, "MinerId": 1000, "ProofType": "", "Seed": [0] * 32},
        "Output": {"proofs": None, "faults": None}, "TryNum": 1, "ErrorReason": "",
        "WorkerName": "10.0.0.5", "StartedAt": int(T0), "HeartbeatAt": int(T0) + 3,
        "FinishedAt": int(T0) + 398, "CreatedAt": int(T0), "UpdatedAt": int(T0) + 398,
        "Sectors": 2349, "Faults": 3,
    }  # fmt: skip
    jobs, max_try = listing.decode_all_jobs({"Jobs": [brief], "MaxTry": 1})
    assert max_try == 1
    table = listing.render_list(jobs, max_try=max_try, now=T0 + 500, show_all=True)
    cells = table.splitlines()[1].split()
    assert cells[:7] == ["3FgfEnvrub1", "1000", "9", "[]", "2349", "10.0.0.5", "Faults(3)"]
    assert cells[7] == "1(Max)" and cells[-2:] == ["6m38s(done)", "-"]
    assert listing.decode_all_jobs([brief]) == (jobs, None)
    assert listing.decode_all_jobs({"Jobs": None, "MaxTry": 2}) == ([], 2)


async def test_reset_remove_and_remove_all_over_rpc(store_url, capsys, tmp_path):
    with JobStore.open(store_url) as store:
        made = fill(store)
        ids = [j.Id for j in made.values()]
        async with trio.open_nursery() as nursery:
            server = await serving(nursery, store, token="t0k")
            token = str(tmp_path / "token")
            (tmp_path / "token").write_text("t0k\n")
            rpc = ["--manager", f"http://127.0.0.1:{server.port}", "--token-file", token]

            assert await dext("wdpost", "reset", *rpc, made["failed"].Id) == 0
            assert store.get(made["failed"].Id).TryNum == 0
            assert await dext("wdpost", "reset", *rpc, made["busy"].Id, "nope", ids[0]) == 2
            err = capsys.readouterr().err
            assert f"job 'nope' does not exist (reset before it: {made['busy'].Id})" in err
            assert store.get(made["busy"].Id).State == model.READY
            assert store.get(ids[0]).State == model.READY  # the one after was not reached

            assert await dext("wdpost", "remove", *rpc, made["fine"].Id, "nope") == 0
            assert store.get(made["fine"].Id) is None
            assert await dext("wdpost", "remove-all", *rpc) == 0
            assert (
                capsys.readouterr().out == "Pass --really-do-it to actually execute this action\n"
            )
            assert len(store.list_jobs()) == 4
            assert await dext("wdpost", "remove-all", "--really-do-it", *rpc) == 0
            removed = capsys.readouterr().out.splitlines()
            assert sorted(removed) == sorted(f"wdpost job {i} removed" for i in ids
                                             if i != made["fine"].Id)  # fmt: skip
            assert store.list_jobs() == []

            # Without the token: refused, exit 2, saying what to give.
            assert await dext("wdpost", "list", "--manager", f"127.0.0.1:{server.port}") == 2
            err = capsys.readouterr().err
            assert "requires a bearer token" in err and "--token-file" in err
            nursery.cancel_scope.cancel()


async def test_the_rpc_commands_say_what_is_wrong_without_a_traceback(store_url, capsys, tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        assert await dext("wdpost", "list", "--manager", f"/ip4/127.0.0.1/tcp/{port}") == 1
    err = capsys.readouterr().err
    assert f"cannot connect to http://127.0.0.1:{port}/rpc/v0" in err and "Traceback" not in err
    assert await dext("wdpost", "list", "--manager", "/ip4/1.2.3.4/udp/1") == 2
    assert "--manager: '/ip4/1.2.3.4/udp/1' is not a multiaddr" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("x\n")
    assert await dext("wdpost", "list", "--jobs", store_url, "--token-file", str(token)) == 2
    assert "--token-file goes with --manager" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["wdpost", "list", "--jobs", store_url, "--manager", "127.0.0.1:1789"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["wdpost", "remove", "x"])
    assert exited.value.code == 2
    assert "one of the arguments --jobs --manager is required" in capsys.readouterr().err


async def test_a_manager_url_ending_in_a_slash_reaches_the_rpc(store_url, capsys):
    # http://HOST:PORT/ (as a browser writes it) was POSTed to "/": HTTP 404, exit code 1.
    with JobStore.open(store_url) as store:
        made = fill(store)
        async with trio.open_nursery() as nursery:
            server = await serving(nursery, store)
            assert (
                await dext("wdpost", "list", "--manager", f"http://127.0.0.1:{server.port}/") == 0
            )
            nursery.cancel_scope.cancel()
    captured = capsys.readouterr()
    assert made["busy"].Id in captured.out and captured.err == "", captured.err


def test_list_of_a_server_whose_times_are_past_year_9999_shows_them_as_numbers(capsys):
    # Go's uint64 seconds: past what Python's dates hold it was an OverflowError traceback.
    from helpers.gojsonrpc import GoJsonRpcServer

    far = 2**64 - 1
    brief = {
        "Id": "3FgfEnvrub1", "State": "running", "DeadlineIdx": 9, "Partitions": [0],
        "Input": {"MinerId": 1000}, "Output": None, "TryNum": 1, "ErrorReason": "",
        "WorkerName": "10.0.0.5", "StartedAt": far, "HeartbeatAt": far, "FinishedAt": 0,
        "CreatedAt": 253402300800, "UpdatedAt": far, "Sectors": 2, "Faults": 0,
    }  # fmt: skip
    server = GoJsonRpcServer({"Venus.WdPoStAllJobs": lambda: {"Jobs": [brief], "MaxTry": 2}})
    with server:
        for flags in ([], ["--detail"]):
            assert cli.main(["wdpost", "list", "--manager", server.multiaddr, *flags]) == 0
            out = capsys.readouterr().out
            assert "253402300800" in out, out
            assert ("18446744073709551615" in out) == ("--detail" in flags), out


def test_a_servers_error_reaches_the_terminal_with_its_controls_escaped(capsys):
    # A server's (or a proxy's) error message went to stderr raw: an ESC sequence could clear
    # the screen or recolour it, a CR or LF forge a line.
    from helpers.gojsonrpc import GoJsonRpcServer, MethodError

    def refuse(*_):
        raise MethodError("job 'x' does not exist\x1b[2J\x1b[31mFAKE\nsecond line\rCR")

    server = GoJsonRpcServer({"Venus.WdPoStResetJob": refuse, "Venus.WdPoStRemoveJob": refuse})
    with server:
        for command in ("reset", "remove"):
            code = cli.main(["wdpost", command, "x", "--manager", server.multiaddr])
            err = capsys.readouterr().err
            assert code in (1, 2) and "\x1b" not in err and "\r" not in err, err
            assert err.count("\n") == 1, err  # one line
            assert "does not exist\\x1b[2J\\x1b[31mFAKE\\nsecond line\\rCR" in err, err


@pytest.mark.parametrize("proxied", [False, True])
async def test_list_over_rpc_reads_the_ages_on_the_coordinators_clock(
    monkeypatch, tmp_path, capsys, proxied
):
    # The coordinator stamps on its store's clock (the PostgreSQL server's): `wdpost list
    # --manager` on a machine 5 minutes ahead of it showed every heartbeat 5 minutes older.
    # Behind nginx the answer's Date is the proxy machine's (here that one): the ages are read
    # on the coordinator's own X-Dext-Clock.
    from helpers.frontend import date_rewriting_proxy

    monkeypatch.setattr(time, "time", lambda: T0 + 4000 + 300)
    with JobStore.open(f"sqlite:///{tmp_path}/jobs.db") as store:
        made = fill(store)
        async with trio.open_nursery() as nursery:
            coordinator = Coordinator(TrioJobStore(store, clock=lambda: T0 + 4000))
            server = CoordinatorServer(coordinator, "127.0.0.1", 0)
            await nursery.start(server.serve)
            port = server.port
            if proxied:
                [listener] = await nursery.start(date_rewriting_proxy, server.port, 0.0)
                port = listener.socket.getsockname()[1]
            assert await dext("wdpost", "list", "--manager", f"/ip4/127.0.0.1/tcp/{port}") == 0
            nursery.cancel_scope.cancel()
    (row,) = [line for line in capsys.readouterr().out.splitlines() if made["busy"].Id in line]
    assert row.split()[-2:] == ["1h5m0s", "58m23s"], row
