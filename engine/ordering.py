"""Orderings: in which order the scheduler serves running requests and tries waiting ones. One small object per
rule; the scheduler loop calls `running_order` and `waiting_order` and never asks which rule it holds.

- `FcfsOrder`: vLLM V1 (preempted first, then arrival; running in admission order).
- `EcoServeOrder`: separate GT and PT queues; requests that hold (or held) KV go first, ordered SLO-urgent first,
  then more KV, then shorter predicted remaining length; PTs after them, urgent first, then by arrival.
- `ShortestRemainingOrder`: shortest *true* remaining length first (sjf-oracle).
- `EdfOrder`: earliest deadline first (QLM's baseline); `QlmOrder`: QLM's urgent groups first, earliest deadline
  first, then a base order (engine/qlm.py decides who is urgent, every tick).
- `FairOrder`: Justitia's or VTC's order (engine/fairness.py); it is also the policy's `RequestObserver`, the
  hooks through which the scheduler reports arrivals, service and finishes (`NoObserver` for everyone else).
- `UrgentFirst`: a rule's urgent requests in front of another ordering (QLM before Justitia, when composed).
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Protocol

from engine.request import Request, RequestStatus


class Ordering(Protocol):
    def running_order(self, running: list[Request]) -> list[Request]: ...

    def waiting_order(self, waiting: list[Request]) -> list[Request]: ...


def predicted_remaining(request: Request) -> float:
    """Output tokens the request is still predicted to produce (rl_q, the reserved quantile); max_tokens when
    untagged. Never negative: an overrun request is 'about to finish' as far as the prediction knows."""
    predicted = request.rl_q if request.rl_q > 0 else request.sampling.max_tokens
    return max(predicted - request.num_output_tokens, 0.0)


def true_remaining(request: Request) -> int:
    """The true remaining length of an `ignore_eos` request (it stops at max_tokens); for any other request
    max_tokens is only an upper bound, which is why sjf-oracle needs ignore_eos workloads."""
    return request.sampling.max_tokens - request.num_output_tokens


class FcfsOrder:
    """vLLM V1: preempted requests first (vLLM prepends them to the waiting queue), then by arrival; running
    requests keep admission order, so the newest is last (the recompute victim)."""

    def running_order(self, running: list[Request]) -> list[Request]:
        return running

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.status != RequestStatus.PREEMPTED, r.arrival_time))


class SloUrgency(Protocol):
    """Who is at risk of missing a deadline now: QLM's violation check (engine/qlm.py `QlmMonitor`)."""

    def is_urgent(self, request: Request) -> bool: ...


class EcoServeOrder:
    """EcoServe's Ordering (papers.md §1.4): among requests that hold KV (running GTs, and preempted GTs whose KV
    must be rebuilt) SLO-urgent first, then more KV held (to release KV earlier), then shorter predicted remaining
    length. The GT queue is served before the PT queue, so every step is filled with PTs after the GTs."""

    def __init__(self, urgency: SloUrgency | None = None) -> None:
        self.urgency = urgency

    def is_slo_urgent(self, request: Request) -> bool:
        """A request whose deadline is at risk, as QLM's RWT estimator sees it (the `urgency` given, composed
        with QLM); without one no request is urgent, and the order falls through to KV held and remaining length."""
        return self.urgency is not None and self.urgency.is_urgent(request)

    def _kv_key(self, request: Request) -> tuple[bool, int, float]:
        return (not self.is_slo_urgent(request), -request.num_tokens, predicted_remaining(request))

    def running_order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=self._kv_key)

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        generation = [r for r in waiting if r.status == RequestStatus.PREEMPTED]  # GT queue
        prompt = [r for r in waiting if r.status != RequestStatus.PREEMPTED]  # PT queue
        generation.sort(key=self._kv_key)
        prompt.sort(key=attrgetter("arrival_time"))
        if urgent := [r for r in prompt if self.is_slo_urgent(r)]:
            prompt = urgent + [r for r in prompt if not self.is_slo_urgent(r)]
        return generation + prompt


class ShortestRemainingOrder:
    """Shortest true remaining length first, for running and waiting alike (an SRPT upper bound for ablations)."""

    def running_order(self, running: list[Request]) -> list[Request]:
        return sorted(running, key=true_remaining)

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: (true_remaining(r), r.arrival_time))


class EdfOrder:
    """Earliest deadline first (QLM's EDF baseline): waiting requests by their next deadline (engine/request.py),
    ties by arrival; running requests keep admission order."""

    def running_order(self, running: list[Request]) -> list[Request]:
        return running

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.next_deadline, r.queued_time))


