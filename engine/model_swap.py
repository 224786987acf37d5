"""QLM model swapping (papers.md §4.2: a swap is an LSO the scheduler decides, its cost in the RWT estimate): which
model a replica serves this step. Torch-free; the runner does the loading (engine/runner.py `load_model`).

Several models share one replica: one model's weights are resident on the device, the others wait in host memory
(on CPU both are the same RAM: there a swap is a copy of the weights within RAM, not a transfer). Every model must
have one architecture and shape (fine-tuned variants of one base, QLM's multi-model case), so the KV pool keeps its
layout across a swap; a request's KV is only ever read under the model that wrote it (prefix-cache hashes include
the model, engine/scheduler.py). The public code swaps by killing vLLM and restarting it (§4.3); here a swap is one
step of the scheduler:

    STAY    serve the resident model: only its waiting requests are admitted
    DRAIN   admit nothing; the resident model's running requests go on until they finish
    SWAP    preempt the resident model's running requests (KV to host or recompute, as any preemption,
            engine/swap.py), load the target model's weights before this step's forward pass, admit its requests

A `ModelChoice` of the policy (`SchedulingPolicy.models`) decides, from the head of the waiting order:

    FcfsModels   (every policy but qlm and kairos) the head needs another model: DRAIN while anything runs, then SWAP
    QlmModels    the head needs another model and the violation check found it urgent (its wait, with the load time,
                 passes its deadline): SWAP, evicting the running requests if all are of a lower class than the
                 head, else DRAIN. Not urgent: STAY while the resident model has work, then SWAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.request import Request

if TYPE_CHECKING:
    from engine.scheduler import Scheduler

STAY, DRAIN, SWAP = "stay", "drain", "swap"


@dataclass(frozen=True)
class ModelDecision:
    action: str  # STAY | DRAIN | SWAP
    model: str = ""  # SWAP: the model to load


class ModelChoice(Protocol):
    def decide(self, scheduler: Scheduler) -> ModelDecision: ...


def head_request(scheduler: Scheduler) -> Request | None:
    """The first waiting request in the policy's order (the one a single-model engine would admit next)."""
    order = scheduler.policy.ordering.waiting_order(scheduler.waiting)
    return order[0] if order else None


class FcfsModels:
    def decide(self, scheduler: Scheduler) -> ModelDecision:
        head = head_request(scheduler)
        if head is None or head.model == scheduler.resident_model:
            return ModelDecision(STAY)
        return ModelDecision(DRAIN) if scheduler.running else ModelDecision(SWAP, head.model)


class QlmModels:
    def decide(self, scheduler: Scheduler) -> ModelDecision:
        head = head_request(scheduler)
        if head is None or head.model == scheduler.resident_model:
            return ModelDecision(STAY)
        if scheduler.policy.slo.is_urgent(head):
            if all(r.slo.tightness > head.slo.tightness for r in scheduler.running):
                return ModelDecision(SWAP, head.model)
            return ModelDecision(DRAIN)
        resident = scheduler.resident_model
        if scheduler.running or any(r.model == resident for r in scheduler.waiting):
            return ModelDecision(STAY)
        return ModelDecision(SWAP, head.model)
