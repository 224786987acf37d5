"""Scheduling policies: small objects the scheduler loop calls, never `if policy == ...` inside the loop.

A policy answers four questions each step:
  - in which order to try the waiting requests            (`waiting_order`)
  - whether a waiting request may be admitted now          (`can_admit`)
  - which running request to preempt when KV runs out      (`select_victim`)
  - whether to admit at all in a step that preempted       (`admit_after_preemption`), and whether a request that
    cannot be admitted blocks the ones behind it           (`blocking_admission`)

The later papers (EcoServe, Justitia, QLM, KunServe) add policies here and in small objects beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


class SchedulingPolicy(Protocol):
    name: str
    admit_after_preemption: bool
    blocking_admission: bool

    def waiting_order(self, waiting: list[Request]) -> Iterable[Request]: ...

    def can_admit(
        self,
        request: Request,
        num_new_tokens: int,
        computed_block_ids: list[int],
        block_manager: BlockManager,
    ) -> bool: ...

    def select_victim(self, candidates: list[Request]) -> Request: ...


class VllmPolicy:
    """vLLM V1's rules: FCFS (preempted requests first, as vLLM prepends them to the waiting queue); running
    requests are scheduled before waiting ones; a waiting request is admitted only if its whole remaining prompt
    fits (`scheduler_reserve_full_isl`), and the head of the queue blocks the rest; no admission in a step that
    preempted; the victim is the newest running request, preempted by recompute."""

    name = "vllm"
    admit_after_preemption = False
    blocking_admission = True

    def waiting_order(self, waiting: list[Request]) -> Iterable[Request]:
        return sorted(waiting, key=lambda r: (r.status != RequestStatus.PREEMPTED, r.arrival_time))

    def can_admit(
        self,
        request: Request,
        num_new_tokens: int,
        computed_block_ids: list[int],
        block_manager: BlockManager,
    ) -> bool:
        return block_manager.can_allocate(request, num_new_tokens, computed_block_ids)

    def select_victim(self, candidates: list[Request]) -> Request:
        return candidates[-1]


POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    "vllm": VllmPolicy,
}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]()
