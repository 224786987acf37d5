"""The byte codec for every message in `engine/protocol.py`: `encode(msg) -> bytes`, `decode(bytes) -> msg`.

A record is a one-byte type tag followed by that type's explicit field layout. The hot engine -> server message,
`TokenDeltaBatch`, is struct-packed with token ids as little-endian int32; every other message is an orjson
array of its fields in a fixed order (the order below is the wire format: append fields, never reorder).
No pickle: a peer can only ever build the dataclasses listed here.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Callable
from typing import Any

import orjson

from engine.protocol import (
    Abort,
    AddRequest,
    BatchComposition,
    EngineError,
    EngineStats,
    EngineToServer,
    FinishReason,
    QueueStat,
    Ready,
    SamplingParams,
    ServerToEngine,
    Shutdown,
    TokenDelta,
    TokenDeltaBatch,
)

Message = ServerToEngine | EngineToServer


class CodecError(ValueError):
    """A message that cannot be encoded, or bytes that are not a valid record."""


# ---- tags (stable on the wire) -----------------------------------------------------------------------------

TAG_ADD_REQUEST = 0x01
TAG_ABORT = 0x02
TAG_SHUTDOWN = 0x03
TAG_READY = 0x10
TAG_TOKEN_DELTA_BATCH = 0x11
TAG_ENGINE_STATS = 0x12
TAG_ENGINE_ERROR = 0x13


def _float(value: Any) -> float:
    # orjson writes NaN/inf as null; give the float back as NaN rather than a None in a float field.
    return math.nan if value is None else float(value)


# ---- orjson field layouts ----------------------------------------------------------------------------------


def _fields_of_add_request(m: AddRequest) -> list:
    s = m.sampling
    sampling = [
        s.max_tokens,
        s.temperature,
        s.top_p,
        s.top_k,
        s.min_p,
        s.seed,
        list(s.stop_token_ids),
        s.ignore_eos,
    ]
    return [
        m.request_id,
        m.prompt_token_ids,
        sampling,
        m.arrival_time,
        m.tenant,
        m.app_id,
        m.slo_class,
        m.priority,
        m.cache_salt,
        m.rl_mean,
        m.rl_q,
        m.app_type,
        m.app_num_requests,
        m.app_cost,
        m.tenant_weight,
        m.model,
    ]


def _add_request_of(f: list) -> AddRequest:
    rid, prompt, s, arrival, tenant, app_id, slo_class, priority, cache_salt, rl_mean, rl_q = f[:11]
    app_type, app_num_requests, app_cost, tenant_weight, model = f[11:]
    max_tokens, temperature, top_p, top_k, min_p, seed, stop_token_ids, ignore_eos = s
    sampling = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=_float(temperature),
        top_p=_float(top_p),
        top_k=int(top_k),
        min_p=_float(min_p),
        seed=None if seed is None else int(seed),
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=bool(ignore_eos),
    )
    return AddRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=sampling,
        arrival_time=_float(arrival),
        tenant=tenant,
        app_id=app_id,
        slo_class=slo_class,
        priority=int(priority),
        cache_salt=cache_salt,
        rl_mean=_float(rl_mean),
        rl_q=_float(rl_q),
        app_type=str(app_type),
        app_num_requests=int(app_num_requests),
        app_cost=_float(app_cost),
        tenant_weight=_float(tenant_weight),
        model=str(model),
    )


def _fields_of_ready(m: Ready) -> list:
    return [
        m.model_name,
        m.max_model_len,
        m.block_size,
        m.num_kv_blocks,
        m.device,
        m.policy,
        m.max_blocks_per_request,
    ]


def _ready_of(f: list) -> Ready:
    model_name, max_model_len, block_size, num_kv_blocks, device, policy, max_blocks_per_request = f
    return Ready(
        model_name,
        int(max_model_len),
        int(block_size),
        int(num_kv_blocks),
        device,
        policy,
        int(max_blocks_per_request),
    )


_STATS_INTS = ("num_running", "num_waiting", "num_preempted", "num_free_blocks", "num_total_blocks")
_STATS_TOTALS = (
    "num_preemptions_total",
    "num_prompt_tokens_total",
    "num_generation_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "num_steps_total",
)


_BATCH_FIELDS = ("num_prefill_requests", "num_prefill_tokens", "num_decode_requests", "num_decode_tokens")
_QUEUE_NAMES = ("tenant", "app_id", "slo_class")
_QUEUE_COUNTS = ("num_waiting", "num_running", "num_kv_blocks")
_QUEUE_FIELDS = _QUEUE_NAMES + _QUEUE_COUNTS


def _queue_stat_of(f: list) -> QueueStat:
    names = dict(zip(_QUEUE_NAMES, map(str, f[:3]), strict=True))
    counts = dict(zip(_QUEUE_COUNTS, map(int, f[3:]), strict=True))
    return QueueStat(**names, **counts)


def _fields_of_stats(m: EngineStats) -> list:
    return [
        m.timestamp,
        *(getattr(m, name) for name in _STATS_INTS),
        m.kv_usage,
        *(getattr(m, name) for name in _STATS_TOTALS),
        m.last_step_seconds,
        m.extra,
        m.num_cached_free_blocks,
        [getattr(m.batch, name) for name in _BATCH_FIELDS],
        [[getattr(q, name) for name in _QUEUE_FIELDS] for q in m.queues],
        m.replica_groups,
    ]


def _stats_of(f: list) -> EngineStats:
    ints = dict(zip(_STATS_INTS, map(int, f[1:6]), strict=True))
    totals = dict(zip(_STATS_TOTALS, map(int, f[7:13]), strict=True))
    extra = {str(k): _float(v) for k, v in f[14].items()}
    return EngineStats(
        timestamp=_float(f[0]),
        **ints,
        kv_usage=_float(f[6]),
        **totals,
        last_step_seconds=_float(f[13]),
        extra=extra,
        num_cached_free_blocks=int(f[15]),
        batch=BatchComposition(**dict(zip(_BATCH_FIELDS, map(int, f[16]), strict=True))),
        queues=[_queue_stat_of(q) for q in f[17]],
        replica_groups=[[int(i) for i in group] for group in f[18]],
    )


# tag -> (type, number of fields, fields_of, of_fields); TokenDeltaBatch is struct-packed (below), not here.
_JSON_LAYOUTS: dict[int, tuple[type, int, Callable[[Any], list], Callable[[list], Any]]] = {
    TAG_ADD_REQUEST: (AddRequest, 16, _fields_of_add_request, _add_request_of),
    TAG_ABORT: (Abort, 1, lambda m: [m.request_ids], lambda f: Abort(request_ids=list(f[0]))),
    TAG_SHUTDOWN: (Shutdown, 1, lambda m: [m.reason], lambda f: Shutdown(reason=f[0])),
    TAG_READY: (Ready, 7, _fields_of_ready, _ready_of),
    TAG_ENGINE_STATS: (EngineStats, 19, _fields_of_stats, _stats_of),
    TAG_ENGINE_ERROR: (EngineError, 1, lambda m: [m.message], lambda f: EngineError(message=f[0])),
}
_JSON_TAG_OF_TYPE = {layout[0]: tag for tag, layout in _JSON_LAYOUTS.items()}


# ---- TokenDeltaBatch: struct-packed ------------------------------------------------------------------------
#
#   batch:  u8 tag | u32 num_deltas | delta * num_deltas
#   delta:  u32 len(request_id utf-8) | i8 finish_reason (-1 = None) | u32 num_tokens | u32 num_prompt_tokens
#           | u32 num_cached_tokens | u32 len(error utf-8) | f64 queue_seconds
#           | request_id bytes | error bytes | i32 * num_tokens

_BATCH_HEAD = struct.Struct("<BI")
_DELTA_HEAD = struct.Struct("<IbIIIId")
_SWAP = sys.byteorder != "little"  # the wire is little-endian int32; array() is native
assert array("i").itemsize == 4


def _encode_batch(batch: TokenDeltaBatch) -> bytes:
    parts = [_BATCH_HEAD.pack(TAG_TOKEN_DELTA_BATCH, len(batch.deltas))]
    for d in batch.deltas:
        rid = d.request_id.encode()
        error = d.error.encode()
        finish = -1 if d.finish_reason is None else int(d.finish_reason)
        tokens = array("i", d.token_ids)
        if _SWAP:
            tokens.byteswap()
        parts += (
            _DELTA_HEAD.pack(
                len(rid),
                finish,
                len(tokens),
                d.num_prompt_tokens,
                d.num_cached_tokens,
                len(error),
                d.queue_seconds,
            ),
            rid,
            error,
            tokens.tobytes(),
        )
    return b"".join(parts)


def _decode_batch(view: memoryview) -> TokenDeltaBatch:
    (_, num_deltas), offset = _BATCH_HEAD.unpack_from(view, 0), _BATCH_HEAD.size
    deltas = []
    for _ in range(num_deltas):
        head = _DELTA_HEAD.unpack_from(view, offset)
        rid_len, finish, num_tokens, num_prompt, num_cached, error_len, queue_seconds = head
        offset += _DELTA_HEAD.size
        end = offset + rid_len + error_len + 4 * num_tokens
        if end > len(view):
            raise CodecError(f"TokenDeltaBatch truncated: needs {end} bytes, has {len(view)}")
        rid = str(view[offset : offset + rid_len], "utf-8")
        error = str(view[offset + rid_len : offset + rid_len + error_len], "utf-8")
        tokens = array("i")
        tokens.frombytes(view[offset + rid_len + error_len : end])
        if _SWAP:
            tokens.byteswap()
        reason = None if finish < 0 else FinishReason(finish)
        deltas.append(TokenDelta(rid, tokens.tolist(), reason, num_prompt, num_cached, error, queue_seconds))
        offset = end
    if offset != len(view):
        raise CodecError(f"TokenDeltaBatch: {len(view) - offset} trailing bytes")
    return TokenDeltaBatch(deltas)


# ---- public API --------------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One message -> one record. Raises CodecError for a non-protocol object or an unencodable value."""
    try:
        if type(msg) is TokenDeltaBatch:
            return _encode_batch(msg)
        tag = _JSON_TAG_OF_TYPE.get(type(msg))
        if tag is None:
            raise CodecError(f"not a protocol message: {type(msg).__name__}")
        return bytes((tag,)) + orjson.dumps(_JSON_LAYOUTS[tag][2](msg))
    except CodecError:
        raise
    except (struct.error, OverflowError, TypeError, ValueError, UnicodeError, orjson.JSONEncodeError) as exc:
        raise CodecError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def decode(data: bytes | bytearray | memoryview) -> Message:
    """One record -> one message. Raises CodecError on an unknown tag or malformed bytes."""
    view = memoryview(data)
    if not view:
        raise CodecError("empty record")
    tag = view[0]
    try:
        if tag == TAG_TOKEN_DELTA_BATCH:
            return _decode_batch(view)
        if tag not in _JSON_LAYOUTS:
            raise CodecError(f"unknown message tag 0x{tag:02x}")
        cls, num_fields, _, of_fields = _JSON_LAYOUTS[tag]
        fields = orjson.loads(view[1:])
        if not isinstance(fields, list) or len(fields) != num_fields:
            raise CodecError(f"{cls.__name__}: expected an array of {num_fields} fields, got {fields!r:.80}")
        return of_fields(fields)
    except CodecError:
        raise
    except (struct.error, TypeError, ValueError, KeyError, AttributeError, orjson.JSONDecodeError) as exc:
        raise CodecError(f"malformed record with tag 0x{tag:02x}: {exc}") from exc
