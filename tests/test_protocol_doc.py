"""docs/PROTOCOL.md cannot drift from the code: its hex dumps, tables and rules are checked here.

A prover written from the document alone must interoperate, so every worked example must decode
with our codec to the message the document shows, and encoding that message must give the very
bytes printed; the message and field tables must name the fields of our structs, in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from damocles_ext.protocol import control, dext
from damocles_ext.tasks import (
    OUTPUT_TYPES,
    TASK_TYPES,
    WINDOW_PROOF_TYPES,
    WINNING_PROOF_TYPES,
    PoStReplicaInfo,
)

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
DOC = DOC_PATH.read_text()

_EXAMPLE = re.compile(
    r"<!-- example: (?P<name>\S+) -->\n```json\n(?P<json>.*?)```\n```text\n(?P<dump>.*?)```",
    re.DOTALL,
)
EXAMPLES = {m["name"]: (m["json"], m["dump"]) for m in _EXAMPLE.finditer(DOC)}

#: The examples the document promises (a prover author needs each of them).
REQUIRED_EXAMPLES = {
    "hello",
    "request",
    "progress",
    "response",
    "error-response",
    "cancel",
    "shutdown",
    "control-status-request",
    "control-status-reply-error",
    "control-connection-error",
}


def _frame_of(dump: str) -> bytes:
    return b"".join(bytes.fromhex(line.split("#", 1)[0]) for line in dump.splitlines())


def _plain(value: Any) -> Any:
    """The document's JSON notation as msgpack data: {"$bin": hex} is a bin value."""
    if isinstance(value, dict):
        if value.keys() == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _section(title: str) -> str:
    return DOC.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def test_the_document_has_every_promised_example():
    assert EXAMPLES.keys() >= REQUIRED_EXAMPLES
    # An example block the pattern above misses would go unchecked.
    assert DOC.count("<!-- example:") == len(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_hex_dump_is_the_frame_of_the_message_shown(name):
    shown, dump = EXAMPLES[name]
    frame = _frame_of(dump)
    data = _plain(json.loads(shown))
    # The prefix counts the payload only, big-endian, and the dump's first line says so.
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    stated = re.match(r"[0-9a-f ]+# length prefix: (\d+) payload bytes follow", dump)
    assert stated is not None and int(stated[1]) == len(frame) - 4
    # The JSON shown is the payload's content, and alone fixes its bytes (key order included).
    assert msgspec.msgpack.decode(frame[4:]) == data
    assert msgspec.msgpack.encode(data) == frame[4:]
    decoder = control.frame_decoder() if name.startswith("control-") else dext.FrameDecoder()
    [message] = decoder.receive_data(frame)
    assert msgspec.to_builtins(message, builtin_types=(bytes,)) == data
    assert dext.encode(message) == frame


def test_a_control_only_example_is_not_a_child_message():
    frame = _frame_of(EXAMPLES["control-status-request"][1])
    with pytest.raises(dext.ProtocolError):
        dext.FrameDecoder().receive_data(frame)


def test_the_length_prefix_is_four_big_endian_bytes_counting_the_payload_only():
    # Long enough that the length needs two bytes, so byte order shows.
    message = dext.Response(id=7, error="x" * 300)
    frame = dext.encode(message)
    payload = frame[4:]
    assert len(payload) == 336  # 0x150: the map, its keys, and the 3-byte str 16 header
    assert frame[:4] == b"\x00\x00\x01\x50"
    assert dext.FrameDecoder().receive_data(frame) == [message]
    # A prefix that also counted itself would leave the decoder waiting for 4 more bytes.
    counting_itself = (len(payload) + 4).to_bytes(4, "big") + payload
    decoder = dext.FrameDecoder()
    assert decoder.receive_data(counting_itself) == []
    assert decoder.pending == len(counting_itself)


def test_the_documented_maximum_frame_size_is_the_codes_and_is_checked_from_the_prefix():
    assert "**maximum N is 67108864 (64 MiB)**" in DOC
    assert dext.DEFAULT_MAX_FRAME_SIZE == 67108864
    decoder = dext.FrameDecoder()
    assert decoder.receive_data((67108864).to_bytes(4, "big")) == []  # at the limit: wait for it
    with pytest.raises(dext.ProtocolError, match="exceeds the maximum"):
        dext.FrameDecoder().receive_data((67108864 + 1).to_bytes(4, "big"))


def test_a_legal_frame_never_starts_with_a_byte_that_auto_detection_takes_for_json_lines():
    from damocles_ext.protocol.jsonl import detect_protocol

    assert "starts with `00`..`04`" in DOC
    top = dext.DEFAULT_MAX_FRAME_SIZE.to_bytes(4, "big")[0]
    assert top == 0x04
    assert all(detect_protocol(b) == "dext" for b in range(top + 1))
    assert detect_protocol(ord("w")) == detect_protocol(0x21) == detect_protocol(0x7E) == "jsonl"


@pytest.mark.parametrize(
    ("payload", "accepted"),
    [
        # map keys in any order; unknown keys skipped at every level
        ({"id": 5, "type": "cancel"}, dext.Cancel(5)),
        ({"type": "cancel", "id": 5, "later": [1, 2]}, dext.Cancel(5)),
        ({"type": "progress", "id": 1, "phase": "x"}, dext.Progress(1, "x", 0, 0)),
        (
            {
                "type": "response",
                "id": 1,
                "output": {"stage": "winning_post", "proofs": [b"p"], "later": 1},
            },
            dext.Response(1, OUTPUT_TYPES["winning_post"]([b"p"])),
        ),
        # an integer where a float is expected; replica elements after the fourth ignored
        (
            {
                "type": "request",
                "id": 1,
                "deadline": 1767225600,
                "task": {
                    "stage": "winning_post",
                    "miner_id": 1,
                    "proof_type": "StackedDrgWinning2KiBV1",
                    "replicas": [[7, bytes(32), "/c", "/s", "x"]],
                    "seed": bytes(32),
                },
            },
            dext.Request(
                1,
                TASK_TYPES["winning_post"](
                    1,
                    "StackedDrgWinning2KiBV1",
                    [PoStReplicaInfo(7, bytes(32), "/c", "/s")],
                    bytes(32),
                ),
                1767225600.0,
            ),
        ),
    ],
)
def test_what_the_document_says_a_decoder_accepts(payload, accepted):
    assert dext.FrameDecoder().receive_data(_frame(msgspec.msgpack.encode(payload))) == [accepted]


_TASK = {
    "stage": "winning_post",
    "miner_id": 1,
    "proof_type": "StackedDrgWinning2KiBV1",
    "replicas": [[7, bytes(32), "/c", "/s"]],
    "seed": bytes(32),
}


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # N = 0
        msgspec.msgpack.encode({"type": "cancel", "id": 1}) + b"\x00",  # trailing bytes
        msgspec.msgpack.encode(["cancel", 1]),  # a message as an array
        msgspec.msgpack.encode({"type": "ping", "id": 1}),  # unknown message
        msgspec.msgpack.encode({"type": "cancel"}),  # required field missing
        msgspec.msgpack.encode({"type": "cancel", "id": 1.0}),  # float for an int
        msgspec.msgpack.encode({"type": "cancel", "id": True}),  # bool for an int
        msgspec.msgpack.encode({"type": "request", "id": 1, "task": {**_TASK, "stage": "pc2"}}),
        msgspec.msgpack.encode({"type": "request", "id": 1, "task": {**_TASK, "seed": "x" * 32}}),
        msgspec.msgpack.encode({"type": "request", "id": 1, "task": {**_TASK, "seed": bytes(31)}}),
        msgspec.msgpack.encode(
            {
                "type": "request",
                "id": 1,
                "task": {
                    **_TASK,
                    "replicas": [
                        {
                            "sector_id": 7,
                            "comm_r": bytes(32),
                            "cache_dir": "/c",
                            "sealed_file": "/s",
                        }
                    ],
                },
            }
        ),
        msgspec.msgpack.encode(
            {
                "type": "request",
                "id": 1,
                "task": {**_TASK, "proof_type": "StackedDrgWindow2KiBV1_2"},
            }
        ),  # a WindowPoSt type
        msgspec.msgpack.encode({"type": "response", "id": 1, "error": b"bytes"}),  # bin for str
        b"\x82\xa4type\xa6cancel\xa2id\x01\xc0",  # trailing nil after the map
    ],
)
def test_what_the_document_calls_undecodable_is(payload):
    with pytest.raises(dext.ProtocolError):
        dext.FrameDecoder().receive_data(_frame(payload))


