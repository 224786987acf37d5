"""Round trips of every protocol message through engine/codec.py, and the errors for bad input."""

from __future__ import annotations

import dataclasses
import math

import orjson
import pytest

from engine import codec, protocol
from engine.codec import CodecError, decode, encode
from engine.protocol import (
    Abort,
    AddRequest,
    BatchComposition,
    EngineError,
    EngineStats,
    FinishReason,
    QueueStat,
    Ready,
    SamplingParams,
    Shutdown,
    TokenDelta,
    TokenDeltaBatch,
)

# One instance per message type with every field away from its default, so a field the codec forgets fails.
FULL_SAMPLING = SamplingParams(
    max_tokens=77,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=2**40 + 3,
    stop_token_ids=(2, 13),
    ignore_eos=True,
)
FULL_MESSAGES = [
    AddRequest(
        request_id="chatcmpl-ü-1",
        prompt_token_ids=[1, 50, 2**31 - 1],
        sampling=FULL_SAMPLING,
        arrival_time=1700000000.125,
        tenant="acme",
        app_id="agent-7",
        slo_class="batch",
        priority=-3,
        cache_salt="s@lt",
        rl_mean=123.5,
        rl_q=300.0,
        app_type="map-reduce",
        app_num_requests=16,
        app_cost=4.5e6,
        tenant_weight=2.0,
        model="smollm2-b",
    ),
    Abort(request_ids=["a", "b"]),
    Shutdown(reason="bye"),
    Ready(
        model_name="smollm2",
        max_model_len=2048,
        block_size=16,
        num_kv_blocks=999,
        device="cpu",
        policy="kairos",
        max_blocks_per_request=500,
    ),
    TokenDeltaBatch(
        deltas=[
            TokenDelta(
                request_id="r1",
                token_ids=[5, 6],
                finish_reason=FinishReason.LENGTH,
                num_prompt_tokens=12,
                num_cached_tokens=8,
                error="e",
                queue_seconds=0.125,
            )
        ]
    ),
    EngineStats(
        timestamp=1.5,
        num_running=1,
        num_waiting=2,
        num_preempted=3,
        num_free_blocks=4,
        num_total_blocks=5,
        kv_usage=0.25,
        num_preemptions_total=6,
        num_prompt_tokens_total=7,
        num_generation_tokens_total=8,
        prefix_cache_queries_total=9,
        prefix_cache_hits_total=10,
        num_steps_total=11,
        last_step_seconds=0.012,
        extra={"virtual_time": 3.5, "num_groups": 2.0},
        num_cached_free_blocks=3,
        batch=BatchComposition(
            num_prefill_requests=1, num_prefill_tokens=40, num_decode_requests=7, num_decode_tokens=7
        ),
        queues=[
            QueueStat("acme", "agent-7", "batch", num_waiting=2, num_running=1, num_kv_blocks=9),
            QueueStat("ü-tenant", "", "interactive", num_waiting=0, num_running=3, num_kv_blocks=12),
        ],
        replica_groups=[[0, 1], [2]],
    ),
    EngineError(message="Traceback …\nValueError: boom"),
]


def _non_default_fields(obj: object) -> list[str]:
    """Names of fields still at their default value (the instance would not test them)."""
    left = []
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(obj, f.name) == default:
            left.append(f.name)
    return left


def test_every_protocol_message_type_is_covered() -> None:
    message_types = set(protocol.ServerToEngine.__args__) | set(protocol.EngineToServer.__args__)
    assert {type(m) for m in FULL_MESSAGES} == message_types


