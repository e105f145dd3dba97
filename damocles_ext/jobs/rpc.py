"""damocles' worker-prover RPC as JSON-RPC 2.0 bodies, the way go-jsonrpc reads and writes them.

A request is one POST body `{"jsonrpc":"2.0","method":"Venus.X","params":[...],"id":N}` with
positional params; the answer carries `result` (`null` for a method that returns nothing) or
`error: {code, message}`. go-jsonrpc (v0.1.9, the fork damocles uses) answers a body or a param
it cannot read with HTTP 500 and code -32700, an unknown method with -32601, a wrong number of
params with -32602, each message led by `(error code N) `; an error a method returns with HTTP
200, code 1 and the method's own text. damocles-worker reads the JSON body of a 500, so the
status and the body must both be right. It does not check "jsonrpc"; neither do we. The
request and its params are read as Go's encoding/json reads them (gojson.py). Beside it:
where go-jsonrpc answers a request without an id (a notification) with an empty body, we answer
with `"id":null`, and a body it cannot read with our reason.

Sans-IO: bytes in, a `Call` or an `RpcError` out, bytes back; the coordinator does the calls.
"""

from __future__ import annotations

import hmac
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from ..protocol.dext import NESTED_TOO_DEEPLY
from .gojson import go_shaped
from .model import I64, U64, JobOutput, JobRecord, Text

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: go-jsonrpc's code for an error returned by the method itself.
METHOD_ERROR: Final = 1
#: Ours (JSON-RPC's range for server errors), sent with HTTP 401: no token, or a wrong one.
UNAUTHORIZED: Final = -32001
#: Ours, for the Dext.* methods (HTTP 200): the job is no longer the caller's (its lease is not
#: the current one, it finished, was removed, its deadline passed). Repeating the call cannot
#: help, unlike code 1 (the store failed for a while).
REFUSED: Final = 2
#: damocles' APIErrCodeSectorStateNotFound (damocles-manager core/api_error_codes.go), the one
#: code damocles-worker's `call_rpc!` (src/sealing/sealing_thread/util.rs) turns into an abort of
#: the task at once instead of a temporary error retried `max_retries` times, `recover_interval`
#: apart. Sent (HTTP 200) for a `Venus.WdPoStFinishJob` the fencing refuses.
ABORT: Final = 11001

U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]  # the number of jobs to allocate

#: The most job ids one heartbeat names, and the most entries of an allocation filter. A worker
#: heartbeats the few jobs it runs and filters by its miners and proof types: a call over these
#: is refused (invalid params) rather than holding the store's write lock while it is worked
#: through id by id (or, for a filter, failing as a store error with too many SQL variables).
MAX_IDS_PER_CALL: Final = 1000
MAX_FILTER: Final = 1000
#: An allocating worker's name is part of the key of its rows among the workers seen (with its
#: filter's digest), and PostgreSQL's index takes a key of 2,704 bytes at most: a longer name is
#: refused, not failed in the database. (A worker's name is its address, or a host name.)
MAX_WORKER_NAME: Final = 1000
_ALLOCATIONS: Final = ("Venus.WdPoStAllocateJobs", "Dext.AllocateJobs")


class AllocateSpec(msgspec.Struct, frozen=True):
    """damocles' AllocateWdPoStJobSpec; Go's nil slices arrive as `null` and mean "any"."""

    AllowedMiners: Annotated[list[I64], msgspec.Meta(max_length=MAX_FILTER)] | None = None
    AllowedProofTypes: Annotated[list[Text], msgspec.Meta(max_length=MAX_FILTER)] | None = None


class JobLease(msgspec.Struct, frozen=True):
    """A job a worker holds, and the lease its allocation gave it (Dext.HeartbeatJobs)."""

    Id: Text
    Lease: Text


# The positional params of each method, by Go type; each is read as Go's json.Unmarshal reads
# it (gojson.py: keys in any case, `null` as Go takes it). WorkerPing's workerInfo is taken as
# any value: we keep only its name (`worker_name_of`) and whether it says it is paused (its
# Summary, read leniently: jobs/pings.py), and a newer worker adding a field must not be refused.
class SectorId(msgspec.Struct, frozen=True):
    """damocles' abi.SectorID as Go decodes it: a missing field is 0, unknown fields ignored."""

    Miner: U64 = 0
    Number: U64 = 0


