"""Fuzzing the coordinator's request decoder (jobs/rpc.py), sans-IO, with hypothesis.

A POST body goes through `rpc.parse_request` and comes out a `Call` or an `RpcError`, and the
answer is written by `encode_result` or `encode_error`: nothing else may come out for any body
a client sends. The bodies are written by hand (not by a JSON encoder), so that they carry what
an encoder never writes: keys given twice in any case (and in Go's folds), NaN and Infinity,
numbers past a uint64 or a float64, lone surrogates, NUL, bytes that are not UTF-8, a BOM,
nesting bombs, batches, nothing at all. Around the envelope, each method's params are near
what it takes (its fields, in any case) with wrong types, nulls and edge values mixed in.

Each example asserts: a call has a known method, exactly its params, each of the type and
within the bounds the store relies on, an id that an answer can carry back; an error has one
of go-jsonrpc's codes, its HTTP status, and a message that says what is wrong and where (the
param, the field) or what to send, never a bare msgspec path (`$[...]`) that names no place.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from damocles_ext.jobs import rpc

# Cheap examples (100 bodies, 50 per method: the file costs ~3 s of the suite); the deadline
# catches super-linear work. Each strategy is made once (module constants, `cased` and
# `params_of` cached): one made at each draw was validated again at each, through `anything`,
# which was most of the file's time.
FUZZ = settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


# -- JSON text written by hand ----------------------------------------------------------------


class Obj(list):
    """A JSON object as (key, value) pairs, in order: a key may come twice."""


class Token(bytes):
    """Bytes put into the body as they are (a number no encoder writes, a bad escape)."""


NUMBERS = [
    0, -1, 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1,
    2**64 - 1, 2**64, -(2**64), 10**30, -(10**30),
]  # fmt: skip
TOKENS = [
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0", b"-0.0",
    b"1.0", b"1E2", b"0.5", b"1" + b"0" * 400 + b".5", b"9" * 5000, b"-" + b"9" * 5000, b"01",
    b'"\\ud800"', b'"\\udc00x"', b'"\\u0000"', b'"\\x"', b'"\xff\xfe"', b'"\xed\xa0\x80"',
    b'"\xc0\x80"', b"true", b"nul", b"[", b"}", b"",
]  # fmt: skip


def write(value: Any) -> bytes:
    """`value` as JSON text; `Obj` pairs and `Token`s as they are."""
    if isinstance(value, Token):
        return bytes(value)
    if isinstance(value, Obj):
        return b"{" + b",".join(write(k) + b":" + write(v) for k, v in value) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(write(v) for v in value) + b"]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=bool(len(value) % 2)).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


@functools.cache
def cased(name: str) -> st.SearchStrategy[str]:
    """`name` in any case, sometimes with Go's folds (the long s, the Kelvin sign), sometimes
    another key."""
    folds = {"s": "\u017f", "S": "\u017f", "k": "\u212a", "K": "\u212a"}

    @st.composite
    def one(draw: st.DrawFn) -> str:
        chars = [draw(st.sampled_from([c.lower(), c.upper(), folds.get(c, c)])) for c in name]
        return "".join(chars)

    return st.one_of(st.just(name), one(), st.text(max_size=8))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(NUMBERS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(TOKENS).map(Token),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(st.text(max_size=6), inner), max_size=4).map(Obj),
    ),
    max_leaves=12,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four, else anything: a call must be near right to reach the checks
    of its later params."""
    return st.integers(0, 3).flatmap(lambda n: good if n else anything)