@pytest.mark.parametrize("msg", FULL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_with_every_field_set(msg: object) -> None:
    assert _non_default_fields(msg) == []
    if isinstance(msg, AddRequest):
        assert _non_default_fields(msg.sampling) == []
    if isinstance(msg, TokenDeltaBatch):
        assert _non_default_fields(msg.deltas[0]) == []
    if isinstance(msg, EngineStats):
        assert _non_default_fields(msg.batch) == []
        assert _non_default_fields(msg.queues[0]) == []
    out = decode(encode(msg))
    assert out == msg
    assert type(out) is type(msg)


@pytest.mark.parametrize(
    "msg",
    [
        AddRequest("r", [], SamplingParams(), 0.0),  # defaults, empty prompt, seed None
        AddRequest("请求-🚀", list(range(100_000)), SamplingParams(seed=0, stop_token_ids=()), 1.0),
        Abort(request_ids=[]),
        Abort(request_ids=["", "ü", "x" * 1000]),
        Shutdown(),
        TokenDeltaBatch(deltas=[]),
        TokenDeltaBatch(deltas=[TokenDelta("r", [])]),  # no tokens, finish None
        TokenDeltaBatch(deltas=[TokenDelta("", [0, -1, 2**31 - 1, -(2**31)])]),
        TokenDeltaBatch(deltas=[TokenDelta("big", list(range(200_000)), FinishReason.STOP)]),
        TokenDeltaBatch(
            deltas=[TokenDelta(f"r{i}-é", [i], FinishReason(i % 4) if i % 3 else None) for i in range(256)]
        ),
        TokenDeltaBatch(deltas=[TokenDelta("x", [], FinishReason.ERROR, error="engine 💥 died\nline 2")]),
        EngineStats(1.0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0.0),  # empty extra, no queues
        TokenDeltaBatch(deltas=[TokenDelta("q", [1], queue_seconds=1e-7), TokenDelta("r", [2])]),
        EngineError(message=""),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip_edge_cases(msg: object) -> None:
    assert decode(encode(msg)) == msg


def test_types_come_back_exact() -> None:
    add = decode(encode(FULL_MESSAGES[0]))
    assert isinstance(add.sampling.stop_token_ids, tuple)
    assert isinstance(add.prompt_token_ids, list)
    delta = decode(encode(FULL_MESSAGES[4])).deltas[0]
    assert type(delta.finish_reason) is FinishReason
    assert isinstance(delta.token_ids, list)
    assert type(delta.queue_seconds) is float
    # an int given for a float field comes back a float
    stats = decode(encode(dataclasses.replace(FULL_MESSAGES[5], timestamp=3, kv_usage=1)))
    assert type(stats.timestamp) is float and type(stats.kv_usage) is float
    assert type(stats.batch) is BatchComposition and all(type(q) is QueueStat for q in stats.queues)


def test_nan_survives_as_nan() -> None:
    stats = dataclasses.replace(FULL_MESSAGES[5], kv_usage=math.nan, extra={"g": math.inf})
    out = decode(encode(stats))
    assert math.isnan(out.kv_usage) and math.isnan(out.extra["g"])  # JSON has no inf: it degrades to NaN


def test_token_ids_are_packed_int32() -> None:
    small = encode(TokenDeltaBatch([TokenDelta("r", [])]))
    big = encode(TokenDeltaBatch([TokenDelta("r", list(range(1000)))]))
    assert len(big) - len(small) == 4000


def test_unknown_tag_is_a_clear_error() -> None:
    with pytest.raises(CodecError, match="unknown message tag 0x7f"):
        decode(b"\x7f[]")


def test_empty_and_malformed_records() -> None:
    with pytest.raises(CodecError, match="empty"):
        decode(b"")
    with pytest.raises(CodecError):
        decode(bytes([codec.TAG_ABORT]) + b"{not json")
    with pytest.raises(CodecError, match="expected an array of 1 fields"):
        decode(bytes([codec.TAG_ABORT]) + orjson.dumps([["a"], "extra"]))
    with pytest.raises(CodecError):
        decode(bytes([codec.TAG_READY]) + orjson.dumps({"model_name": "x"}))
    good = encode(FULL_MESSAGES[4])
    with pytest.raises(CodecError, match="truncated"):
        decode(good[:-1])
    with pytest.raises(CodecError, match="trailing"):
        decode(good + b"\0")
    with pytest.raises(CodecError):
        decode(good[:3])


def test_encode_rejects_non_messages_and_bad_values() -> None:
    with pytest.raises(CodecError, match="not a protocol message"):
        encode(TokenDelta("r", [1]))  # a delta only travels inside a batch
    with pytest.raises(CodecError, match="not a protocol message"):
        encode({"request_id": "r"})
    with pytest.raises(CodecError):
        encode(TokenDeltaBatch([TokenDelta("r", [2**31])]))  # not an int32
    with pytest.raises(CodecError):
        encode(Abort(request_ids=["\ud800"]))  # lone surrogate: not UTF-8
