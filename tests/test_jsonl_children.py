"""JSON-lines children written for damocles-manager, under our supervisor: what damocles-manager
takes from them, we take too.

damocles-manager decodes a processor's output with Go's encoding/json, which reads a JSON null as
an empty list; and a processor written in Go with damocles' own output type
(`stage.WindowPoStOutput{Proofs [][]byte; Faults []abi.SectorNumber}`, no omitempty) writes its
nil slices as null: `"faults": null` beside its proofs, `"proofs": null` beside its faults.
"""

from __future__ import annotations

import pytest
import trio
from helpers.supervisor import jsonl_child, spec, who, window_task

from damocles_ext.errors import ProverError
from damocles_ext.supervisor import Supervisor
from damocles_ext.tasks import WindowPoStOutput

# What a Go processor built on damocles' types writes: a nil slice is null.
GO_LIKE = """
if req["task"]["miner_id"] == 1:
    out = {"proofs": ["AAEC"], "faults": None}
else:
    out = {"proofs": None, "faults": [r["sector_id"] for r in req["task"]["replicas"]]}
sys.stdout.write(json.dumps({"id": req["id"], "err_msg": None, "output": out}) + "\\n")
sys.stdout.flush()
"""


async def test_null_lists_in_a_json_lines_childs_output_read_as_empty_as_damocles_does():
    sup = Supervisor([spec(jsonl_child(GO_LIKE), max_attempts=1)])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            proved = await sup.submit(window_task(miner=1))
            faulty = await sup.submit(window_task(miner=2, sector=7))
            sup.request_shutdown()
    assert proved == WindowPoStOutput(proofs=[b"\x00\x01\x02"], faults=[])
    assert faulty == WindowPoStOutput(proofs=[], faults=[7])


# An answer whose id is mangled (a string, as a processor that keeps ids as text writes it),
# after a stray JSON log line on stdout (a JSON logger writing there), for miner 1; the others
# are answered as they should be.
MANGLED_ID = """
sys.stdout.write(json.dumps({"level": "info", "msg": "proving", "id": "x"}) + "\\n")
if req["task"]["miner_id"] == 1:
    out = {"proofs": ["AAEC"], "faults": []}
    sys.stdout.write(json.dumps({"id": str(req["id"]), "err_msg": None, "output": out}) + "\\n")
    sys.stdout.flush()
else:
    answer(req)
"""


async def test_an_answer_whose_id_is_unreadable_answers_the_one_request_its_child_had():
    # damocles reads such a line, logs it and waits on: the request (and the child's only
    # slot) would wait for its deadline. The child had one request: the line is its answer.
    # The stray log line before it, not a response, changes nothing.
    sup = Supervisor([spec(jsonl_child(MANGLED_ID), max_attempts=1)])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            with pytest.raises(ProverError) as caught:
                await sup.submit(window_task(miner=1))
            after = await sup.submit(window_task(miner=2))
            sup.request_shutdown()
    assert "invalid response: skipped a bad stdout line: not a response line" in str(caught.value)
    assert who(after)[0] == 2


# Miner 1's answer, then a second one with its id mangled, in one write: read together, before
# the child was sent anything more.
ANSWER_THEN_MANGLED = """
if req["task"]["miner_id"] == 1:
    time.sleep(0.5)  # the other request waits in the queue meanwhile
    out = {"proofs": [base64.b64encode(b"1 %d" % os.getpid()).decode()], "faults": []}
    good = {"id": req["id"], "err_msg": None, "output": out}
    again = {"id": str(req["id"]), "err_msg": "again", "output": None}
    sys.stdout.write(json.dumps(good) + "\\n" + json.dumps(again) + "\\n")
    sys.stdout.flush()
else:
    answer(req)
"""


async def test_an_unreadable_answer_read_with_an_answer_is_not_the_next_requests():
    # The request the answer freed the slot for is sent after the line was read: the line
    # cannot be its answer, and it is still proved.
    sup = Supervisor([spec(jsonl_child(ANSWER_THEN_MANGLED), max_attempts=1)])
    results: dict[int, object] = {}

    async def prove(miner: int) -> None:
        try:
            results[miner] = await sup.submit(window_task(miner=miner))
        except ProverError as exc:
            results[miner] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await sup.wait_ready()
            async with trio.open_nursery() as both:
                both.start_soon(prove, 1)
                await trio.sleep(0.1)
                both.start_soon(prove, 2)
            sup.request_shutdown()
    assert who(results[1])[0] == 1, results[1]
    assert who(results[2])[0] == 2, results[2]