class QlmOrder:
    """QLM (papers.md §4): the requests of groups the violation check found urgent go first, earliest deadline
    first; the rest keep `base`'s order (FCFS by default), so nothing is reordered while every deadline is safe."""

    def __init__(self, urgency: SloUrgency, base: Ordering | None = None) -> None:
        self.urgency = urgency
        self.base = base or FcfsOrder()

    def urgent_first(self, waiting: list[Request]) -> list[Request]:
        """The urgent requests of `waiting`, earliest deadline first."""
        urgent = [r for r in waiting if self.urgency.is_urgent(r)]
        return sorted(urgent, key=lambda r: (r.next_deadline, r.queued_time))

    def running_order(self, running: list[Request]) -> list[Request]:
        return self.base.running_order(running)

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        front = self.urgent_first(waiting)
        rest = [r for r in waiting if not self.urgency.is_urgent(r)]
        return front + self.base.waiting_order(rest)


class QlmLpOrder(QlmOrder):
    """QLM with its LP reorder (engine/qlm_lp.py): while the violation check holds a solved plan, the waiting
    requests go in the plan's group order (members FCFS), the rest after them in `base`'s order; without a plan
    (no violation, too many groups, infeasible) as QlmOrder: urgent groups first, earliest deadline first."""

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        if not (plan := self.urgency.plan):
            return super().waiting_order(waiting)
        planned = sorted(
            (r for r in waiting if r.request_id in plan), key=lambda r: (plan[r.request_id], r.queued_time)
        )
        rest = [r for r in waiting if r.request_id not in plan]
        return planned + self.base.waiting_order(rest)


# ---- orderings that keep accounts (Justitia, VTC) -----------------------------------------------------------


class RequestObserver(Protocol):
    """What the scheduler tells a policy about service, with the scheduler clock's `now` (virtual in the
    simulator). `on_capacity` comes once from the scheduler with the KV pool in tokens, and again whenever the
    pool changes (a KunServe drop or restore); `on_progress` reports prompt tokens prefilled for the first time
    (a recompute is not new service) and output tokens sampled in one step."""

    def on_capacity(self, kv_capacity_tokens: int, now: float) -> None: ...

    def on_arrival(self, request: Request, now: float) -> None: ...

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None: ...

    def on_finish(self, request: Request, now: float) -> None: ...


class NoObserver:
    """The observer of a policy that keeps no accounts: every hook is a no-op."""

    def on_capacity(self, kv_capacity_tokens: int, now: float) -> None:
        pass

    def on_arrival(self, request: Request, now: float) -> None:
        pass

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None:
        pass

    def on_finish(self, request: Request, now: float) -> None:
        pass


class FairOrder:
    """A fairness object of engine/fairness.py (`JustitiaOrder`, `VtcCounters`) as the scheduler's ordering and
    observer. Running and waiting requests both go in the fair object's order. For running ones that matters when
    KV runs out: a running request takes its next block before those after it, and the victim comes from those
    after it (`FairVictim`), so a back-filled request of a later app never preempts the head app's (in admission
    order it would, whenever it was admitted first). The keys (finish tags F_a, VTC counters) change only at
    events, so the time of the latest event is the `now` the order is taken at.

    `iteration_seconds` (Justitia only) turns the KV pool into the fluid reference's service rate M / t_iter."""

    def __init__(self, fair, iteration_seconds: float = 0.0) -> None:
        self.fair = fair
        self.iteration_seconds = iteration_seconds
        self.now = 0.0

    @property
    def name(self) -> str:
        return self.fair.name

    def running_order(self, running: list[Request]) -> list[Request]:
        return self.fair.order(running, self.now)

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        return self.fair.order(waiting, self.now)

    def _tick(self, now: float) -> float:
        self.now = max(self.now, now)
        return self.now

    def on_capacity(self, kv_capacity_tokens: int, now: float) -> None:
        # Justitia §3.4: V advances at M / Σw; VTC counts tokens and has no capacity.
        if (set_capacity := getattr(self.fair, "set_capacity", None)) is not None:
            set_capacity(kv_capacity_tokens, self.iteration_seconds, self._tick(now))

    def on_arrival(self, request: Request, now: float) -> None:
        self.fair.on_arrival(request, self._tick(now))

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None:
        self.fair.on_progress(request, new_prompt_tokens, new_output_tokens, self._tick(now))

    def on_finish(self, request: Request, now: float) -> None:
        self.fair.on_finish(request, self._tick(now))


class UrgentFirst:
    """Composition hook: requests `urgent` picks (in the order it returns them) go before the rest, which keep
    `base`'s order; running order and accounts are `base`'s. For the composed policy, QLM's urgent groups
    (earliest deadline first) in front of Justitia's fair order (DESIGN §4 step 2)."""

    def __init__(self, urgent: Callable[[list[Request]], list[Request]], base: Ordering) -> None:
        self.urgent = urgent
        self.base = base

    def running_order(self, running: list[Request]) -> list[Request]:
        return self.base.running_order(running)

    def waiting_order(self, waiting: list[Request]) -> list[Request]:
        front = self.urgent(waiting)
        picked = {id(r) for r in front}
        return front + [r for r in self.base.waiting_order(waiting) if id(r) not in picked]