METHODS: Final[dict[str, tuple[Any, ...]]] = {
    "Venus.WdPoStAllocateJobs": (AllocateSpec, U32, Text),
    "Venus.WdPoStHeartbeatJobs": (
        Annotated[list[Text], msgspec.Meta(max_length=MAX_IDS_PER_CALL)] | None,
        Text,
    ),
    "Venus.WdPoStFinishJob": (Text, JobOutput | None, str),
    "Venus.WdPoStResetJob": (Text,),
    "Venus.WdPoStRemoveJob": (Text,),
    "Venus.WdPoStAllJobs": (),
    "Venus.StoreBasicInfo": (str,),
    "Venus.WorkerPing": (Any,),
    # damocles' sector index, read-only (a proxy node's question; frontends/sector_index.py).
    "Venus.SectorIndexerFind": (str, SectorId),
    # Ours (docs/JOBS.md): allocation by free slots with a lease, heartbeats that answer which
    # jobs to stop, a finish fenced by the lease.
    "Dext.AllocateJobs": (AllocateSpec, U32, Text),
    "Dext.HeartbeatJobs": (
        Annotated[list[JobLease], msgspec.Meta(max_length=MAX_IDS_PER_CALL)],
        Text,
    ),
    "Dext.FinishJob": (Text, Text, JobOutput | None, str),
}

#: Each method's params as a client sends them, for the errors about them (what to send).
_SPEC = '{"AllowedMiners":[miner ids],"AllowedProofTypes":[proof names]}'
PARAM_FORMS: Final[dict[str, str]] = {
    "Venus.WdPoStAllocateJobs": f"[{_SPEC}, number of jobs, worker name]",
    "Venus.WdPoStHeartbeatJobs": "[[job ids], worker name]",
    "Venus.WdPoStFinishJob": '[job id, {"proofs":[base64],"faults":[sector numbers]} or null,'
    ' error reason or ""]',
    "Venus.WdPoStResetJob": "[job id]",
    "Venus.WdPoStRemoveJob": "[job id]",
    "Venus.WdPoStAllJobs": "[]",
    "Venus.StoreBasicInfo": "[store name]",
    "Venus.WorkerPing": '[{"Name":worker name,...}]',
    "Venus.SectorIndexerFind": '["normal" or "upgrade", {"Miner":miner id,"Number":sector number}]',
    "Dext.AllocateJobs": f"[{_SPEC}, free slots, worker name]",
    "Dext.HeartbeatJobs": '[[{"Id":job id,"Lease":lease}], worker name]',
    "Dext.FinishJob": '[job id, lease, {"proofs":[base64],"faults":[sector numbers]} or null,'
    ' error reason or ""]',
}


def _send(method: str) -> str:
    return f"; send the params of '{method}' as {PARAM_FORMS[method]}"


_HTTP_STATUS = {METHOD_ERROR: 200, REFUSED: 200, ABORT: 200, UNAUTHORIZED: 401}


class RpcError(Exception):
    """An answer that is an error; `request_id` is the request's id when it could be read."""

    def __init__(self, code: int, message: str, request_id: Any = None) -> None:
        if code not in _HTTP_STATUS:  # go-jsonrpc's own errors: fmt.Errorf("(%w) ...", code)
            message = f"(error code {code}) {message}"
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def http_status(self) -> int:
        """go-jsonrpc's: 200 for a method's own error, 500 for the protocol's; 401 for ours
        about the token."""
        return _HTTP_STATUS.get(self.code, 500)


@dataclass(frozen=True, slots=True)
class Call:
    """One validated request: the method, its params converted to their types, the id."""

    method: str
    params: tuple[Any, ...]
    request_id: Any


class _Envelope(msgspec.Struct):
    jsonrpc: str = "2.0"
    method: str | None = None
    params: list[Any] | None = None
    id: int | str | None = None


# Go reads `null` as an empty request, and the envelope's keys in any case (`"Method"`), as
# go-jsonrpc decodes it with encoding/json: read as any JSON, then shaped as Go reads it.
_Request = _Envelope | None
_decoder = msgspec.json.Decoder()
# A body with a float literal past a float64 (msgspec: "Number out of range" at an unnamed
# `$[...]`) is read again with each float read by Python's float(): one past a float64 is
# infinite, so the param or field it is in refuses it where it stands (every number a param
# takes is an integer), and a key no field has drops it. Go refuses it where it reads a value
# (encoding/json's UnmarshalTypeError, into an interface as into a number field) and skips it
# under a key no field has: the same calls are refused. Only such a body: float() is slower
# than msgspec's own reading (a body of floats took 4 times as long).
_wide_decoder = msgspec.json.Decoder(float_hook=float)
_encoder = msgspec.json.Encoder()


