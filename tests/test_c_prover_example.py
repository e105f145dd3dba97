"""examples/c-dext-prover: a dext/1 child in C, written from docs/PROTOCOL.md, works for real.

It is compiled here with the reference prover's sources and run as a `Bin` child of a real
supervisor, so a wrong byte in the document (or in the example) shows up as a failed proof.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest
from helpers.post import sectors, sectors_with_a_short_one

from damocles_ext.api import open_supervisor
from damocles_ext.config.spec import default_heartbeat_timeout
from damocles_ext.post.fixtures import window_task, winning_task
from damocles_ext.post.verify import verify
from damocles_ext.protocol import dext

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "c-dext-prover" / "dext_child.c"
SEED = bytes(range(32))
TIMEOUT = 60  # seconds; only reached when something is broken


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c-prover") / "dext-child"
    # The build command of the example's opening comment (a shell expands its braces).
    subprocess.run(
        [
            "cc",
            "-O2",
            "-pthread",
            f"-I{ROOT / 'native' / 'include'}",
            str(SOURCE),
            *sorted(str(p) for p in (ROOT / "native" / "src").glob("*.c")),
            "-lcrypto",
            "-o",
            str(out),
        ],
        check=True,
        timeout=TIMEOUT,
    )
    return out


def _config(tmp_path: Path, binary: Path) -> Path:
    path = tmp_path / "ext-prover.cfg"
    path.write_text(
        f'[[WdPost]]\nBin = "{binary}"\nArgs = ["window_post"]\n'
        f'[[WinPost]]\nBin = "{binary}"\nArgs = ["winning_post"]\n'
    )
    return path


async def test_the_c_example_proves_both_stages_under_the_supervisor(binary, tmp_path):
    manifest = sectors(tmp_path / "s", "StackedDrgWindow2KiBV1_2", 2, random_seed=4)
    faulty = sectors_with_a_short_one(tmp_path / "f")
    progress: list[dext.Progress] = []
    async with open_supervisor(_config(tmp_path, binary)) as sup:
        await sup.wait_ready(count=2)
        assert {c.protocol for c in sup.statistics().children} == {"dext"}  # detected
        for task in (winning_task(manifest, SEED), window_task(manifest, SEED)):
            output = await sup.submit(task, on_progress=progress.append)
            verify(task, output)
        faults = await sup.submit(window_task(faulty, SEED))
    assert faults.proofs == [] and faults.faults == [2]
    # The reference prover reports its phases; the C child's Progress frames carried them.
    assert {p.phase for p in progress} >= {"winning_post", "window_post"}


def _frame(data: dict) -> bytes:
    payload = msgspec.msgpack.encode(data)
    return len(payload).to_bytes(4, "big") + payload


def _frames(data: bytes) -> list[dext.Message]:
    decoder = dext.FrameDecoder()
    messages = decoder.receive_data(data)
    decoder.receive_data(b"")  # no partial frame left
    return messages


def test_the_c_example_answers_by_the_document_and_exits_on_shutdown(binary):
    wrong_stage = _frame(
        {
            "type": "request",
            "id": 1,
            "later": {"a": [1.5, None, True]},  # unknown key: skipped
            "task": {
                "stage": "window_post",
                "miner_id": 1000,
                "proof_type": "StackedDrgWindow2KiBV1_2",
                "replicas": [],
                "seed": bytes(32),
            },
        }
    )
    stdin = wrong_stage + dext.encode(dext.Cancel(9)) + dext.encode(dext.Shutdown())
    done = subprocess.run(
        [binary, "winning_post"], input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    hello, answer = _frames(done.stdout)
    assert hello == dext.Hello("dext/1", "winning_post", hello.pid, "c-dext-prover", "1", 1)
    assert answer == dext.Response(1, None, "this child serves winning_post, not window_post")


@pytest.mark.parametrize(
    "stdin",
    [
        b"\x04\x00\x00\x01",  # over 64 MiB
        b"\x00\x00\x00\x00",  # N = 0
        b"\x00\x00\x00\x0b\x81\xa4type\xa4ping",  # unknown message
        b"\x00\x00\x00\x11\x82\xa4type\xa6cancel\xa2id",  # ends inside the frame
    ],
)
def test_the_c_example_exits_1_on_a_protocol_error(binary, stdin):
    done = subprocess.run(
        [binary, "winning_post"], input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 1
    assert b"protocol error" in done.stderr
    [hello] = _frames(done.stdout)
    assert isinstance(hello, dext.Hello)


def test_the_readme_says_the_heartbeat_check_is_on_by_default_and_for_how_long():
    # The child sends no heartbeat of its own: a README that let an operator think the check is
    # off unless set would get a vendor's prover behind this loop killed mid-proof.
    readme = " ".join((SOURCE.parent / "README.md").read_text().split())
    assert "heartbeat check is on by default" in readme
    for stage, table in (("window_post", "[[WdPost]]"), ("winning_post", "[[WinPost]]")):
        assert f"{default_heartbeat_timeout(stage):g} s in `{table}`" in readme, stage