def struct(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """An object of these fields (keys in any case, some twice, some missing), or anything."""
    pairs = {f: st.tuples(cased(f), mostly(kind)) for f, kind in fields.items()}
    pair = st.sampled_from(sorted(fields)).flatmap(pairs.__getitem__)
    return mostly(st.one_of(st.just(Obj()), st.lists(pair, max_size=5).map(Obj)))


def list_of(item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return mostly(st.lists(mostly(item), max_size=5))


# Worker names over the limit (in bytes, not characters: 501 é are 1002 bytes), and at it.
names = st.sampled_from(
    ["w" * (rpc.MAX_WORKER_NAME + 1), "\u00e9" * 501, "w" * rpc.MAX_WORKER_NAME]
)
texts = mostly(st.one_of(st.text(max_size=20), names))
ints = mostly(st.one_of(st.integers(0, 9), st.sampled_from(NUMBERS), st.integers()))
spec = struct({"AllowedMiners": list_of(ints), "AllowedProofTypes": list_of(texts)})
output = struct({"proofs": list_of(st.sampled_from(["AAEC", "", "!!", "AA=="])), "faults": list_of(ints)})  # fmt: skip
lease = struct({"Id": texts, "Lease": texts})
sector = struct({"Miner": ints, "Number": ints})
PARAMS: dict[str, list[st.SearchStrategy[Any]]] = {
    "Venus.WdPoStAllocateJobs": [spec, ints, texts],
    "Venus.WdPoStHeartbeatJobs": [list_of(texts), texts],
    "Venus.WdPoStFinishJob": [texts, output, texts],
    "Venus.WdPoStResetJob": [texts],
    "Venus.WdPoStRemoveJob": [texts],
    "Venus.WdPoStAllJobs": [],
    "Venus.StoreBasicInfo": [texts],
    "Venus.WorkerPing": [struct({"Name": texts})],
    "Venus.SectorIndexerFind": [st.sampled_from(["normal", "upgrade", "x"]), sector],
    "Dext.AllocateJobs": [spec, ints, texts],
    "Dext.HeartbeatJobs": [list_of(lease), texts],
    "Dext.FinishJob": [texts, texts, output, texts],
}
assert set(PARAMS) == set(rpc.METHODS)


SHAPES = st.sampled_from(["as is"] * 7 + ["one more", "one less", "other"])


@st.composite
def _params_of(draw: st.DrawFn, method: str) -> Any:
    values = [draw(kind) for kind in PARAMS.get(method, [])]
    shape = draw(SHAPES)
    if shape == "one more":
        values.append(draw(anything))
    elif shape == "one less" and values:
        values.pop()
    elif shape == "other":
        return draw(anything)
    return values


_PARAMS_OF = {method: _params_of(method) for method in [*PARAMS, ""]}


def params_of(method: str) -> st.SearchStrategy[Any]:
    """The method's params, near what it takes: each of its own kind or anything, one too
    many or too few now and then, or not a list at all (of a method not served: none)."""
    return _PARAMS_OF.get(method, _PARAMS_OF[""])


methods = st.one_of(st.sampled_from(sorted(rpc.METHODS)), st.text(max_size=20), anything)
ENVELOPE_KEYS = st.lists(st.sampled_from(["id", "jsonrpc", "method", "params"]), max_size=6)
JSONRPC = st.one_of(st.just("2.0"), anything)
IDS = st.one_of(st.sampled_from(NUMBERS), st.integers(), st.text(max_size=8), anything)


@st.composite
def envelopes(draw: st.DrawFn) -> Obj:
    method = draw(methods)
    fields = {
        "jsonrpc": JSONRPC,
        "params": params_of(method if isinstance(method, str) else ""),
        "id": IDS,
    }
    keys = draw(ENVELOPE_KEYS)
    if draw(st.booleans()):
        keys = ["jsonrpc", "method", "params", "id", *keys]  # mostly a whole request
    return Obj((draw(cased(key)), method if key == "method" else draw(fields[key])) for key in keys)


ENVELOPES = envelopes()
BATCHES = st.lists(ENVELOPES, max_size=3)
KINDS = st.sampled_from(["envelope"] * 5 + ["batch", "anything", "empty", "bomb", "bomb"])
EMPTY = st.sampled_from([b"", b" ", b"\n", b"\xef\xbb\xbf", b"null"])
DEPTHS = st.sampled_from([100, 900, 990, 1000, 5000])
NESTINGS = st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])
BOMB_KEYS = st.sampled_from(["params", "id", "x"]).flatmap(cased)
EDITS = st.sampled_from(["none"] * 6 + ["cut", "splice", "bom"])
SPLICED = st.one_of(st.binary(max_size=4), st.sampled_from(TOKENS))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body: an envelope, or a batch of them, or anything; then cut, bombed or
    spliced with bytes now and then."""
    kind = draw(KINDS)
    if kind == "envelope":
        body = write(draw(ENVELOPES))
    elif kind == "batch":
        body = write(draw(BATCHES))
    elif kind == "anything":
        body = write(draw(anything))
    elif kind == "empty":
        body = draw(EMPTY)
    else:
        depth = draw(DEPTHS)
        opening, closing = draw(NESTINGS)
        bomb = opening * depth + b"1" + closing * depth
        envelope = draw(ENVELOPES)  # the bomb first: read before any junk after it
        key = draw(BOMB_KEYS)
        envelope.insert(0, (key, Token(bomb)))
        body = write(envelope)
    edit = draw(EDITS)
    if edit == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif edit == "splice":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(SPLICED) + body[at:]
    elif edit == "bom":
        body = b"\xef\xbb\xbf" + body
    return body


# -- what may come out ------------------------------------------------------------------------

CODES = {rpc.PARSE_ERROR, rpc.METHOD_NOT_FOUND, rpc.INVALID_PARAMS}


# The params that reach the store as text (PostgreSQL's takes no NUL), by place: said here
# again, not read from rpc.METHODS, so that a type loosened there is caught.
STORED = {
    "Venus.WdPoStAllocateJobs": (0, 2), "Venus.WdPoStHeartbeatJobs": (0, 1),
    "Venus.WdPoStFinishJob": (0,), "Venus.WdPoStResetJob": (0,), "Venus.WdPoStRemoveJob": (0,),
    "Dext.AllocateJobs": (0, 2), "Dext.HeartbeatJobs": (0, 1), "Dext.FinishJob": (0, 1),
}  # fmt: skip


def check_call(call: rpc.Call) -> None:
    kinds = rpc.METHODS[call.method]
    assert len(call.params) == len(kinds)
    for place in STORED.get(call.method, ()):
        assert "\\u0000" not in msgspec.json.encode(call.params[place]).decode(), call
    for value, kind in zip(call.params, kinds, strict=True):
        # Of its type and within its bounds: read back from its plain form, it is the same.
        assert msgspec.convert(msgspec.to_builtins(value), kind) == value
        # No number a Go integer cannot hold (of WorkerPing's info, only the Name is read).
        read = rpc.worker_name_of(value) if kind is Any else value
        rpc._go_ints(msgspec.to_builtins(read), "$")
    if call.method in ("Venus.WdPoStAllocateJobs", "Dext.AllocateJobs"):
        assert rpc.worker_name_problem(call.params[2]) is None
    assert call.request_id is None or isinstance(call.request_id, int | str)
    answer = msgspec.json.decode(rpc.encode_result(call.request_id, None))
    assert answer == {"jsonrpc": "2.0", "result": None, "id": call.request_id}


def check_error(error: rpc.RpcError) -> None:
    assert error.code in CODES, error.code
    assert error.http_status == 500  # go-jsonrpc's status for these codes (docs/JOBS.md)
    message = error.message
    assert message.startswith(f"(error code {error.code}) ")
    assert "Traceback" not in message
    # A place a reader can find: msgspec's `$[...]` (a value inside an untyped one) names none.
    assert "`$[...]" not in message, message
    if error.code == rpc.PARSE_ERROR and "unmarshaling params for" in message:
        assert "(param: " in message and "; send " in message, message
    if error.code == rpc.INVALID_PARAMS:
        assert "; send the params of" in message or "; use a shorter name" in message, message
    if message.startswith("(error code -32700) unmarshaling request: "):
        said = message.removeprefix("(error code -32700) unmarshaling request: ")
        # Not JSON, nested too deeply, or a value of the envelope named by its place; else
        # what a request is.
        assert (
            said.startswith("the body is not JSON")
            or "nested too deeply" in said
            or " - at `$." in said
            or "send one request object {" in said
            or "send numbers within a uint64" in said
        ), said
    answer = msgspec.json.decode(rpc.encode_error(error))
    assert answer["error"] == {"code": error.code, "message": message}
    assert answer["id"] == error.request_id


def check(body: bytes) -> rpc.Call | None:
    """The call in `body`, checked, or None for an error, checked."""
    try:
        call = rpc.parse_request(body)
    except rpc.RpcError as error:
        check_error(error)
        return None
    check_call(call)
    return call


def request(method: str, params: str) -> bytes:
    return f'{{"jsonrpc":"2.0","method":"{method}","params":{params},"id":1}}'.encode()


@FUZZ
@given(bodies())
# The edges each check is for, tried at every run (the fuzz finds them only now and then).
@example(request("Venus.WdPoStAllocateJobs", f'[{{}},1,"{"w" * (rpc.MAX_WORKER_NAME + 1)}"]'))
@example(request("Venus.WdPoStFinishJob", f'["j",{{"faults":[{2**64}]}},""]'))
@example(request("Venus.SectorIndexerFind", f'["normal",{{"number":{2**64}}}]'))
@example(request("Venus.WorkerPing", "[" + "[" * 5000 + "]" * 5000 + "]"))
@example(request("Venus.WdPoStAllJobs", "[]").replace(b'"id":1', b'"id":1e400'))
@example(b"[" + request("Venus.WdPoStAllJobs", "[]") + b"]")
def test_any_body_is_a_valid_call_or_a_json_rpc_error_saying_what_is_wrong(body):
    check(body)


@FUZZ
@given(st.binary(max_size=256))
def test_any_bytes_are_a_call_or_a_json_rpc_error_never_an_exception(body):
    check(body)


@pytest.mark.parametrize("method", sorted(rpc.METHODS))
@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_each_methods_params_are_typed_or_refused_naming_the_param(method, data):
    params = data.draw(params_of(method))
    body = write(Obj([("jsonrpc", "2.0"), ("method", method), ("params", params), ("id", 7)]))
    if (call := check(body)) is not None:
        assert (call.method, call.request_id) == (method, 7)
