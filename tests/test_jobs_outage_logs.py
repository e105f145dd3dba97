"""A job store that is down is said once, and once more when it answers again: not a line per
pass or per call. A real PostgreSQL server, stopped and started again."""

from __future__ import annotations

import logging
from functools import partial

import trio

from damocles_ext.frontends.coordinator import Coordinator
from damocles_ext.jobs.store import JobStore, TrioJobStore


class Said(logging.Handler):
    """Sets `seen` once a record with `words` is logged."""

    def __init__(self, words: str) -> None:
        super().__init__()
        self.words, self.seen = words, trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.seen.set()


async def test_a_store_outage_is_one_warning_of_the_sweep_and_one_line_when_it_works_again(
    postgres_server, postgres_url, caplog
):
    caplog.set_level(logging.INFO, logger="damocles_ext.coordinator")
    back = Said("the sweep works again")
    logging.getLogger("damocles_ext.coordinator").addHandler(back)
    try:
        with JobStore.open(postgres_url) as store:
            coordinator = Coordinator(TrioJobStore(store))
            sweep, failing = coordinator.sweep_once, trio.Event()

            async def counted():  # the real pass; the fifth while the server is down says so
                if coordinator._sweep_outage.failures >= 5:
                    failing.set()
                return await sweep()

            coordinator.sweep_once = counted
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(coordinator.sweep_forever, 0.05))
                await trio.to_thread.run_sync(postgres_server.pause)
                try:
                    with trio.fail_after(30):
                        await failing.wait()  # a pass every 0.05 s, each failing
                finally:
                    await trio.to_thread.run_sync(postgres_server.resume)
                with trio.fail_after(30):
                    await back.seen.wait()
                nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("damocles_ext.coordinator").removeHandler(back)
    lines = [r.getMessage() for r in caplog.records if "the sweep" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("the sweep failed (")
    assert lines[0].endswith(
        "; it is tried again at each pass, and a line says when it works again"
    )
    assert lines[1].startswith("the sweep works again, after ")
    assert int(lines[1].split("after ")[1].split()[0]) >= 5
