"""Prometheus metrics: `run --metrics` scraped over HTTP while real children answer, fail and
crash; the metrics plugin fed by the same observer hooks a third-party plugin gets; the
--metrics address rules."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import socket
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from helpers.frontend import (
    dext_run_async,
    make_task,
    running,
    write_config,
)
from helpers.supervisor import builtin_child, spec, window_task
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import wait_all_tasks_blocked

from damocles_ext.api import open_supervisor
from damocles_ext.client import connect
from damocles_ext.errors import ProverError, UsageError
from damocles_ext.hookspecs import OUTCOMES, hookimpl
from damocles_ext.metrics import SupervisorMetrics, parse_listen_address
from damocles_ext.plugins import call_observers, get_plugin_manager


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


async def scrape(url: str) -> dict:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return response.read().decode()

    return samples(await trio.to_thread.run_sync(get))


# -- a real `run`, scraped over HTTP -----------------------------------------------------------


async def test_counters_move_after_requests_and_a_child_crash(tmp_path: Path, sock_dir: Path):
    cfg = write_config(
        tmp_path,
        """
[[WdPost]]
Plugin = "sleep"
Concurrent = 2
PluginOptions = { seconds = 1.5, progress_interval = 0.05 }

[[WinPost]]
Plugin = "sleep"
MaxAttempts = 1
PluginOptions = { seconds = 0.2, fail = "crash" }
""",
    )
    path = sock_dir / "control.sock"
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path, "--metrics", "127.0.0.1:0", "--restart-delay", "30") as (
            run,
            log,
        ),
    ):
        with trio.fail_after(40):
            line = await log.wait_for("metrics on http://127.0.0.1:")
            url = line.split("metrics on ", 1)[1].strip()
            assert url.endswith("/metrics")
            await log.wait_for("window_post#0 (pid")
            await log.wait_for("winning_post#0 (pid")
            m = await scrape(url)
            for stage in ("window_post", "winning_post"):
                for outcome in OUTCOMES:  # present from the start, so rate() works at once
                    assert (
                        value(m, "damocles_ext_requests_total", stage=stage, outcome=outcome) == 0
                    )
                for series in ("request_duration_seconds", "request_deadline_slack_seconds"):
                    assert value(m, f"damocles_ext_{series}_count", stage=stage) == 0
                assert value(m, "damocles_ext_request_deadlines_missed_total", stage=stage) == 0
            for child, stage in (
                ("window_post#0", "window_post"),
                ("winning_post#0", "winning_post"),
            ):
                assert value(m, "damocles_ext_child_restarts_total", stage=stage, child=child) == 0
                assert value(m, "damocles_ext_child_exits_total", stage=stage, child=child) == 0
            assert (
                value(m, "damocles_ext_child_capacity", stage="window_post", child="window_post#0")
                == 2
            )
            assert value(m, "process_cpu_seconds_total") is not None  # the supervisor's own

            async with connect(path) as client:
                # Two requests with a deadline: in flight together, then answered "ok".
                deadline = time.time() + 120
                progressing = [trio.Event(), trio.Event(), trio.Event()]

                async def prove(i: int) -> None:
                    await client.submit(
                        make_task(10 + i),
                        deadline=deadline,
                        on_progress=lambda p: progressing[i].set(),
                    )

                async with trio.open_nursery() as requests:
                    requests.start_soon(prove, 0)
                    requests.start_soon(prove, 1)
                    await progressing[0].wait()
                    await progressing[1].wait()
                    requests.start_soon(prove, 2)  # both slots are taken: this one waits
                    # It reaches run over a socket, maybe after a first scrape: scrape until run
                    # has queued it (well within the 1.5 s the two running ones take).
                    m = await scrape(url)
                    while value(m, "damocles_ext_requests_queued", stage="window_post") != 1:
                        await trio.sleep(0.01)
                        m = await scrape(url)
                    assert value(m, "damocles_ext_requests_in_flight", stage="window_post") == 2
                    assert (
                        value(
                            m,
                            "damocles_ext_child_requests_in_flight",
                            stage="window_post",
                            child="window_post#0",
                        )
                        == 2
                    )
                    assert value(m, "damocles_ext_requests_queued", stage="window_post") == 1
                    assert (
                        abs(
                            value(
                                m,
                                "damocles_ext_queue_nearest_deadline_timestamp_seconds",
                                stage="window_post",
                            )
                            - deadline
                        )
                        < 1
                    )
                    busy = value(
                        m,
                        "damocles_ext_child_state",
                        stage="window_post",
                        child="window_post#0",
                        state="busy",
                    )
                    assert busy == 1
                    assert (
                        value(
                            m,
                            "damocles_ext_child_resident_memory_bytes",
                            stage="window_post",
                            child="window_post#0",
                        )
                        > 1 << 20
                    )
                    assert (
                        value(
                            m,
                            "damocles_ext_child_cpu_seconds_total",
                            stage="window_post",
                            child="window_post#0",
                        )
                        > 0
                    )
                m = await scrape(url)
                assert (
                    value(m, "damocles_ext_requests_total", stage="window_post", outcome="ok") == 3
                )
                assert (
                    value(m, "damocles_ext_request_duration_seconds_count", stage="window_post")
                    == 3
                )
                assert (
                    value(m, "damocles_ext_request_duration_seconds_sum", stage="window_post")
                    >= 3 * 1.5
                )
                assert (
                    value(
                        m,
                        "damocles_ext_request_deadline_slack_seconds_count",
                        stage="window_post",
                    )
                    == 3
                )
                # (No _sum: prometheus_client leaves it out of histograms with negative buckets.)
                slack = "damocles_ext_request_deadline_slack_seconds_bucket"
                assert value(m, slack, stage="window_post", le="60.0") == 0
                assert value(m, slack, stage="window_post", le="120.0") == 3
                missed = "damocles_ext_request_deadlines_missed_total"
                assert value(m, missed, stage="window_post") == 0
                assert (
                    value(
                        m,
                        "damocles_ext_request_deadline_slack_seconds_bucket",
                        stage="window_post",
                        le="0.0",
                    )
                    == 0
                )
                assert value(m, "damocles_ext_requests_in_flight", stage="window_post") == 0

                # The WinningPoSt child crashes half-way: the request fails, the child restarts.
                with pytest.raises(ProverError, match="exit code 3"):
                    await client.submit(make_task(20, stage="winning_post"))
            await log.wait_for("winning_post#0: restarting in")
            m = await scrape(url)
            assert (
                value(m, "damocles_ext_requests_total", stage="winning_post", outcome="error") == 1
            )
            assert value(m, "damocles_ext_requests_total", stage="winning_post", outcome="ok") == 0
            assert (
                value(
                    m,
                    "damocles_ext_child_exits_total",
                    stage="winning_post",
                    child="winning_post#0",
                )
                == 1
            )
            assert (
                value(
                    m,
                    "damocles_ext_child_restarts_total",
                    stage="winning_post",
                    child="winning_post#0",
                )
                == 1
            )
            states = {
                s: value(
                    m,
                    "damocles_ext_child_state",
                    stage="winning_post",
                    child="winning_post#0",
                    state=s,
                )
                for s in ("ready", "busy", "backoff")
            }
            assert states == {"ready": 0, "busy": 0, "backoff": 1}
            # A process that no longer exists has no memory to report.
            assert (
                value(
                    m,
                    "damocles_ext_child_resident_memory_bytes",
                    stage="winning_post",
                    child="winning_post#0",
                )
                is None
            )
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()
    # The server went away with the supervisor.
    with pytest.raises(urllib.error.URLError):
        await scrape(url)


def test_a_childs_cpu_counter_never_goes_back_but_for_a_restart():
    # A process in the child's tree that exits before its own children leaves them out of the
    # walk: the sum drops (5 s to 1 s) while the child runs on. A restart starts from 0.
    from damocles_ext.metrics import never_back

    seen: dict[str, tuple[int, float]] = {}
    said = [never_back(seen, "window_post#0", pid, s) for pid, s in
            [(10, 2.0), (10, 5.0), (10, 1.0), (10, 6.0), (11, 0.5), (11, 0.7)]]  # fmt: skip
    assert said == [2.0, 5.0, 5.0, 6.0, 0.5, 0.7]
    assert never_back(seen, "window_post#1", 10, 0.1) == 0.1  # per child


@contextlib.asynccontextmanager
async def flaky_beside_healthy(tmp_path: Path, sock_dir: Path, fail: str):
    """`run` with two sleep children, window_post#0 failing as `fail` says, window_post#1
    proving, and its metrics: (metrics URL, control socket, log) once both children are ready
    (else one takes every request, the other none), within 40 s."""
    cfg = write_config(
        tmp_path,
        f"""
