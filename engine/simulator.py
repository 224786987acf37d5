"""The simulator: the real `EngineCore` and scheduler on a virtual clock, with a cost model instead of a model.

`SimulatedRunner.execute` samples a fixed token for every request that needs one and advances the clock by the
cost model's step time (engine/cost_model.py), plus the step's KV block copies to and from its host swap pool
(QLM eviction) at the cost model's host bandwidth, as the real runner copies them before the forward pass. `simulate` feeds requests in when the clock passes their arrival
(jumping the clock forward when the engine is idle), steps the core, and records per request the arrival, each
token's time and the preemptions, and per step the KV pool's state. By default requests run with ignore_eos
and max_tokens = their true output length, so lengths are exact. A request may instead carry a larger client
`max_tokens` (what reserve-max reserves): then the runner samples EOS as its true-length-th token, as a model
would. Everything is in simulated seconds.

Torch-free and loadgen-free; the CLI and the report live in engine/simulate_cli.py.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from engine.batch import ModelOutput, ScheduledRequest, SchedulerOutput
from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.cost_model import CostModel, StepShape
from engine.protocol import AddRequest, SamplingParams
from engine.request import Request
from engine.scheduler import Scheduler

EOS_TOKEN_ID = 0
SAMPLED_TOKEN_ID = 1  # what every simulated step samples: never EOS, never a synthetic prompt id
SYNTHETIC_ID_BASE = (
    1000  # request i's synthetic prompt is [1000 + i] * n: distinct blocks, no false prefix hits
)


class VirtualClock:
    """Simulated seconds since the run started. The scheduler reads it (queue times); only the runner (one step
    at a time) and the driver (idle jumps to the next arrival) move it, and only forward."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"the clock cannot go back ({seconds} s)")
        self.now += seconds

    def jump_to(self, time_s: float) -> None:
        self.now = max(self.now, time_s)


class SimulatedRunner:
    """The core's `Runner` with no model: a step costs `cost_model.step_seconds` of virtual time, plus
    `swap_seconds_per_block` per block swapped out or in. `num_host_blocks` and `swap_seconds_per_block` are what
    build_scheduler reads to give the scheduler a swap space, as from the real runner (there: measured)."""

    model_name = "simulated"
    device = "simulated"
    eos_token_ids = (EOS_TOKEN_ID,)

    def __init__(
        self,
        cost_model: CostModel,
        clock: VirtualClock,
        num_kv_blocks: int,
        max_model_len: int,
        num_host_blocks: int = 0,
        swap_seconds_per_block: float = 0.0,
    ) -> None:
        self.cost_model = cost_model
        self.clock = clock
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = max_model_len
        self.eos_after: dict[str, int] = {}  # request id -> its true length: that output token is EOS
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.last_shape = StepShape(0, 0, 0)
        self.last_seconds = 0.0
        self.num_host_blocks = num_host_blocks
        self.swap_seconds_per_block = swap_seconds_per_block  # one block, one direction
        self.num_blocks_swapped_out = 0
        self.num_blocks_swapped_in = 0

    def execute(self, output: SchedulerOutput) -> ModelOutput:
        self.last_shape = StepShape.of(output)
        num_copies = len(output.swap_out) + len(output.swap_in)
        seconds = self.cost_model.step_seconds(self.last_shape) + num_copies * self.swap_seconds_per_block
        self.num_blocks_swapped_out += len(output.swap_out)
        self.num_blocks_swapped_in += len(output.swap_in)
        self.last_seconds = seconds
        self.clock.advance(seconds)
        self.num_steps += 1
        self.busy_seconds += seconds
        sampled = {item.request_id: self._token(item) for item in output.scheduled if item.needs_sample}
        return ModelOutput(sampled, seconds)

    def _token(self, item: ScheduledRequest) -> int:
        is_last = item.num_generated + 1 >= self.eos_after.get(item.request_id, 0) > 0
        return EOS_TOKEN_ID if is_last else SAMPLED_TOKEN_ID


@dataclass(frozen=True)
class SimRequest:
    """One request to replay. `after` set: it arrives `arrival_s` after request `after` finished (closed loop,
    e.g. an agent's next call); else at `arrival_s`. `prompt_token_ids` None: distinct synthetic ids.
    `max_tokens` 0: the engine gets max_tokens = num_output_tokens and ignore_eos; larger: the engine gets that
    limit and the runner ends the request with EOS after num_output_tokens tokens."""

    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    tenant: str = "default"
    app_id: str = ""
    slo_class: str = "interactive"
    rl_mean: float = 0.0
    rl_q: float = 0.0
    prompt_token_ids: tuple[int, ...] | None = None
    after: int | None = None
    max_tokens: int = 0
    tenant_weight: float = 1.0  # the tenant's fair share (Justitia, VTC)


