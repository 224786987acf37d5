"""QLM (papers.md §4): request groups, a virtual queue, the request-waiting-time (RWT) estimator and the periodic
violation check that marks groups urgent. Torch-free; the scheduler calls `tick` and `observe_step`, the
orderings ask `is_urgent` (engine/ordering.py, engine/policy.py).

Groups: waiting requests keyed by (model, SLO class, coarse length bucket), in FCFS order of their oldest member;
that list is a scheduler's virtual queue (one per replica group; engine/balance.py places new requests on them).
The coarse bucket is log4 of the predicted output length (1-3, 4-15, 16-63, ... tokens), so a group's members have
lengths of one order of magnitude.

RWT of the group at position k (the CLT bound of papers.md §4.4, not the public code's `n · 100 / Θ`):

    W_k = (Σ_{j<k} Σ_{i∈g_j} μ_i  +  z_q · sqrt(Σ_{j<k} Σ_{i∈g_j} σ_i²)) / Θ  +  Σ_{j≤k} swap-in seconds of g_j
                                                                             (+ model load seconds, see below)

    with the running requests' remaining work as a group 0 ahead of everyone: in a continuous-batching engine
    the queue waits for running work too (QLM's pull model hides it inside vLLM's own queue). A request that can
    be admitted at once is, whatever its W; W matters only when the engine is full, when running work is ahead.

    μ_i     predicted remaining output tokens: rl_mean minus tokens already generated (max_tokens if untagged)
    σ_i     from the predictor's quantile gap: rl_q is the 0.9-quantile (DESIGN §3), so under a normal reading
            rl_q = μ + z_0.9·σ and σ = (rl_q − rl_mean) / 1.2816; untagged requests count σ = 0
    z_q     the estimator's quantile (default 0.99: z = 2.326)
    Θ       generated tokens per busy second, an EWMA over the scheduler's steps (on its clock: virtual in the
            simulator); before the first step nothing is known and W = 0 (no false alarms at start-up)

With several models on the replica (engine/model_swap.py), the queue is taken in the order it will be served, the
resident model's groups first, and each model change on the way adds that model's measured load time
(`add_model_loads`).

Violation check (every `tick_s` of scheduler clock): a group is urgent when `now + W_k` passes its earliest
member's next deadline (engine/request.py `next_deadline`). The public code ages only `request.slo` yet compares
`group.slo` (defect 2) and keys groups by the initial SLO (defect 6); here deadlines are absolute, so nothing needs
ageing and the check always sees the remaining slack. Urgent groups go first, earliest deadline first; the rest
keep the base order. Each request's estimated total wait (time already queued + W at its first check) is paired
with its actual wait at admission in a ring (`estimate_log`), because the estimator's accuracy is a result.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Protocol

from engine.request import Request

PREDICTOR_QUANTILE = 0.9  # the quantile rl_q is tagged at (DESIGN §3; predictor/)
_Z_PREDICTOR = NormalDist().inv_cdf(PREDICTOR_QUANTILE)  # 1.2816
ESTIMATE_LOG_SIZE = 4096


def length_moments(request: Request) -> tuple[float, float]:
    """(μ, σ²) of the request's remaining output tokens, from its predictor tags (see the module docstring)."""
    max_remaining = max(request.sampling.max_tokens - request.num_output_tokens, 1)
    if request.rl_mean <= 0:
        return float(max_remaining), 0.0
    mu = min(max(request.rl_mean - request.num_output_tokens, 1.0), max_remaining)
    sigma = max(request.rl_q - request.rl_mean, 0.0) / _Z_PREDICTOR
    return mu, sigma * sigma


def coarse_bucket(request: Request) -> int:
    mu, _ = length_moments(request)
    return int(math.log(max(mu, 1.0), 4))


@dataclass(frozen=True)
class GroupKey:
    model: str
    slo_class: str
    bucket: int


@dataclass
class RequestGroup:
    key: GroupKey
    requests: list[Request] = field(default_factory=list)
    sum_mu: float = 0.0  # Σ μ_i = n·μ for equal members
    sum_var: float = 0.0  # Σ σ_i² = n·σ²
    swap_in_s: float = 0.0  # seconds to bring its swapped-out members' KV back

    @property
    def deadline(self) -> float:
        return min(r.next_deadline for r in self.requests)


def group_key(request: Request) -> GroupKey:
    return GroupKey(request.model, request.slo_class, coarse_bucket(request))


def form_groups(waiting: list[Request], swap_seconds_per_block: float = 0.0) -> list[RequestGroup]:
    """The virtual queue: waiting requests grouped by GroupKey, groups in the order of their first member in
    `waiting` (pass it FCFS-sorted)."""
    groups: dict[GroupKey, RequestGroup] = {}
    for request in waiting:
        key = group_key(request)
        group = groups.setdefault(key, RequestGroup(key))
        mu, var = length_moments(request)
        group.requests.append(request)
        group.sum_mu += mu
        group.sum_var += var
        group.swap_in_s += len(request.host_block_ids) * swap_seconds_per_block
    return list(groups.values())


