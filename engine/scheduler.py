"""The scheduler: continuous batching with one per-step token budget, chunked prefill mixed with decodes,
prefix caching, preemption by recompute or swap, and model swapping between several models of one shape
(engine/model_swap.py). Torch-free. The loop has no policy branches: the policy's small
objects decide the order (engine/ordering.py), admission by reservation (engine/kv_ledger.py) and victims
(engine/pressure.py); see engine/policy.py.

One step:
    schedule() -> SchedulerOutput      with several models: the policy's model choice (stay, drain, swap); then
                                       running requests first, in the ordering's order (one decode token, or the
                                       next prefill chunk), preempting the victim selector's choice when KV runs
                                       out; then waiting requests, in the ordering's order, while the token
                                       budget and max_num_seqs allow and the ledger admits them
                                       (QLM: an urgent request that does not fit evicts lower-class work)
    (a runner executes it)             -> ModelOutput (one sampled token per request that reached its end)
    update(output, model_output)       advance computed tokens, register full blocks in the prefix cache,
                                       append sampled tokens, finish and free -> TokenDeltas
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.batch import ModelOutput, ScheduledRequest, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.model_swap import DRAIN, STAY, SWAP, ModelDecision
from engine.policy import SchedulingPolicy
from engine.protocol import BatchComposition, FinishReason, TokenDelta
from engine.request import Request, RequestStatus
from engine.slo import build_slo_table
from engine.swap import SwapSpace

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        policy: SchedulingPolicy,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        clock: Callable[[], float] = time.monotonic,
        swap_space: SwapSpace | None = None,
        models: tuple[str, ...] = (),
        model_load_seconds: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock  # monotonic seconds; the simulator passes a virtual clock
        self.block_manager = block_manager
        self.policy = policy
        self.ledger = policy.make_ledger(block_manager, max_model_len)  # reservations (none for vllm)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.slo_targets = build_slo_table(config.slo)  # class -> targets; an unknown class has none
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order: the newest is last
        self._finished_ids: list[str] = []  # finished since the last schedule(), for the runner to forget
        self.num_preemptions_total = 0
        self.num_prompt_tokens_total = 0  # prompt tokens computed (cache hits excluded, recompute included)
        self.num_generation_tokens_total = 0
        self.num_steps_total = 0
        self.last_batch = BatchComposition()  # what the last schedule() put in the batch
        self.swap_space = swap_space or SwapSpace()  # host blocks for swapped-out KV (none: recompute only)
        self._swap_out: list[tuple[int, int]] = []  # this step's (device, host) copies, then (host, device)
        self._swap_in: list[tuple[int, int]] = []
        self._step_start = 0.0
        self.num_swaps_total = 0
        self.num_evictions_total = 0  # QLM: preemptions of lower-class requests for an urgent one
        # Model swapping (engine/model_swap.py): the models this replica serves, the first resident at start;
        # measured seconds to load each one's weights (updated by every swap) enter the RWT estimate.
        self.models = models or ("",)
        self.resident_model = self.models[0]
        self.model_load_seconds = dict(model_load_seconds or {})
        self.num_model_swaps_total = 0
        self._load_model = ""  # set by a swap in schedule(), for this step's SchedulerOutput
        # Fair orderings account service in KV token-time: they need the pool (again after a KunServe drop).
        self.policy.observer.on_capacity(block_manager.num_blocks * block_manager.block_size, self.clock())

    # ---- intake ------------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> TokenDelta | None:
        """Queue a request, or refuse it at once (returning its final delta) if it can never be served."""
        if error := self.resolve_model(request) or self._never_fits(request):
            request.finish(FinishReason.ERROR, error)
            return TokenDelta(request.request_id, [], FinishReason.ERROR, request.num_prompt_tokens, 0, error)
        request.queued_time = self.clock()
        request.slo = self.slo_targets.get(request.slo_class, request.slo)  # deadlines count from intake
        # KV is only valid under the model that wrote it: no prefix-cache hits across models.
        if len(self.models) > 1:
            request.cache_salt = f"{request.model}\x00{request.cache_salt}"
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.policy.observer.on_arrival(request, request.queued_time)
        return None

    def resolve_model(self, request: Request) -> str:
        """Name the request's model ("" = the first); return an error if this replica does not serve it."""
        request.model = request.model or self.models[0]
        if request.model not in self.models:
            return f"model {request.model!r} is not served here ({', '.join(self.models)})"
        return ""

    def _never_fits(self, request: Request) -> str:
        if request.num_prompt_tokens >= self.max_model_len:
            return (
                f"prompt has {request.num_prompt_tokens} tokens; the model's context is {self.max_model_len}"
            )
        # Without this check a request larger than the pool would preempt itself forever (vllm#39734).
        num_needed = self.block_manager.num_blocks_for(min(request.max_total_tokens, self.max_model_len))
        if num_needed > self.block_manager.num_blocks:
            return (
                f"prompt + max_tokens needs {num_needed} KV blocks but the pool has "
                f"{self.block_manager.num_blocks}; lower max_tokens or raise --kv-cache-memory"
            )
        return ""

    def abort(self, request_ids: list[str]) -> list[TokenDelta]:
        deltas = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request in self.running:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, FinishReason.ABORT)
            deltas.append(self._delta(request, []))
        return deltas

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- schedule ----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self._step_start = self.clock()
        self.ledger.start_step(self.num_steps_total)
        self.swap_space.start_step()
        self.policy.slo.tick(
            self._step_start,
            self.waiting,
            self.running,
            self.swap_space.seconds_per_block,
            self.resident_model,
            self._load_costs(),
        )
        step = _StepBatch(self.config.max_num_batched_tokens)
        decision = self.policy.models.decide(self) if len(self.models) > 1 else ModelDecision(STAY)
        if decision.action == SWAP:
            self._swap_model(decision.model, step)
        self.running = self.policy.ordering.running_order(self.running)
        self._schedule_running(step)
        can_admit = not step.preempted or self.policy.admit_after_preemption or decision.action == SWAP
        if can_admit and decision.action != DRAIN:
            self._admit_waiting(step)
        self.last_batch = self._composition(step.scheduled)
        finished_ids, self._finished_ids = self._finished_ids, []
        swap_out, swap_in, self._swap_out, self._swap_in = self._swap_out, self._swap_in, [], []
        preempted_ids = [r.request_id for r in step.preempted]
        load_model, self._load_model = self._load_model, ""
        return SchedulerOutput(step.scheduled, finished_ids, preempted_ids, swap_out, swap_in, load_model)

    def _load_costs(self) -> dict[str, float]:
        """Seconds until each model could run here: 0 for the resident one, its measured load time otherwise."""
        if len(self.models) == 1:
            return {}
        return {
            m: 0.0 if m == self.resident_model else self.model_load_seconds.get(m, 0.0) for m in self.models
        }

    def _swap_model(self, model: str, step: _StepBatch) -> None:
        """Make `model` resident: its weights load before this step's forward pass (SchedulerOutput.load_model);
        the running requests of the old model are preempted first, their KV swapped out or dropped (`_preempt`)."""
        num_evicted = len(self.running)
        for request in list(self.running):
            self._preempt(request)
            step.preempted.append(request)
        logger.info("model swap %s -> %s (%d running preempted)", self.resident_model, model, num_evicted)
        self.resident_model = self._load_model = model
        self.num_model_swaps_total += 1

    def _schedule_running(self, step: _StepBatch) -> None:
        """Running requests first, in the ordering's order: each gets its next chunk (a decode is a chunk of
        one). When the pool is short, the victim selector frees a request not yet scheduled in this step."""
        i = 0
        while i < len(self.running) and step.budget > 0:
            request = self.running[i]
            num_new = min(request.num_uncomputed_tokens, step.budget)
            self.ledger.ensure(request, request.num_computed_tokens + num_new)
            while not self.block_manager.allocate_slots(request, num_new):
                candidates = [r for r in self.running if r.request_id not in step.scheduled_ids]
                victim = self.policy.victims.select_victim(candidates, self.ledger)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; running[i] is now the next request
            step.add(self._scheduled(request, num_new))
            i += 1

    def _admit_waiting(self, step: _StepBatch) -> None:
        """Waiting requests in the ordering's order while the budget and max_num_seqs last; the loop stops after
        `admission_window` requests failed to fit (1: head-of-line blocking, as vLLM)."""
        is_full = len(self.running) >= self.config.max_num_seqs
        if step.budget <= 0 or (is_full and not self.policy.slo.urgent_ids):
            return  # nothing can be admitted: do not pay for ordering the queue
        num_failed = 0
        for request in self.policy.ordering.waiting_order(self.waiting):
            if step.budget <= 0:
                break
            if request.model != self.resident_model:
                continue  # waits for a model swap (engine/model_swap.py)
            if len(self.running) < self.config.max_num_seqs and self._try_admit(request, step):
                continue
            if self._evict_for(request, step) and self._try_admit(request, step):
                continue
            if len(self.running) >= self.config.max_num_seqs:
                break
            num_failed += 1
            if num_failed >= self.policy.admission_window:
                break

    def _evict_for(self, request: Request, step: _StepBatch) -> bool:
        """QLM eviction (DESIGN §4 pressure ladder, rung 4): an urgent request that cannot be admitted takes the
        KV blocks and the seat of running requests of a lower class (a more relaxed target), chosen by the
        policy's victim selector, swapped or recomputed (`_preempt`). Nothing is evicted unless the victims
        together free enough; a victim already in this step's batch leaves it."""
        if not self.policy.slo.is_urgent(request):
            return False
        candidates = [r for r in self.running if r.slo.tightness > request.slo.tightness]
        num_short = self.block_manager.num_blocks_for(request.num_tokens) - self.block_manager.num_free_blocks
        num_seats_short = len(self.running) + 1 - self.config.max_num_seqs
        victims = []
        while candidates and (num_short > 0 or num_seats_short > 0):
            victim = self.policy.victims.select_victim(candidates, self.ledger)
            candidates.remove(victim)
            victims.append(victim)
            num_short -= len(victim.block_ids)
            num_seats_short -= 1
        if num_short > 0 or num_seats_short > 0:
            return False
        for victim in victims:
            step.remove(victim.request_id)
            self._preempt(victim)
            step.preempted.append(victim)
        self.num_evictions_total += len(victims)
        logger.info("evicted %d lower-class requests for urgent %s", len(victims), request.request_id)
        return True

    def _try_admit(self, request: Request, step: _StepBatch) -> bool:
        computed_block_ids = self.block_manager.get_computed_blocks(request)
        num_cached = len(computed_block_ids) * self.block_manager.block_size
        start = max(num_cached, request.num_computed_tokens)  # a swapped-out request keeps its progress
        num_new_total = request.num_tokens - start
        # The whole remaining prompt must fit in free blocks now (vLLM's scheduler_reserve_full_isl), and the
        # request's reservation in the ledger's plan.
        if not self.block_manager.can_allocate(request, num_new_total, computed_block_ids):
            return False
        if not self.ledger.can_admit(request):
            return False
        num_new = min(num_new_total, step.budget)
        if not self.block_manager.allocate_slots(request, num_new, computed_block_ids):
            return False
        if request.status == RequestStatus.WAITING:  # first admission: count the prefix lookup once
            self.block_manager.record_prefix_lookup(request.num_prompt_tokens, num_cached)
            request.num_cached_tokens = num_cached
            request.mark_scheduled(self.clock())
        request.num_computed_tokens = start
        if request.is_swapped:  # its first blocks get the KV back before the forward pass
            host_block_ids = request.take_host_blocks()
            self._swap_in.extend(zip(host_block_ids, request.block_ids, strict=False))
            self.swap_space.release_after_step(host_block_ids)
        request.status = RequestStatus.RUNNING
        self.waiting.remove(request)
        self.running.append(request)
        self.ledger.admit(request)
        step.add(self._scheduled(request, num_new))
        return True

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids_slice(start, start + num_new),
            start_position=start,
            block_ids=list(request.block_ids),
            sampling=request.sampling,
            needs_sample=start + num_new == request.num_tokens,
            num_generated=request.num_output_tokens,
        )

    def _composition(self, scheduled: list[ScheduledRequest]) -> BatchComposition:
        """Called before update(), while a scheduled request's progress still tells prefill from decode."""
        prefill = [s for s in scheduled if self.requests[s.request_id].is_prefilling]
        num_prefill_tokens = sum(s.num_tokens for s in prefill)
        return BatchComposition(
            num_prefill_requests=len(prefill),
            num_prefill_tokens=num_prefill_tokens,
            num_decode_requests=len(scheduled) - len(prefill),
            num_decode_tokens=sum(s.num_tokens for s in scheduled) - num_prefill_tokens,
        )

    def _preempt(self, request: Request) -> None:
        """Recompute, or swap the KV to host memory when the policy allows it and the cost model
        (engine/swap.py) finds it cheaper; either way the request waits again with its tokens kept."""
        self.running.remove(request)
        self.ledger.release(request)
        num_kv_blocks = self.block_manager.num_blocks_for(request.num_computed_tokens)
        seconds_per_token = self.policy.slo.meter.seconds_per_prefill_token.value
        swap = self.policy.swaps and self.swap_space.prefers_swap(
            num_kv_blocks, request.num_computed_tokens, seconds_per_token
        )
        host_block_ids = self.swap_space.allocate(num_kv_blocks) if swap else []
        self._swap_out.extend(zip(request.block_ids[:num_kv_blocks], host_block_ids, strict=False))
        self.block_manager.free(request)
        if swap:
            request.swap_out(host_block_ids)
        else:
            request.preempt()
        self.waiting.append(request)
        self.num_preemptions_total += 1
        self.num_swaps_total += swap
        logger.info(
            "preempted %s (%s) after %d output tokens",
            request.request_id,
            "swap" if swap else "recompute",
            request.num_output_tokens,
        )

    # ---- update ------------------------------------------------------------------------------------------

    def update(self, output: SchedulerOutput, model_output: ModelOutput) -> list[TokenDelta]:
        self.num_steps_total += 1
        deltas = []
        now = self.clock()
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.is_finished:
                continue
            end = item.start_position + item.num_tokens
            self.num_prompt_tokens_total += max(0, min(end, request.num_prompt_tokens) - item.start_position)
            request.num_computed_tokens = end
            self.block_manager.cache_full_blocks(request)
            new_prompt = self._new_prompt_service(request, item)
            self.policy.observer.on_progress(request, new_prompt, int(item.needs_sample), now)
            if not item.needs_sample:
                continue
            token_id = model_output.sampled[request.request_id]
            self.num_generation_tokens_total += 1
            reason = request.append_token(token_id, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
            deltas.append(self._delta(request, [token_id]))
        # A step that loaded weights says nothing about Θ or the price of a prefill token: it is not metered.
        if output.load_model:
            if model_output.model_load_seconds > 0:
                self.model_load_seconds[output.load_model] = model_output.model_load_seconds
            return deltas
        step_seconds = self.clock() - self._step_start
        num_prefill = self.last_batch.num_prefill_tokens
        self.policy.slo.meter.observe(step_seconds, len(model_output.sampled), num_prefill, output.num_tokens)
        return deltas

    @staticmethod
    def _new_prompt_service(request: Request, item: ScheduledRequest) -> int:
        """Prompt tokens this step prefilled for the first time: a recompute after preemption and prefix-cache
        hits are not new service (Justitia's and VTC's accounts count each prompt token once)."""
        end = min(item.start_position + item.num_tokens, request.num_prompt_tokens)
        new = max(0, end - max(item.start_position, request.num_prompt_served))
        request.num_prompt_served = max(request.num_prompt_served, end)
        return new

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.swap_space.release_after_step(request.take_host_blocks())  # aborted while swapped out
        self.policy.observer.on_finish(request, self.clock())
        self.ledger.release(request)
        self.block_manager.free(request)
        request.finish(reason)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _delta(self, request: Request, token_ids: list[int]) -> TokenDelta:
        is_first_token = bool(token_ids) and request.num_output_tokens == len(token_ids)
        return TokenDelta(
            request.request_id,
            token_ids,
            request.finish_reason,
            request.num_prompt_tokens,
            request.num_cached_tokens,
            request.error,
            request.queue_seconds if is_first_token else 0.0,
        )

    # ---- checks ------------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        live = self.running + [r for r in self.waiting if r.block_ids]
        self.block_manager.check_invariants(live)
        assert all(r.status == RequestStatus.RUNNING for r in self.running)
        assert all(not r.block_ids for r in self.waiting), "a waiting request holds KV"
        assert len(self.running) <= self.config.max_num_seqs
        assert set(self.requests) == {r.request_id for r in self.running + self.waiting}
        assert all(r.model == self.resident_model for r in self.running), "a request runs on another model"
        self.ledger.check_invariants(self.running)
        swapped = [r for r in self.waiting if r.is_swapped]
        self.swap_space.check_invariants([b for r in swapped for b in r.host_block_ids])
        bs = self.block_manager.block_size
        assert all(len(r.host_block_ids) * bs >= r.num_computed_tokens > 0 for r in swapped)
        assert all(r.num_computed_tokens == 0 for r in self.waiting if not r.is_swapped)


class _StepBatch:
    """What one schedule() has put in the batch so far, and the token budget left."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: list[ScheduledRequest] = []
        self.scheduled_ids: set[str] = set()
        self.preempted: list[Request] = []

    def add(self, item: ScheduledRequest) -> None:
        self.scheduled.append(item)
        self.scheduled_ids.add(item.request_id)
        self.budget -= item.num_tokens

    def remove(self, request_id: str) -> None:
        """Take an evicted request back out of the batch, refunding its tokens (no-op if it is not in it)."""
        if request_id not in self.scheduled_ids:
            return
        item = next(s for s in self.scheduled if s.request_id == request_id)
        self.scheduled.remove(item)
        self.scheduled_ids.discard(request_id)
        self.budget += item.num_tokens
