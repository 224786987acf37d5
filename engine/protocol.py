"""Typed messages that cross the server <-> engine process boundary.

Every record is a frozen dataclass of plain values (ints, floats, strings, lists); none holds a live object.
The byte codec for them lives in `engine/codec.py`; the rings that carry the bytes in `engine/ipc.py`.
This module imports neither torch nor anything of the server.

    server ──AddRequest / Abort / Shutdown──▶ engine
    server ◀──Ready / TokenDeltaBatch / EngineStats / EngineError── engine
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

# Application shapes a client may declare (metadata.app_type); the app-cost model one-hot encodes them.
APP_TYPES = ("agent", "map-reduce", "self-consistency", "chat", "other")
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-300 overflow float32 to inf/NaN.
SAMPLING_EPS = 1e-5


class FinishReason(IntEnum):
    """Why a request ended. Values are stable on the wire."""

    STOP = 0  # EOS, a stop token id, or (server side) a stop string
    LENGTH = 1  # max_tokens or the model's context length
    ABORT = 2  # client disconnect / explicit abort
    ERROR = 3  # the engine could not serve it (e.g. it can never fit in the KV pool)

    @property
    def openai_name(self) -> str:
        return ("stop", "length", "abort", "error")[self]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 (or below SAMPLING_EPS) means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


# ---- server -> engine ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float  # time.time() at the server when the HTTP request arrived
    tenant: str = "default"
    app_id: str = ""  # empty = an application of its own
    slo_class: str = "interactive"
    priority: int = 0
    cache_salt: str = ""  # mixed into prefix-cache hashes; requests with different salts never share blocks
    # Response-length prediction (tokens), filled by predictor/ in the server; 0 = no prediction.
    rl_mean: float = 0.0
    rl_q: float = 0.0
    # Justitia (engine/fairness.py): the application's declared shape, its predicted total cost in KV token-time
    # (Σ p·d + d²/2 over its requests; predicted once per app by predictor/app_cost.py in the server, 0 = none),
    # and the tenant's fair-share weight (`--tenant-weights`).
    app_type: str = ""  # "" = undeclared; else one of APP_TYPES
    app_num_requests: int = 0  # declared number of requests in the app; 0 = undeclared
    app_cost: float = 0.0
    tenant_weight: float = 1.0
    # QLM model swapping: which served model this request is for ("" = the engine's only / first model).
    model: str = ""


@dataclass(frozen=True)
class Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class Shutdown:
    reason: str = ""


# ---- engine -> server ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """Sent once, after the model is loaded and the KV pool is allocated."""

    model_name: str
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    device: str
    policy: str
    # The most blocks one request can ever hold: the pool of one scheduler (a replica engine's largest group).
    # The server refuses prompt + max_tokens beyond it with a 400 instead of a request the engine must refuse.
    # 0 = not reported; then num_kv_blocks is the bound.
    max_blocks_per_request: int = 0


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one request since the last delta. finish_reason is set on its last delta."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    error: str = ""  # set with FinishReason.ERROR
    queue_seconds: float = 0.0  # on the delta with the first output token: engine intake → first scheduled


@dataclass(frozen=True)
class TokenDeltaBatch:
    """All deltas of one engine step: one message, one wake-up."""

    deltas: list[TokenDelta]


@dataclass(frozen=True)
class QueueStat:
    """The requests of one (tenant, application, SLO class) in the engine now."""

    tenant: str
    app_id: str  # "" = requests sent without an app id (each its own app), merged; "other" past the cap
    slo_class: str
    num_waiting: int = 0
    num_running: int = 0
    num_kv_blocks: int = 0  # blocks held, per request: a shared prefix block counts once per holder


@dataclass(frozen=True)
class BatchComposition:
    """The batch scheduled last while requests run (all zeros when none runs). A prefill is a prompt chunk,
    or the recompute of a preempted request; a decode is one token of a request past its prefill."""

    num_prefill_requests: int = 0
    num_prefill_tokens: int = 0
    num_decode_requests: int = 0
    num_decode_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """Published by the engine a few times a second and after every state change that a client may wait for."""

    timestamp: float
    num_running: int
    num_waiting: int
    num_preempted: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float  # used / total blocks, 0..1
    num_preemptions_total: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    prefix_cache_queries_total: int  # in tokens
    prefix_cache_hits_total: int  # in tokens
    num_steps_total: int
    last_step_seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # policy-specific gauges (name -> value)
    num_cached_free_blocks: int = 0  # free blocks still holding prefix-cache content (evicted last); ≤ free
    batch: BatchComposition = field(default_factory=BatchComposition)
    queues: list[QueueStat] = field(default_factory=list)  # by (tenant, app, class), largest first, capped
    # KunServe replica mode (engine/replicas.py): replica ids per group, stage order; [] = one replica. Every group
    # of one = data-parallel; a longer group = a pipeline over those replicas after a parameter drop.
    replica_groups: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class EngineError:
    """A fatal error in the engine process; the process exits after sending it."""

    message: str


ServerToEngine = AddRequest | Abort | Shutdown
EngineToServer = Ready | TokenDeltaBatch | EngineStats | EngineError
