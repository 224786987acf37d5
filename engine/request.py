"""A request inside the engine: it owns its tokens, its progress and its status; transitions are methods.

Token bookkeeping (P prompt tokens, O output tokens so far):

    all_token_ids:        [p0 ... p(P-1) o0 ... o(O-1)]
    num_computed_tokens:  how many of them have K/V in the cache
    decode step:          num_computed == P + O - 1  → run the last sampled token, sample the next one
    after a preemption:   num_computed == 0           → recompute all P + O tokens, then sample the next one
"""

from __future__ import annotations

import time
from enum import IntEnum

from engine.protocol import AddRequest, FinishReason, SamplingParams
from engine.slo import SloTarget


class RequestStatus(IntEnum):
    """Ordered so that `is_finished` is a comparison (as in vLLM V1)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_STATUS_OF_REASON = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival_time: float = 0.0,
        tenant: str = "default",
        app_id: str = "",
        slo_class: str = "interactive",
        priority: int = 0,
        cache_salt: str = "",
        rl_mean: float = 0.0,
        rl_q: float = 0.0,
        app_type: str = "",
        app_num_requests: int = 0,
        app_cost: float = 0.0,
        tenant_weight: float = 1.0,
        model: str = "",
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.arrival_time = arrival_time
        self.tenant = tenant
        self.app_id = app_id or request_id  # default: an application of its own
        self.slo_class = slo_class
        self.priority = priority
        self.cache_salt = cache_salt
        self.rl_mean = rl_mean
        self.rl_q = rl_q
        self.app_type = app_type  # Justitia (engine/fairness.py): the app's declared shape, predicted cost,
        self.app_num_requests = app_num_requests  # and the tenant's weight, as AddRequest carries them
        self.app_cost = app_cost
        self.tenant_weight = tenant_weight
        self.model = model  # the served model it is for ("" = the engine's first); QLM groups are keyed by it

        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at first admission (reported in usage)
        self.num_prompt_served = 0  # prompt tokens ever prefilled (high water): recompute is no new service
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # hash chain of this request's full blocks, grown lazily
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.error = ""
        self.queued_time = time.monotonic()  # engine intake (monotonic s): queue time counts from here
        self.first_scheduled_time: float | None = None  # first admission into the running batch
        self.slo = SloTarget()  # the class's targets, set by the scheduler at intake (engine/slo.py)
        self.host_block_ids: list[int] = []  # swapped out (QLM eviction): its KV sits in these host blocks

    @classmethod
    def from_message(cls, msg: AddRequest) -> Request:
        return cls(
            request_id=msg.request_id,
            prompt_token_ids=msg.prompt_token_ids,
            sampling=msg.sampling,
            arrival_time=msg.arrival_time,
            tenant=msg.tenant,
            app_id=msg.app_id,
            slo_class=msg.slo_class,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
            rl_mean=msg.rl_mean,
            rl_q=msg.rl_q,
            app_type=msg.app_type,
            app_num_requests=msg.app_num_requests,
            app_cost=msg.app_cost,
            tenant_weight=msg.tenant_weight,
            model=msg.model,
        )

    # ---- derived values ----------------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until every known token except the last sampled one has K/V (prompt or recompute)."""
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def queue_seconds(self) -> float:
        """Intake → first admission (vLLM's queue time); 0 until the request is first scheduled."""
        if self.first_scheduled_time is None:
            return 0.0
        return self.first_scheduled_time - self.queued_time

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus every output token it may still produce: the KV it can ever need."""
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def ttft_deadline(self) -> float:
        return self.queued_time + self.slo.ttft_s

    @property
    def e2e_deadline(self) -> float:
        return self.queued_time + self.slo.e2e_s

    @property
    def next_deadline(self) -> float:
        """When the request's next token is due (scheduler clock; inf when its class has no target): the TTFT
        deadline before the first token; after it, the end-to-end deadline or the TPOT pace `ttft + tpot·n`
        from intake, whichever comes first. The pace needs no first-token timestamp and forgives a fast start."""
        if self.num_output_tokens == 0:
            return min(self.ttft_deadline, self.e2e_deadline)
        paced = self.ttft_deadline + self.slo.tpot_s * self.num_output_tokens
        return min(self.e2e_deadline, paced)

    @property
    def is_swapped(self) -> bool:
        return bool(self.host_block_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    # ---- transitions -------------------------------------------------------------------------------------

    def append_token(
        self, token_id: int, eos_token_ids: tuple[int, ...], max_model_len: int
    ) -> FinishReason | None:
        """Add one sampled token; return why the request must stop now, if it must."""
        self.output_token_ids.append(token_id)
        sampling = self.sampling
        if not sampling.ignore_eos and token_id in eos_token_ids:
            return FinishReason.STOP
        if token_id in sampling.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= sampling.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None

    def mark_scheduled(self, now: float) -> None:
        """Admitted into the running batch at `now` (monotonic s); only the first admission counts."""
        if self.first_scheduled_time is None:
            self.first_scheduled_time = now

    def finish(self, reason: FinishReason, error: str = "") -> None:
        self.status = _STATUS_OF_REASON[reason]
        self.finish_reason = reason
        self.error = error

    def preempt(self) -> None:
        """Recompute preemption: drop all KV; the request re-enters the waiting queue with its tokens kept."""
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.block_ids = []
        self.num_preemptions += 1

    def swap_out(self, host_block_ids: list[int]) -> None:
        """Swap preemption (QLM eviction): its KV now lives in `host_block_ids`; tokens and computed progress are
        kept, so it resumes where it stopped once swapped back in."""
        self.status = RequestStatus.PREEMPTED
        self.block_ids = []
        self.host_block_ids = list(host_block_ids)
        self.num_preemptions += 1

    def take_host_blocks(self) -> list[int]:
        """Swap-in: hand over the host blocks holding its KV (in block-table order) and forget them."""
        host_block_ids, self.host_block_ids = self.host_block_ids, []
        return host_block_ids

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
