"""Wording several layers share: the faulty sectors one line names."""

from __future__ import annotations

from damocles_ext.lifecycle.book import RequestBook
from damocles_ext.lifecycle.effects import Note, Send
from damocles_ext.tasks import PoStReplicaInfo, WindowPoSt, WindowPoStOutput
from damocles_ext.wording import SECTORS_NAMED, sector_list


def test_a_list_of_sectors_names_the_first_ones_and_counts_the_rest():
    assert sector_list([3, 9, 12]) == "3, 9, 12"
    many = list(range(100, 100 + SECTORS_NAMED + 5))
    assert sector_list(many) == ", ".join(map(str, many[:SECTORS_NAMED])) + " and 5 more"


def test_the_books_warning_of_faulty_sectors_names_as_many_as_prove_and_the_worker_do():
    replicas = [PoStReplicaInfo(n, bytes(32), f"/c/{n}", f"/s/{n}") for n in range(1, 31)]
    task = WindowPoSt(
        miner_id=1, proof_type="StackedDrgWindow2KiBV1_2", replicas=replicas, seed=bytes(32)
    )
    book = RequestBook()
    book.add_child("wd", "window_post")
    book.child_ready("wd", 0.0, protocol="dext", pid=7)
    _, [send] = book.submit(1, task, 1.0)
    assert isinstance(send, Send)
    faults = list(range(1, 26))
    out = book.answers(
        "wd", [(send.child_rid, WindowPoStOutput(proofs=[], faults=faults), None)], 2.0
    )
    [note] = [e for e in out if isinstance(e, Note)]
    assert f"25 faulty sectors, no proof: {sector_list(faults)}; the log lines of" in note.message
    assert note.message.count(",") >= SECTORS_NAMED - 1 and " and 5 more;" in note.message