@dataclass
class RequestRecord:
    """What happened to one request, in simulated seconds since the run started."""

    index: int
    arrival_s: float
    token_times_s: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str = (
        ""  # "length" or "stop" (simulated EOS) when done, "error" if refused, "" if unfinished
    )
    error: str = ""

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def is_done(self) -> bool:
        return self.finish_reason in ("length", "stop")

    @property
    def finish_s(self) -> float | None:
        return self.token_times_s[-1] if self.is_done else None


@dataclass(frozen=True)
class StepRecord:
    """The engine right after one step. KV in tokens: `allocated` = used blocks × block size (a shared prefix
    block once), `written` = Σ computed tokens of running requests (a shared prefix once per request, so it can
    exceed `allocated`), `reserved` = the scheduler's KV ledger's total, when it has one (else None)."""

    end_s: float
    seconds: float
    prefill_tokens: int
    num_decode: int
    sum_context: int
    num_running: int
    num_waiting: int
    kv_allocated_tokens: int
    kv_written_tokens: int
    kv_reserved_tokens: int | None


@dataclass(frozen=True)
class SimConfig:
    """The simulated engine: the scheduler config it runs, its KV pool (0: the cost model's), and its host swap
    pool in blocks (0: eviction by recompute only; more needs a cost model that knows the host bandwidth)."""

    scheduler: SchedulerConfig = SchedulerConfig()
    num_kv_blocks: int = 0
    num_host_blocks: int = 0
    max_model_len: int = 0
    check_invariants: bool = False  # the scheduler's invariants after every step (tests)


@dataclass
class SimulationResult:
    config: SimConfig
    cost_model: CostModel
    num_kv_blocks: int
    requests: list[SimRequest]
    records: list[RequestRecord]
    steps: list[StepRecord]
    num_preemptions_total: int
    wall_seconds: float  # real time the replay took
    extra: dict[str, float] = field(default_factory=dict)  # EngineStats.extra at the end, + blocks copied
    rwt_pairs: list[tuple[float, float]] = field(default_factory=list)  # QLM: (estimated, actual) waits, s

    @property
    def end_s(self) -> float:
        return self.steps[-1].end_s if self.steps else 0.0


def kv_reserved_tokens(scheduler: Scheduler) -> int | None:
    """Tokens reserved in the scheduler's KV ledger (EcoServe exact allocation, reserve-max); None for policies
    whose ledger keeps no reservations (vllm)."""
    value = getattr(scheduler.ledger, "num_reserved_tokens", None)
    return value if isinstance(value, int) else None