def running_group(running: list[Request]) -> RequestGroup:
    """The running requests' remaining work as one group: what every waiting group waits behind."""
    in_flight = RequestGroup(GroupKey("", "running", -1))
    for request in running:
        mu, var = length_moments(request)
        in_flight.sum_mu += mu
        in_flight.sum_var += var
    return in_flight


def add_model_loads(
    queue: list[RequestGroup], resident_model: str, load_seconds: dict[str, float]
) -> list[RequestGroup]:
    """The virtual queue in the order a replica with several models serves it (engine/model_swap.py): the resident
    model's groups first, then each other model's, in FCFS order of their first group; the first group of each
    other model carries that model's load time, so W_k includes every swap before group k (papers.md §4.4)."""
    rank = {resident_model: -1}
    for group in queue:
        rank.setdefault(group.key.model, len(rank))
    ordered = sorted(queue, key=lambda g: rank[g.key.model])
    loaded = {resident_model}
    for group in ordered:
        if group.key.model not in loaded:
            group.swap_in_s += load_seconds.get(group.key.model, 0.0)
            loaded.add(group.key.model)
    return ordered


class RwtEstimator:
    """W_k for every group of a virtual queue (module docstring), at quantile `quantile` of the CLT bound."""

    def __init__(self, quantile: float = 0.99) -> None:
        if not 0.5 <= quantile < 1.0:
            raise ValueError(f"RWT quantile must be in [0.5, 1), got {quantile}")
        self.z = NormalDist().inv_cdf(quantile)

    def waits(
        self, groups: list[RequestGroup], tokens_per_s: float | None, ahead: RequestGroup | None = None
    ) -> list[float]:
        """Seconds group k waits before it starts: the output tokens of the groups ahead (and of `ahead`, the
        running work) at Θ tokens/s, plus swap-ins up to and including its own. Θ unknown (None): only swap-ins."""
        waits = []
        sum_mu, sum_var, swap_s = (ahead.sum_mu, ahead.sum_var, 0.0) if ahead else (0.0, 0.0, 0.0)
        for group in groups:
            swap_s += group.swap_in_s
            tokens = sum_mu + self.z * math.sqrt(sum_var)
            waits.append((tokens / tokens_per_s if tokens_per_s else 0.0) + swap_s)
            sum_mu += group.sum_mu
            sum_var += group.sum_var
        return waits


class Ewma:
    """Exponentially weighted mean; None until the first sample."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


class StepMeter:
    """What the scheduler's steps measure: Θ (generated tokens per busy second) for the RWT estimator, and the
    seconds per prefill token that price a recompute for eviction (engine/swap.py). The latter is read from steps
    that are at least 90 % prefill tokens, so decode-bound steps (far dearer per token) do not inflate it."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.tokens_per_s = Ewma(alpha)
        self.seconds_per_prefill_token = Ewma(alpha)

    def observe(self, seconds: float, num_generated: int, num_prefill_tokens: int, num_tokens: int) -> None:
        if seconds <= 0 or num_tokens == 0:
            return  # a step that took no clock time (a manual test clock) tells nothing about speed
        self.tokens_per_s.add(num_generated / seconds)
        if num_prefill_tokens >= 0.9 * num_tokens:
            self.seconds_per_prefill_token.add(seconds / num_prefill_tokens)


class SloMonitor(Protocol):
    """What the scheduler calls each step, and what orderings and the evictor ask."""

    meter: StepMeter
    urgent_ids: set[str] | frozenset[str]  # requests found urgent at the last tick

    def tick(
        self,
        now: float,
        waiting: list[Request],
        running: list[Request],
        swap_seconds_per_block: float,
        resident_model: str = "",
        load_seconds: dict[str, float] | None = None,
    ) -> None: ...

    def is_urgent(self, request: Request) -> bool: ...

    def gauges(self) -> dict[str, float]: ...


class NoSloMonitor:
    """No violation check (policies without QLM): nothing is ever urgent; the meter still measures."""

    def __init__(self) -> None:
        self.meter = StepMeter()
        self.urgent_ids: frozenset[str] = frozenset()

    def tick(
        self,
        now: float,
        waiting: list[Request],
        running: list[Request],
        swap_seconds_per_block: float,
        resident_model: str = "",
        load_seconds: dict[str, float] | None = None,
    ) -> None:
        pass

    def is_urgent(self, request: Request) -> bool:
        return False

    def gauges(self) -> dict[str, float]:
        return {}


