"""Orderings: in which order the scheduler serves running requests and tries waiting ones. One small object per
rule; the scheduler loop calls `running_order` and `waiting_order` and never asks which rule it holds.

- `FcfsOrder`: vLLM V1 (preempted first, then arrival; running in admission order).
- `EcoServeOrder`: separate GT and PT queues; requests that hold (or held) KV go first, ordered SLO-urgent first,
  then more KV, then shorter predicted remaining length; PTs after them, urgent first, then by arrival.
- `ShortestRemainingOrder`: shortest *true* remaining length first (sjf-oracle).
"""

from __future__ import annotations

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


class EcoServeOrder:
    """EcoServe's Ordering (papers.md §1.4): among requests that hold KV (running GTs, and preempted GTs whose KV
    must be rebuilt) SLO-urgent first, then more KV held (to release KV earlier), then shorter predicted remaining
    length. The GT queue is served before the PT queue, so every step is filled with PTs after the GTs."""

    def is_slo_urgent(self, request: Request) -> bool:
        """An interactive request whose deadline is at risk. QLM's RWT estimator (issue 8) decides that; until
        it exists no request is urgent, and the order falls through to KV held and remaining length."""
        return False

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