def simulate(
    requests: list[SimRequest], cost_model: CostModel, config: SimConfig = SimConfig()
) -> SimulationResult:
    """Replay `requests` through EngineCore + the configured policy on a virtual clock (see the module doc)."""
    wall_start = time.perf_counter()
    num_blocks = config.num_kv_blocks or (
        cost_model.num_kv_blocks * cost_model.block_size // config.scheduler.block_size
    )
    if num_blocks <= 0:
        raise ValueError("no KV pool size: the cost model has none; give num_kv_blocks (--kv-blocks)")
    clock = VirtualClock()
    swap_s = cost_model.swap_seconds_per_block(config.scheduler.block_size)
    if config.num_host_blocks and swap_s is None:
        raise ValueError(f"cost model {cost_model.name} knows no host bandwidth: it cannot price a swap pool")
    runner = SimulatedRunner(
        cost_model,
        clock,
        num_blocks,
        config.max_model_len or cost_model.max_model_len,
        config.num_host_blocks,
        swap_s or 0.0,
    )
    scheduler = build_scheduler(EngineConfig(scheduler=config.scheduler), runner, clock=clock)
    core = EngineCore(scheduler, runner, config.check_invariants)
    arrivals = _Arrivals(requests)
    records = [RequestRecord(i, 0.0) for i in range(len(requests))]
    live: dict[str, Request] = {}
    steps: list[StepRecord] = []
    while arrivals.has_next() or core.has_work():
        if not core.has_work():
            clock.jump_to(arrivals.next_time())
        for index, arrival_s in arrivals.pop_until(clock.now):
            records[index].arrival_s = arrival_s
            core.add_request(_add_message(index, requests[index], arrival_s))
            if requests[index].max_tokens > requests[index].num_output_tokens:
                runner.eos_after[str(index)] = requests[index].num_output_tokens
            if (request := scheduler.requests.get(str(index))) is not None:
                live[str(index)] = request
        num_steps = runner.num_steps
        for delta in core.step():
            record = records[int(delta.request_id)]
            record.token_times_s.extend([clock.now] * len(delta.token_ids))
            if delta.finish_reason is None:
                continue
            record.finish_reason, record.error = delta.finish_reason.openai_name, delta.error
            if (request := live.pop(delta.request_id, None)) is not None:
                record.num_preemptions = request.num_preemptions
            runner.eos_after.pop(delta.request_id, None)
            arrivals.finished(int(delta.request_id), clock.now)
        if runner.num_steps == num_steps:  # nothing ran: only an arrival can unblock the scheduler
            if not arrivals.has_next():
                if core.has_work():
                    raise RuntimeError(f"scheduler stalled with {len(scheduler.waiting)} waiting requests")
                break
            clock.jump_to(arrivals.next_time())
            continue
        steps.append(_step_record(scheduler, runner, clock.now))
    return SimulationResult(
        config=config,
        cost_model=cost_model,
        num_kv_blocks=num_blocks,
        requests=requests,
        records=records,
        steps=steps,
        num_preemptions_total=scheduler.num_preemptions_total,
        wall_seconds=time.perf_counter() - wall_start,
        extra=core.stats().extra
        | {
            "blocks_swapped_out": runner.num_blocks_swapped_out,
            "blocks_swapped_in": runner.num_blocks_swapped_in,
        },
        rwt_pairs=list(getattr(scheduler.policy.slo, "estimate_log", ())),
    )


class _Arrivals:
    """Requests in arrival order: open-loop ones at their time, closed-loop ones once their predecessor is done."""

    def __init__(self, requests: list[SimRequest]) -> None:
        self.requests = requests
        self.heap = [(r.arrival_s, i) for i, r in enumerate(requests) if r.after is None]
        heapq.heapify(self.heap)
        self.dependents: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.after is not None:
                self.dependents.setdefault(r.after, []).append(i)

    def has_next(self) -> bool:
        return bool(self.heap)

    def next_time(self) -> float:
        return self.heap[0][0]

    def pop_until(self, now_s: float) -> list[tuple[int, float]]:
        out = []
        while self.heap and self.heap[0][0] <= now_s:
            arrival_s, index = heapq.heappop(self.heap)
            out.append((index, arrival_s))
        return out

    def finished(self, index: int, now_s: float) -> None:
        for dependent in self.dependents.pop(index, []):
            heapq.heappush(self.heap, (now_s + self.requests[dependent].arrival_s, dependent))


def _add_message(index: int, r: SimRequest, arrival_s: float) -> AddRequest:
    prompt = r.prompt_token_ids or (SYNTHETIC_ID_BASE + index,) * r.num_prompt_tokens
    capped = r.max_tokens > r.num_output_tokens  # the runner's EOS ends it, not max_tokens
    sampling = SamplingParams(
        max_tokens=r.max_tokens if capped else r.num_output_tokens, temperature=0.0, ignore_eos=not capped
    )
    return AddRequest(
        request_id=str(index),
        prompt_token_ids=list(prompt),
        sampling=sampling,
        arrival_time=arrival_s,
        tenant=r.tenant,
        app_id=r.app_id,
        slo_class=r.slo_class,
        rl_mean=r.rl_mean,
        rl_q=r.rl_q,
        tenant_weight=r.tenant_weight,
    )


def _step_record(scheduler: Scheduler, runner: SimulatedRunner, end_s: float) -> StepRecord:
    shape = runner.last_shape
    blocks = scheduler.block_manager
    return StepRecord(
        end_s=end_s,
        seconds=runner.last_seconds,
        prefill_tokens=shape.prefill_tokens,
        num_decode=shape.num_decode,
        sum_context=shape.sum_context,
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        kv_allocated_tokens=blocks.num_used_blocks * blocks.block_size,
        kv_written_tokens=sum(r.num_computed_tokens for r in scheduler.running),
        kv_reserved_tokens=kv_reserved_tokens(scheduler),
    )