def parse_request(body: bytes) -> Call:
    """The call in a POST body; raises RpcError saying what is wrong (never anything else)."""
    try:
        decoded = _decode(body)
        if not isinstance(decoded, dict | None):
            raise RpcError(PARSE_ERROR, f"unmarshaling request: {_not_a_request(decoded)}")
        envelope = msgspec.convert(go_shaped(decoded, _Request), _Request)
    except msgspec.ValidationError as exc:
        raise RpcError(PARSE_ERROR, f"unmarshaling request: {_unreadable(exc)}") from None
    except msgspec.DecodeError as exc:
        raise RpcError(PARSE_ERROR, f"unmarshaling request: the body is not JSON: {exc}") from None
    except RecursionError:  # msgspec's nesting limit is Python's recursion limit
        raise RpcError(PARSE_ERROR, f"unmarshaling request: {NESTED_TOO_DEEPLY}") from None
    if envelope is None:
        envelope = _Envelope()
    rid = envelope.id
    method = envelope.method or ""
    types = METHODS.get(method)
    if types is None:
        raise RpcError(METHOD_NOT_FOUND, f"method '{method}' not found", rid)
    params = envelope.params or []
    if len(params) != len(types):
        raise RpcError(
            INVALID_PARAMS,
            f"wrong param count (method '{method}'): {len(params)} != {len(types)}" + _send(method),
            rid,
        )
    converted = []
    for index, (value, kind) in enumerate(zip(params, types, strict=True)):
        try:
            shaped = go_shaped(value, kind)  # without the keys Go skips: their numbers too
            if kind is not Any:  # (WorkerPing's info: only its Name is read)
                _go_ints(shaped, "$")
            converted.append(msgspec.convert(shaped, kind))
        except msgspec.ValidationError as exc:
            many = "length <=" in str(exc)
            hint = "; send at most that many in one call" if many else _send(method)
            raise RpcError(
                PARSE_ERROR,
                f"unmarshaling params for '{method}' (param: {index}): {exc}{hint}",
                rid,
            ) from None
    if method in _ALLOCATIONS:
        _check_worker_name(method, converted[2], rid)
    return Call(method, tuple(converted), rid)


def _decode(body: bytes) -> Any:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        if not str(exc).startswith("Number out of range"):
            raise
    return _wide_decoder.decode(body)


_JSON_KINDS: Final = {list: "an array", str: "a string", bool: "a boolean"}
_REQUEST_FORM: Final = '{"jsonrpc":"2.0","method":"Venus.X","params":[...],"id":N}'


def _not_a_request(decoded: Any) -> str:
    """What is wrong with a body that is JSON but no object (Go: "cannot unmarshal")."""
    kind = _JSON_KINDS.get(type(decoded), "a number")
    said = f"the body is {kind}, not a JSON-RPC request"
    if isinstance(decoded, list):
        said += "; a batch of requests is not served: send each in a POST of its own"
    return f"{said}; send one request object {_REQUEST_FORM}"


def _unreadable(exc: msgspec.ValidationError) -> str:
    """What is wrong with a request that is JSON, but not one request."""
    if str(exc).startswith("Integer value out of range"):
        # Python reads no integer of more digits (msgspec names no place for it: `$[...]`), so
        # the body is refused wherever it is, under a key Go would skip too. An id of fewer
        # digits past a uint64 is read, and given back.
        digits = sys.get_int_max_str_digits()
        return (
            f"a number in it has more digits than this server reads ({digits});"
            " send numbers within a uint64"
        )
    return str(exc)