def test_a_stream_ending_inside_a_frame_is_a_protocol_error():
    frame = dext.encode(dext.Cancel(1))
    decoder = dext.FrameDecoder()
    assert decoder.receive_data(frame[:-1]) == []
    with pytest.raises(dext.ProtocolError):
        decoder.receive_data(b"")


def _table_rows(section: str, first_cell: str) -> dict[str, str]:
    """`| "tag" | ... | fields |` rows: the tag (without quotes) -> the last cell."""
    rows = {}
    for line in _section(section).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(first_cell, cells[0]):
            rows[cells[0].split('"')[1]] = cells[-1]
    return rows


def _fields(cell: str) -> list[tuple[str, str | None]]:
    """`name: type = default` items of a table cell -> [(name, default or None)]."""
    out = []
    for item in re.findall(r"`([a-z_]+): [^`=]+?(?: = ([^`]+))?`", cell):
        out.append((item[0], item[1] or None))
    return out


def _struct_fields(cls: type) -> list[tuple[str, str | None]]:
    fields = cls.__struct_fields__  # type: ignore[attr-defined]
    defaults = cls.__struct_defaults__  # type: ignore[attr-defined]
    shown = [None] * (len(fields) - len(defaults)) + [
        "nil" if d is None else "absent" if d is msgspec.UNSET else json.dumps(d) for d in defaults
    ]
    return list(zip(fields, shown, strict=True))


