"""JSON-lines children written for damocles-manager, under our supervisor: what damocles-manager
takes from them, we take too.

damocles-manager decodes a processor's output with Go's encoding/json, which reads a JSON null as
an empty list; and a processor written in Go with damocles' own output type
(`stage.WindowPoStOutput{Proofs [][]byte; Faults []abi.SectorNumber}`, no omitempty) writes its
nil slices as null: `"faults": null` beside its proofs, `"proofs": null` beside its faults.
"""

from __future__ import annotations

import trio
from helpers.supervisor import jsonl_child, spec, window_task

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