[[WdPost]]
Plugin = "sleep"
PluginOptions = {{ seconds = 0, fail = "{fail}", load_delay = 0.3 }}

[[WdPost]]
Plugin = "sleep"
PluginOptions = {{ seconds = 0 }}
""",
    )
    path = sock_dir / "control.sock"
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path, "--metrics", "127.0.0.1:0") as (_run, log),
    ):
        with trio.fail_after(40):
            line = await log.wait_for("metrics on http://127.0.0.1:")
            first = await log.wait_for("): ready (")
            await log.wait_for("): ready (", log.lines.index(first) + 1)
            yield line.split("metrics on ", 1)[1].strip(), path, log


async def test_a_benched_child_shows_in_its_gauge_and_in_status(tmp_path: Path, sock_dir: Path):
    # window_post#0 fails every request at once (a GPU gone bad), window_post#1 proves.
    async with flaky_beside_healthy(tmp_path, sock_dir, "always") as (url, path, log):
        m = await scrape(url)
        for child in ("window_post#0", "window_post#1"):
            assert value(m, "damocles_ext_child_benched", stage="window_post", child=child) == 0
        async with connect(path) as client:
            failed = 0
            for _ in range(12):  # one at a time: both idle each time, the same miner
                try:
                    await client.submit(make_task(1000))
                except ProverError:
                    failed += 1
            status = await client.status()
        assert failed == 0  # each error of #0 ran again on #1; its third benched it
        m = await scrape(url)
        on = {"stage": "window_post"}
        assert value(m, "damocles_ext_child_benched", **on, child="window_post#0") == 1
        assert value(m, "damocles_ext_child_benched", **on, child="window_post#1") == 0
        (broken,) = [c for c in status.children if c.name == "window_post#0"]
        assert 0 < broken.benched_for <= 30 and not broken.on_probation
        await log.wait_for("answered its last 3 requests with an error")


async def test_a_child_failing_now_and_then_shows_in_its_counters_though_each_retry_proved(
    tmp_path: Path, sock_dir: Path
):
    # window_post#0 fails every other request (never three in a row: it is never benched),
    # window_post#1 proves each of them again: every request is answered ok, and only the
    # per-child counters (the same as status's DONE and FAILED) and the retries show #0.
    on = {"stage": "window_post"}
    async with flaky_beside_healthy(tmp_path, sock_dir, "every:2") as (url, path, _log):
        m = await scrape(url)
        assert value(m, "damocles_ext_request_retries_total", **on) == 0  # there from the start
        for child in ("window_post#0", "window_post#1"):
            for name in ("done", "failed"):
                assert value(m, f"damocles_ext_child_requests_{name}_total", **on,
                             child=child) == 0  # fmt: skip
        async with connect(path) as client:
            for _ in range(20):  # one at a time: both idle each time
                await client.submit(make_task(1000))
            status = await client.status()
        m = await scrape(url)
    assert value(m, "damocles_ext_requests_total", **on, outcome="ok") == 20
    counted = {
        child: tuple(
            value(m, f"damocles_ext_child_requests_{name}_total", **on, child=child)
            for name in ("done", "failed")
        )
        for child in ("window_post#0", "window_post#1")
    }
    assert counted == {c.name: (c.done, c.failed) for c in status.children}
    flaky_done, flaky_failed = counted["window_post#0"]
    assert flaky_failed >= 1 and flaky_done in (flaky_failed, flaky_failed + 1)
    assert counted["window_post#1"] == (20 - flaky_done, 0)
    # Each failure of #0 ran again on #1.
    assert value(m, "damocles_ext_request_retries_total", **on) == flaky_failed


async def test_a_stage_without_children_has_its_series_at_0_before_its_first_refusal(
    tmp_path: Path, sock_dir: Path
):
    # A run with no [[WinPost]]: a WinningPoSt sent to it anyway (a damocles-manager whose
    # `serve --connect` checked an earlier config) is refused, counted under winning_post. Its
    # series must be there before it, or increase() never sees that first refusal.
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    path = sock_dir / "control.sock"
    async with (
        trio.open_nursery() as nursery,
        running(nursery, cfg, path, "--metrics", "127.0.0.1:0") as (run, log),
    ):
        with trio.fail_after(40):
            line = await log.wait_for("metrics on http://127.0.0.1:")
            url = line.split("metrics on ", 1)[1].strip()
            await log.wait_for("window_post#0 (pid")
            m = await scrape(url)
            for outcome in OUTCOMES:
                assert value(m, "damocles_ext_requests_total", stage="winning_post",
                             outcome=outcome) == 0  # fmt: skip
            for series in ("request_duration_seconds", "request_deadline_slack_seconds"):
                assert value(m, f"damocles_ext_{series}_count", stage="winning_post") == 0
            assert (
                value(m, "damocles_ext_request_deadlines_missed_total", stage="winning_post") == 0
            )
            async with connect(path) as client:
                # The caller's to fix: a usage error, said by the answer (Response.kind).
                with pytest.raises(UsageError, match=r"has no \[\[WinPost\]\] child, so it"):
                    await client.submit(make_task(20, stage="winning_post"))
                # status lists the stage from then on (docs/STATUS.md), with no child.
                stages = {s.stage: s for s in (await client.status()).stages}
                assert (stages["winning_post"].children, stages["winning_post"].queued) == (0, 0)
            m = await scrape(url)
            assert value(m, "damocles_ext_requests_total", stage="winning_post",
                         outcome="error") == 1  # fmt: skip
            run.send_signal(signal.SIGTERM)
            assert await run.wait() == 0, log.text()


async def test_bad_metrics_address_exits_2_before_anything_starts(tmp_path: Path, sock_dir: Path):
    cfg = write_config(tmp_path, '[[WdPost]]\nPlugin = "echo"\n')
    done = await dext_run_async("run", "-c", str(cfg), "--socket", str(sock_dir / "c.sock"),
                                "--metrics", "localhost:http")  # fmt: skip
    assert done.returncode == 2
    assert b"--metrics: 'localhost:http': expected HOST:PORT" in done.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        done = await dext_run_async("run", "-c", str(cfg), "--socket", str(sock_dir / "c.sock"),
                                    "--metrics", f"127.0.0.1:{port}")  # fmt: skip
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr.decode()
    err = done.stderr.decode()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert "started pid" not in err  # no child was spawned
    assert not (sock_dir / "c.sock").exists()  # nor the socket left behind


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("metrics-host.local:0", ("metrics-host.local", 0)),
    ],
)
def test_metrics_address_defaults_to_loopback(text, expected):
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host:", "the port is not a number"),
        ("127.0.0.1:70000", "port 70000 is not in 0..65535"),
        ("::1:9100", "IPv6 address in brackets"),
        ("bad host:9100", "is not an IP address or host name"),
    ],
)
def test_bad_metrics_address_says_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_listen_address(text)


# -- the observer hooks carry what the metrics count ----------------------------------------------


async def test_observer_hooks_carry_outcome_duration_and_slack_like_the_metrics():
    seen = []
    both = trio.Event()

    class Alerts:
        @hookimpl
        async def dext_request_finished(self, request, outcome, duration, slack):
            seen.append((request.stage, outcome, duration, slack))
            if len(seen) == 2:
                both.set()

    metrics = SupervisorMetrics(process_metrics=False)
    pm = get_plugin_manager(entry_points=False)
    pm.register(Alerts(), name="alerts")
    pm.register(metrics, name="damocles_ext.metrics")
    children = [spec(builtin_child("window_post", "echo"))]
    async with open_supervisor(children, plugin_manager=pm) as sup:
        metrics.attach(sup, trio.lowlevel.current_trio_token())
        await sup.wait_ready()
        deadline = time.time() + 60
        await sup.submit(window_task(1), deadline=deadline)
        await sup.submit(window_task(2))
        # The collector runs where Prometheus' HTTP thread would: off the trio thread.
        from prometheus_client import generate_latest

        await both.wait()  # observers run on their own task, after the answers
        text = await trio.to_thread.run_sync(generate_latest, metrics.registry)
    m = samples(text.decode())
    assert [s[:2] for s in seen] == [("window_post", "ok"), ("window_post", "ok")]
    assert 59 < seen[0][3] <= 60 and seen[1][3] is None
    assert value(m, "damocles_ext_requests_total", stage="window_post", outcome="ok") == 2
    assert value(
        m, "damocles_ext_request_duration_seconds_sum", stage="window_post"
    ) == pytest.approx(seen[0][2] + seen[1][2])
    slack = "damocles_ext_request_deadline_slack_seconds_bucket"
    assert value(m, slack, stage="window_post", le="30.0") == 0
    assert value(m, slack, stage="window_post", le="60.0") == 1  # only the request with one
    assert (
        value(
            m, "damocles_ext_child_state", stage="window_post", child="window_post#0", state="ready"
        )
        == 1
    )


async def test_a_slow_observer_plugin_holds_no_counter_back():
    # The metrics are counted as each request is answered, not in the plugins' queue behind a
    # webhook that takes its full timeout per event.
    from prometheus_client import generate_latest

    release = trio.Event()

    class SlowWebhook:
        @hookimpl
        async def dext_request_finished(self, request, outcome, duration, slack):
            await release.wait()  # a webhook that does not answer (until the test is done)

    metrics = SupervisorMetrics(process_metrics=False)
    pm = get_plugin_manager(entry_points=False)
    pm.register(SlowWebhook(), name="slow")
    children = [spec(builtin_child("window_post", "echo"))]
    async with open_supervisor(children, plugin_manager=pm, inline_observers=[metrics]) as sup:
        metrics.attach(sup, trio.lowlevel.current_trio_token())
        await sup.wait_ready()
        for k in range(3):
            await sup.submit(window_task(k))
        text = await trio.to_thread.run_sync(generate_latest, metrics.registry)
        release.set()
    m = samples(text.decode())
    assert value(m, "damocles_ext_requests_total", stage="window_post", outcome="ok") == 3


async def test_missed_deadlines_land_in_the_negative_slack_buckets():
    from prometheus_client import generate_latest

    from damocles_ext.hookspecs import RequestInfo

    metrics = SupervisorMetrics(process_metrics=False)
    pm = get_plugin_manager(entry_points=False)
    pm.register(metrics, name="damocles_ext.metrics")
    request = RequestInfo(id=1, stage="winning_post", child="winning_post#0", deadline=1.0)
    for outcome, slack in (("timeout", -12.0), ("ok", 3.0), ("fault", -0.5)):
        await call_observers(pm, "dext_request_finished", request=request, outcome=outcome,
                             duration=20.0, slack=slack)  # fmt: skip
    m = samples(generate_latest(metrics.registry).decode())
    bucket = "damocles_ext_request_deadline_slack_seconds_bucket"
    assert value(m, bucket, stage="winning_post", le="-10.0") == 1
    assert value(m, bucket, stage="winning_post", le="0.0") == 2
    assert value(m, bucket, stage="winning_post", le="5.0") == 3
    assert value(m, "damocles_ext_requests_total", stage="winning_post", outcome="timeout") == 1
    assert value(m, "damocles_ext_request_deadlines_missed_total", stage="winning_post") == 2
    assert value(m, "damocles_ext_requests_total", stage="winning_post", outcome="fault") == 1
    # Not attached to a supervisor: no gauges, and no error either.
    assert value(m, "damocles_ext_requests_queued", stage="winning_post") is None


@contextlib.contextmanager
def example_alerts(monkeypatch, url: str) -> Iterator[types.ModuleType]:
    """examples/dext-alerts-plugin imported to post to the webhook `url`: its module."""
    example = Path(__file__).resolve().parent.parent / "examples" / "dext-alerts-plugin"
    monkeypatch.syspath_prepend(str(example))
    monkeypatch.setenv("DEXT_ALERT_WEBHOOK", url)
    try:
        yield importlib.import_module("dext_alerts")
    finally:
        sys.modules.pop("dext_alerts", None)


async def crash_under_alerts(alerts: types.ModuleType, wait: Callable[[], bool]) -> bool:
    """A supervisor with `alerts` registered, whose child crashes on its one request; then
    `wait()` in a thread (True: what the test waits for came), before the supervisor stops."""
    pm = get_plugin_manager(entry_points=False)
    pm.register(alerts, name="alerts")
    child = builtin_child("window_post", "sleep", "seconds=0.2", "fail=crash")
    async with open_supervisor([spec(child, max_attempts=1)], plugin_manager=pm) as sup:
        await sup.wait_ready()
        with pytest.raises(ProverError, match="exit code 3"):
            await sup.submit(window_task(), deadline=time.time() + 60)
        return await trio.to_thread.run_sync(wait)


async def test_example_alerts_plugin_posts_when_a_child_crashes(monkeypatch):
    import http.server
    import json as json_module
    import threading

    posts: list[dict] = []
    two = threading.Event()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(json_module.loads(body))
            self.send_response(204)
            self.end_headers()
            if len(posts) >= 2:
                two.set()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    # A short poll_interval: shutdown() waits one (0.5 s by default).
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        with example_alerts(monkeypatch, f"http://127.0.0.1:{server.server_port}/") as alerts:
            assert await crash_under_alerts(alerts, lambda: two.wait(20))
    finally:
        server.shutdown()
        server.server_close()
    by_kind = {p["alert"]: p for p in posts}
    assert set(by_kind) == {"ProverChildDown", "ProofFailed"}  # not the shutdown at the end
    down = by_kind["ProverChildDown"]
    assert (down["child"], down["stage"]) == ("window_post#0", "window_post")
    assert down["how"].startswith("exit code 3")
    failed = by_kind["ProofFailed"]
    assert (failed["outcome"], failed["stage"], failed["child"]) == (
        "error",
        "window_post",
        "window_post#0",
    )
    assert 0 < failed["slack_s"] <= 60


async def test_an_inline_observer_that_raises_reaches_no_caller():
    import types

    from damocles_ext.supervisor.observers import Observers

    def broken(**kwargs):
        raise RuntimeError("a bug of an observer")

    seen = []
    observers = Observers(None, [types.SimpleNamespace(dext_child_exited=broken),
                                 types.SimpleNamespace(dext_child_exited=lambda **kw: seen.append(kw))])  # fmt: skip
    assert observers.open()
    observers.observe("dext_child_exited", child="c", status="s")  # does not raise
    assert seen == [{"child": "c", "status": "s"}]


async def test_an_event_after_the_observer_task_was_cancelled_is_dropped_not_an_error():
    # A run cancelled as a whole (its nursery's scope) ends the observers' task first: the
    # requests it answers as it goes (cancelled) must not each log an internal error.
    class Alerts:
        @hookimpl
        def dext_request_finished(self, request, outcome, duration, slack):
            pass

    from damocles_ext.supervisor.observers import Observers

    pm = get_plugin_manager(entry_points=False)
    pm.register(Alerts(), name="alerts")
    observers = Observers(pm)
    assert observers.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(observers.run)
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    observers.observe("dext_request_finished", request=None, outcome="cancelled",
                      duration=0.0, slack=None)  # fmt: skip


async def test_example_alerts_plugin_stuck_on_a_trickling_webhook_lets_the_next_alert_go(
    monkeypatch, caplog
):
    # A webhook that answers one byte at a time, each within the plugin's 5 s socket timeout,
    # holds its POST for as long as it trickles. The supervisor cuts the hook off after its
    # observer timeout; the alert after it must still be posted (before, the call could not be
    # cut off, and it held every later event of every observer).
    import json as json_module
    import socket as socket_module
    import threading

    from damocles_ext.supervisor import observers

    monkeypatch.setattr(observers, "OBSERVER_TIMEOUT", 0.5)
    listener = socket_module.create_server(("127.0.0.1", 0))
    stop, posted, posts = threading.Event(), threading.Event(), []

    def read_request(conn) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        while len(body) < length:
            body += conn.recv(65536)
        return body

    def serve() -> None:
        first = True
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            body = read_request(conn)
            if first:  # the first alert's answer trickles until the test ends
                first = False
                threading.Thread(target=trickle, args=(conn,), daemon=True).start()
                continue
            posts.append(json_module.loads(body))
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            posted.set()

    def trickle(conn) -> None:
        while not stop.wait(0.2):
            try:
                conn.sendall(b"H")
            except OSError:
                return
        conn.close()

    def second_posted() -> bool:
        # Two alerts: the first trickles; the second is posted once the first is cut off.
        try:
            return posted.wait(20)
        finally:
            stop.set()  # the trickle ends: the supervisor's shutdown need not wait for it

    threading.Thread(target=serve, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with example_alerts(monkeypatch, url) as alerts:
            assert await crash_under_alerts(alerts, second_posted)
    finally:
        stop.set()
        listener.close()
    assert len(posts) == 1 and posts[0]["alert"] in ("ProverChildDown", "ProofFailed")
    assert "did not return within 0.5s; cut off" in caplog.text


async def test_example_alerts_plugin_says_a_webhook_that_is_no_http_server_in_one_warning(
    monkeypatch, caplog
):
    # DEXT_ALERT_WEBHOOK at a port where something else listens (it answers, but not HTTP): a
    # warning naming the alert and the URL, as for a webhook that cannot be reached, and no
    # observer traceback (before: http.client's BadStatusLine escaped the hook).
    import socket as socket_module
    import threading

    listener = socket_module.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            conn.recv(65536)
            conn.sendall(b"-ERR unknown command\r\n")  # e.g. a redis
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        with example_alerts(monkeypatch, url) as alerts:
            from damocles_ext.hookspecs import RequestInfo

            request = RequestInfo(id=1, stage="window_post", child="window_post#0", deadline=None)
            await alerts.dext_request_finished(request, "error", 1.0, None)
    finally:
        listener.close()
    [warning] = [r for r in caplog.records if r.name == "dext_alerts"]
    assert warning.getMessage().startswith(f"could not post alert ProofFailed to {url}: ")


def test_an_address_not_up_yet_is_a_temporary_failure_a_port_taken_is_not():
    # At boot the address may not be assigned yet: exit code 75, which the systemd units start
    # again (they do not restart exit code 2); a port another program holds is the operator's
    # to change: exit code 2, said so.
    from damocles_ext.errors import EXIT_TEMPFAIL, EXIT_USAGE
    from damocles_ext.frontends.listeners import bind_tcp

    with pytest.raises(UsageError) as caught:  # 192.0.2.0/24: TEST-NET-1, never assigned
        bind_tcp("192.0.2.1", 0, doing="serve metrics", option="--metrics")
    assert caught.value.exit_code == EXIT_TEMPFAIL and "not up on this machine yet" in str(
        caught.value
    )
    taken = bind_tcp("127.0.0.1", 0, doing="serve metrics", option="--metrics")
    with taken, pytest.raises(UsageError) as caught:
        bind_tcp("127.0.0.1", taken.getsockname()[1], doing="serve metrics", option="--metrics")
    assert caught.value.exit_code == EXIT_USAGE and "choose another --metrics" in str(caught.value)


def test_a_coordinators_metrics_address_not_up_yet_on_its_listen_port_is_still_75():
    # --listen 127.0.0.1:P and --metrics <an address not up yet>:P (two addresses may share a
    # port): the metrics bind's "not up yet" became "it is --listen's port", exit 2.
    import argparse

    from damocles_ext.commands.coordinator import _bind_ports
    from damocles_ext.errors import EXIT_TEMPFAIL
    from damocles_ext.frontends.listeners import bind_tcp

    probe = bind_tcp("127.0.0.1", 0, doing="listen", option="--listen")
    port = probe.getsockname()[1]
    probe.close()
    args = argparse.Namespace(listen=("127.0.0.1", port), metrics=("192.0.2.1", port))
    with pytest.raises(UsageError) as caught:
        _bind_ports(args)
    assert caught.value.exit_code == EXIT_TEMPFAIL, caught.value