class QlmMonitor:
    """The violation check every `tick_s`: virtual queue → RWT → urgent groups; logs estimates vs actual waits."""

    def __init__(self, tick_s: float = 0.1, quantile: float = 0.99, reorder: str = "edf") -> None:
        if reorder not in ("edf", "lp"):
            raise ValueError(f"QLM reorder must be 'edf' or 'lp', got {reorder!r}")
        self.tick_s = tick_s
        self.reorder = (
            reorder  # "lp": solve QLM's program when a group is urgent (engine/qlm_lp.py), else EDF
        )
        self.plan: dict[str, int] = {}  # request id -> position of its group in the LP's order ({}: no plan)
        self.num_lp_attempts_total = self.num_lp_fallbacks_total = 0
        self.estimator = RwtEstimator(quantile)
        self.meter = StepMeter()
        self.urgent_ids: set[str] = set()
        self.num_violations_total = 0  # groups found urgent, summed over ticks
        self.estimate_log: deque[tuple[float, float]] = deque(maxlen=ESTIMATE_LOG_SIZE)  # (estimate, actual)
        self._estimated: dict[str, tuple[Request, float]] = {}  # first estimate of each request still waiting
        self._last_tick = -math.inf

    def is_urgent(self, request: Request) -> bool:
        return request.request_id in self.urgent_ids

    def gauges(self) -> dict[str, float]:
        """For EngineStats.extra: urgency now, violations so far, Θ, and the estimator's accuracy over the ring
        (mean signed and absolute error of estimated minus actual wait, seconds)."""
        errors = [estimate - actual for estimate, actual in self.estimate_log]
        return {
            "qlm_urgent_requests": float(len(self.urgent_ids)),
            "qlm_violations_total": float(self.num_violations_total),
            "qlm_tokens_per_s": self.meter.tokens_per_s.value or 0.0,
            "qlm_rwt_pairs": float(len(errors)),
            "qlm_rwt_mean_error_s": sum(errors) / len(errors) if errors else 0.0,
            "qlm_rwt_mean_abs_error_s": sum(map(abs, errors)) / len(errors) if errors else 0.0,
        } | (
            {
                "qlm_lp_attempts_total": self.num_lp_attempts_total,
                "qlm_lp_fallbacks_total": self.num_lp_fallbacks_total,
            }
            if self.reorder == "lp"
            else {}
        )

    def tick(
        self,
        now: float,
        waiting: list[Request],
        running: list[Request],
        swap_seconds_per_block: float,
        resident_model: str = "",
        load_seconds: dict[str, float] | None = None,
    ) -> None:
        if now - self._last_tick < self.tick_s:
            return
        self._last_tick = now
        self._log_actual_waits()
        queue = form_groups(sorted(waiting, key=lambda r: r.queued_time), swap_seconds_per_block)
        if load_seconds:
            queue = add_model_loads(queue, resident_model, load_seconds)
        theta = self.meter.tokens_per_s.value
        in_flight = running_group(running)
        waits = self.estimator.waits(queue, theta, in_flight)
        urgent = [g for g, w in zip(queue, waits, strict=True) if now + w > g.deadline]
        self.num_violations_total += len(urgent)
        self.urgent_ids = {r.request_id for g in urgent for r in g.requests}
        order = self._lp_order(now, queue, in_flight, theta) if urgent and self.reorder == "lp" else None
        self.plan = {r.request_id: rank for rank, k in enumerate(order or ()) for r in queue[k].requests}
        # The order the requests will be served in: urgent groups first, earliest deadline first (papers.md §4.3
        # "edf" reorder), then the rest FCFS. Log each request's wait estimated on that order at first sight
        # with Θ measured (before the first step an estimate is a guess, and would only flatter or blame Θ).
        if theta is None:
            return
        urgent.sort(key=lambda g: g.deadline)
        final = urgent + [g for g in queue if g.requests[0].request_id not in self.urgent_ids]
        if order is not None:
            final = [queue[k] for k in order]
        for group, wait in zip(final, self.estimator.waits(final, theta, in_flight), strict=True):
            ahead_in_group = 0.0  # a group runs as a unit in QLM; a request's own wait also has its elders
            for r in group.requests:
                if r.request_id not in self._estimated and r.first_scheduled_time is None:
                    self._estimated[r.request_id] = (r, now - r.queued_time + wait + ahead_in_group / theta)
                ahead_in_group += length_moments(r)[0]

    def _lp_order(
        self, now: float, queue: list[RequestGroup], in_flight: RequestGroup, theta: float | None
    ) -> list[int] | None:
        """QLM's LP reorder of `queue` (engine/qlm_lp.py), or None: no Θ yet, too many groups, or infeasible (the
        caller keeps the EDF order of the urgent groups)."""
        if not theta:
            return None
        from engine.qlm_lp import lp_order  # scipy: imported only by the policy that uses it

        def seconds(group: RequestGroup) -> float:
            return (group.sum_mu + self.estimator.z * math.sqrt(group.sum_var)) / theta

        self.num_lp_attempts_total += 1
        costs = [seconds(g) + g.swap_in_s for g in queue]
        order = lp_order(costs, [g.deadline for g in queue], now + seconds(in_flight))
        self.num_lp_fallbacks_total += order is None
        return order

    def _log_actual_waits(self) -> None:
        for request_id, (request, estimate) in list(self._estimated.items()):
            if request.first_scheduled_time is not None:
                self.estimate_log.append((estimate, request.queue_seconds))
                del self._estimated[request_id]
            elif request.is_finished:  # aborted before admission: no actual wait
                del self._estimated[request_id]
