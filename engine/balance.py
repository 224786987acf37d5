"""Dispatch across replica groups (engine/replicas.py): which group's scheduler a new request joins. Torch-free.

A balancer is a part of the scheduling policy (`SchedulingPolicy.balancer`, engine/policy.py); the replica engine
asks the first group's policy, since every group runs the same one. A KunServe pipeline group is one scheduler, so
it counts as one replica here.

    LeastLoaded   fewest requests held, then most free KV blocks (every policy but qlm and kairos)
    RwtBalancer   QLM's load balancing (papers.md §4.2: one virtual queue per replica; a new request joins its
                  request group where that group already waits, else the group goes to the replica with the least
                  estimated waiting time). The public code places a new group on a random queue (§4.3 defect 5).

RwtBalancer's estimate for replica r is the newcomer's own wait in r's virtual queue (engine/qlm.py, the same CLT
bound the violation check uses): r's waiting requests plus the newcomer grouped FCFS, the running requests' remaining
work as group 0, tokens ahead at r's measured Θ_r, plus the swap-ins ahead. A replica that could admit the newcomer
now (nothing waiting, a free seat, free blocks for its prompt) estimates 0. Θ_r unknown (no step timed yet): the mean
of the replicas that know theirs; none known: the estimate is only the swap-ins, and ties go to the least loaded.

A request joins its group's replica unless the estimate there passes its class's first deadline (TTFT, else
end-to-end) while another replica's does not: then it starts a new group there (a split). Without the split, a
burst of one group piles onto one replica while another idles; QLM itself has no such rule (its groups are the
unit of placement and never move, papers.md §4.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.qlm import RwtEstimator, form_groups, group_key, length_moments, running_group
from engine.request import Request

if TYPE_CHECKING:
    from engine.scheduler import Scheduler


@dataclass(frozen=True)
class Placement:
    index: int  # into the schedulers passed to `place`
    reason: str  # "least_loaded" | "least_wait" | "joined" | "split"
    waits: tuple[float, ...] = ()  # RwtBalancer: estimated seconds before the newcomer starts, per scheduler


class Balancer(Protocol):
    def place(self, request: Request, schedulers: list[Scheduler]) -> Placement: ...


def load_key(scheduler: Scheduler) -> tuple[int, int]:
    """Smaller = less loaded: requests held, then fewer free blocks."""
    return len(scheduler.waiting) + len(scheduler.running), -scheduler.block_manager.num_free_blocks


class LeastLoaded:
    def place(self, request: Request, schedulers: list[Scheduler]) -> Placement:
        return Placement(min(range(len(schedulers)), key=lambda i: load_key(schedulers[i])), "least_loaded")


class RwtBalancer:
    """QLM's load balancing by the RWT estimate (module docstring)."""

    def __init__(self, quantile: float = 0.99, join_groups: bool = True, shared_theta: bool = False) -> None:
        self.estimator = RwtEstimator(quantile)
        # Ablations (engine/balance_experiment.py): never join a group's replica (least estimated wait only); price
        # every replica at the mean measured Θ (a busier replica runs bigger batches and measures a higher Θ).
        self.join_groups = join_groups
        self.shared_theta = shared_theta

    def place(self, request: Request, schedulers: list[Scheduler]) -> Placement:
        schedulers[0].resolve_model(request)  # "" = the first model, as the waiting requests were named
        waits = tuple(self.waits(request, schedulers))
        best = min(range(len(schedulers)), key=lambda i: (waits[i], load_key(schedulers[i])))
        key = group_key(request)
        joined = [i for i, s in enumerate(schedulers) if any(group_key(r) == key for r in s.waiting)]
        if not joined or not self.join_groups:
            return Placement(best, "least_wait", waits)
        home = min(joined, key=lambda i: waits[i])
        slack = schedulers[home].slo_targets.get(request.slo_class, request.slo).tightness
        if waits[home] > slack >= waits[best]:
            return Placement(best, "split", waits)
        return Placement(home, "joined", waits)

    def waits(self, request: Request, schedulers: list[Scheduler]) -> list[float]:
        """Estimated seconds before `request` would start on each scheduler (module docstring)."""
        known = [t for s in schedulers if (t := s.policy.slo.meter.tokens_per_s.value)]
        mean = sum(known) / len(known) if known else None
        if self.shared_theta:
            return [self.wait(request, s, mean) for s in schedulers]
        return [self.wait(request, s, s.policy.slo.meter.tokens_per_s.value or mean) for s in schedulers]

    def wait(self, request: Request, scheduler: Scheduler, tokens_per_s: float | None) -> float:
        s, blocks = scheduler, scheduler.block_manager
        if (
            not s.waiting
            and len(s.running) < s.config.max_num_seqs
            and blocks.num_free_blocks >= blocks.num_blocks_for(request.num_tokens)
        ):
            return 0.0
        queue = form_groups(
            sorted(s.waiting, key=lambda r: r.queued_time) + [request], s.swap_space.seconds_per_block
        )
        waits = self.estimator.waits(queue, tokens_per_s, running_group(s.running))
        (k, group) = next((k, g) for k, g in enumerate(queue) if request in g.requests)
        ahead = sum(length_moments(r)[0] for r in group.requests[: group.requests.index(request)])
        return waits[k] + (ahead / tokens_per_s if tokens_per_s else 0.0)