def test_the_message_tables_name_every_field_in_order_with_its_default():
    rows = _table_rows("4. Messages", r'`"[a-z_]+"`')
    classes = {c.__struct_config__.tag: c for c in dext.Message.__args__}  # type: ignore[attr-defined]
    assert rows.keys() == classes.keys()
    for tag, cls in classes.items():
        assert cls.__struct_config__.tag_field == "type"
        assert _fields(rows[tag]) == _struct_fields(cls), tag
    control_rows = _table_rows("9. The control socket", r'`"[a-z_]+"` \(\w+\)')
    own = [c for c in control.ControlMessage.__args__ if c not in dext.Message.__args__]  # type: ignore[attr-defined]
    control_classes = {c.__struct_config__.tag: c for c in own}
    assert control_rows.keys() == control_classes.keys()
    for tag, cls in control_classes.items():
        assert _fields(control_rows[tag]) == _struct_fields(cls), tag


def test_the_task_and_output_tables_name_every_field_in_order():
    section = "5. Tasks and outputs"
    tasks, outputs = (
        {
            m["tag"]: m["cells"]
            for m in re.finditer(
                r'^\| `"(?P<tag>[a-z_]+)"` \| (?P<cells>.*) \|$', part, re.MULTILINE
            )
        }
        for part in _section(section).split("An Output is", 1)
    )
    window_fields = [f for f, _ in _fields(tasks["window_post"])]
    for table, types in ((tasks, TASK_TYPES), (outputs, OUTPUT_TYPES)):
        assert table.keys() == types.keys()
        for stage, cls in types.items():
            assert cls.__struct_config__.tag_field == "stage"
            named = [f for f, _ in _fields(table[stage])]
            if table[stage].startswith("the same fields as"):
                named = window_fields + named
            assert named == list(cls.__struct_fields__), stage
    replica_rows = re.findall(r"^\| (\d) \| `([a-z_]+)` \|", _section(section), re.MULTILINE)
    assert [(int(i), f) for i, f in replica_rows] == list(
        enumerate(PoStReplicaInfo.__struct_fields__)
    )
    assert PoStReplicaInfo.__struct_config__.array_like


def test_the_proof_type_lists_are_the_codes():
    text = _section("5. Tasks and outputs")

    def expand(pattern: str) -> set[str]:
        head, sizes, tail = re.fullmatch(r"(\w+)\{([^}]+)\}(\w+)", pattern).groups()
        if sizes == "...":
            sizes = "2KiB,8MiB,512MiB,32GiB,64GiB"
        return {head + size + tail for size in sizes.split(",")}

    window = set().union(*(expand(p) for p in re.findall(r"`(StackedDrgWindow[^`]+)`", text)))
    winning = set().union(*(expand(p) for p in re.findall(r"`(StackedDrgWinning[^`]+)`", text)))
    assert window == set(WINDOW_PROOF_TYPES)
    assert winning == set(WINNING_PROOF_TYPES)
    assert "(ten values)" in text and len(WINDOW_PROOF_TYPES) == 10


def test_the_documented_version_string_is_the_codes():
    assert dext.PROTOCOL_VERSION == "dext/1"
    assert 'exactly `"dext/1"`' in DOC