def _go_ints(value: Any, where: str) -> None:
    """Raise msgspec.ValidationError at a number no Go integer holds (past a uint64 or below an
    int64), as go-jsonrpc fails to unmarshal it: msgspec's `le` bound stops at int64, so the
    U64 fields cannot say it themselves."""
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        bound = f"<= {2**64 - 1} (a uint64)" if value > 0 else f">= {-(2**63)} (an int64)"
        raise msgspec.ValidationError(f"Expected `int` {bound} - at `{where}`")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _go_ints(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _go_ints(item, f"{where}.{key}")


def worker_name_of(info: Any) -> str:
    """The `Name` of a Venus.WorkerPing's workerInfo (damocles' WorkerInfo), its key in any
    case, as Go reads it; "" when it has none that is a string."""
    if not isinstance(info, dict):
        return ""
    name = go_shaped(info, _WorkerName).get("Name")
    return name if isinstance(name, str) else ""


class _WorkerName(msgspec.Struct):
    Name: str = ""


def worker_name_problem(worker: str) -> str | None:
    """Why a worker's name cannot be stored among the workers seen, or None."""
    size = len(worker.encode())
    if size > MAX_WORKER_NAME:
        return f"the worker name takes {size} bytes, over the {MAX_WORKER_NAME} a coordinator keeps"
    return None


def _check_worker_name(method: str, worker: str, rid: Any) -> None:
    if (problem := worker_name_problem(worker)) is not None:
        raise RpcError(
            INVALID_PARAMS, f"method '{method}' (param: 2): {problem}; use a shorter name", rid
        )


def encode_result(request_id: Any, result: Any) -> bytes:
    """A success answer; `result` is anything msgspec encodes (None gives `"result":null`)."""
    return _encoder.encode({"jsonrpc": "2.0", "result": result, "id": request_id})


def encode_error(error: RpcError) -> bytes:
    """An error answer, with the request's id (null when it could not be read)."""
    return _encoder.encode(
        {
            "jsonrpc": "2.0",
            "error": {"code": error.code, "message": error.message},
            "id": error.request_id,
        }
    )


TOKEN_HOWTO: Final = (
    "send the header `Authorization: Bearer <token>` with the token of the coordinator's"
    " --token-file (damocles-ext worker: --token-file; a damocles-worker sends no header, whatever"
    " its rpc_client.headers say: serve it from a coordinator without --token-file)"
)


def bearer_refusal(problem: str | None) -> RpcError | None:
    """The error a request is refused with for `bearer_problem`'s `problem` (None: served).

    The token is never put in a message: an error body goes to whoever asked."""
    if problem == NO_TOKEN:
        return RpcError(UNAUTHORIZED, f"this coordinator requires a bearer token: {TOKEN_HOWTO}")
    if problem == NOT_BEARER:
        return RpcError(
            UNAUTHORIZED,
            f"the Authorization header is not `Bearer <token>`: {TOKEN_HOWTO}",
        )
    if problem == WRONG_TOKEN:
        return RpcError(
            UNAUTHORIZED,
            "the bearer token is wrong: it is not the one in the coordinator's --token-file;"
            " check the token the client sends",
        )
    return None


#: What `bearer_problem` says is wrong (words for the coordinator's log, never the token).
NO_TOKEN: Final = "no Authorization header"
NOT_BEARER: Final = "an Authorization header that is not `Bearer <token>`"
WRONG_TOKEN: Final = "a bearer token that is not the one of the coordinator's --token-file"


def bearer_problem(authorization: bytes | None, token: bytes) -> str | None:
    """NO_TOKEN, NOT_BEARER or WRONG_TOKEN for this `Authorization` header value; None: right.
    The token is compared in constant time."""
    if authorization is None:
        return NO_TOKEN
    scheme, _, given = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return NOT_BEARER
    if not hmac.compare_digest(given.strip(), token):
        return WRONG_TOKEN
    return None


def allocated_job(job: JobRecord) -> dict[str, Any]:
    """damocles' WdPoStAllocatedJob: the id and the input."""
    return {"Id": job.Id, "Input": msgspec.to_builtins(job.Input)}


def leased_job(job: JobRecord) -> dict[str, Any]:
    """A job as Dext.AllocateJobs gives it: what damocles gives, and the lease to carry, the
    deadline (unix seconds, or null), the try it is."""
    return {
        "Id": job.Id,
        "Input": msgspec.to_builtins(job.Input),
        "Lease": job.lease,
        "NotAfter": job.not_after,
        "DeadlineIdx": job.DeadlineIdx,
        "Partitions": None if job.Partitions is None else list(job.Partitions),
        "TryNum": job.TryNum,
    }


def all_jobs_result(jobs: Iterable[JobRecord], max_try: int) -> msgspec.Raw:
    """damocles' AllJobs result (the jobs' briefs and JobMaxTry), encoded (in a worker thread:
    a large store's briefs take a while)."""
    return msgspec.Raw(
        _encoder.encode({"Jobs": [job_brief(job) for job in jobs], "MaxTry": max_try})
    )


def job_brief(job: JobRecord) -> dict[str, Any]:
    """damocles' WdPoStJobBrief as its MarshalJSON writes it: the record with its input zeroed
    but for the miner and its output emptied, and the number of sectors and of faults."""
    brief: dict[str, Any] = msgspec.to_builtins(job.damocles())
    brief["Input"] = {"Sectors": None, "MinerId": job.Input.MinerId, "ProofType": "",
                      "Seed": [0] * 32}  # fmt: skip
    brief["Output"] = {"proofs": None, "faults": None}
    brief["Sectors"] = len(job.Input.Sectors or ())
    brief["Faults"] = len(job.Output.faults or ()) if job.Output is not None else 0
    return brief
