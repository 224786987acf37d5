"""Scheduling policies: each is a composition of small objects the scheduler loop calls, never `if policy == ...`:

  - an `Ordering` (engine/ordering.py): the order of running and waiting requests;
  - a KV ledger (engine/kv_ledger.py): whether a waiting request may start, by its reservation;
  - a `VictimSelector` (engine/pressure.py): who gives KV back when a running request cannot get a block;
  - a `RequestObserver` (engine/ordering.py): told of arrivals, service and finishes, for orderings that keep
    accounts (Justitia's virtual time, VTC's counters); a no-op for the rest;
  - an `SloMonitor` (engine/qlm.py): QLM's violation check every tick, which marks requests urgent (an urgent
    request may evict lower-class running work); it also meters the steps. A no-op check for the rest;
  - `swaps`: whether a preempted request's KV may go to host memory when that is cheaper (engine/swap.py);
  - a `Balancer` (engine/balance.py): which replica group a new request joins when the engine has several
    (least loaded; QLM's RWT balancer for qlm);
  - a `ModelChoice` (engine/model_swap.py): with several models on a replica, whether a step stays on the resident
    model, drains it or swaps to another (FCFS by default; QLM's deadline-driven choice for qlm and kairos);
  - two rules of the admission loop: how many waiting requests may fail to fit before it stops
    (`admission_window`; 1 is vLLM's head-of-line blocking), and whether it admits in a step that preempted.

`POLICIES` maps `--policy` names to builders taking the frozen SchedulerConfig (DESIGN §4's table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.balance import Balancer, LeastLoaded, RwtBalancer
from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.fairness import JustitiaOrder, VtcCounters
from engine.kv_ledger import KVLedger, LedgerConfig, NoReservations
from engine.model_swap import FcfsModels, ModelChoice, QlmModels
from engine.ordering import (
    EcoServeOrder,
    EdfOrder,
    FairOrder,
    FcfsOrder,
    NoObserver,
    Ordering,
    QlmLpOrder,
    QlmOrder,
    RequestObserver,
    ShortestRemainingOrder,
    UrgentFirst,
)
from engine.pressure import (
    ClassVictim,
    FairVictim,
    LatestDeadlineVictim,
    LedgerVictim,
    LongestRemainingVictim,
    NewestVictim,
    VictimSelector,
)
from engine.qlm import NoSloMonitor, QlmMonitor, SloMonitor

LedgerFactory = Callable[[BlockManager, int], KVLedger | NoReservations]  # (blocks, max_model_len) -> ledger


@dataclass(frozen=True)
class SchedulingPolicy:
    name: str
    ordering: Ordering
    victims: VictimSelector
    make_ledger: LedgerFactory
    admission_window: int = 1
    admit_after_preemption: bool = False
    observer: RequestObserver = NoObserver()  # told of arrivals, service and finishes (Justitia, VTC)
    slo: SloMonitor = field(default_factory=NoSloMonitor)  # QLM's violation check; meters all steps
    swaps: bool = False  # preemption may swap KV to host memory (engine/swap.py) instead of recomputing
    balancer: Balancer = LeastLoaded()  # across replica groups (engine/replicas.py); one group: never asked
    # Several models on a replica: stay, drain or swap (engine/model_swap.py).
    models: ModelChoice = FcfsModels()


def _no_reservations(block_manager: BlockManager, max_model_len: int) -> NoReservations:
    return NoReservations()


def _ledger(config: SchedulerConfig, **overrides) -> LedgerFactory:
    ledger_config = LedgerConfig(
        reserve_fraction=config.kv_reserve_fraction,
        lending=config.ecoserve_lending,
        grouping=config.ecoserve_grouping,
        bucket_width=config.rl_bucket_width,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    ledger_config = LedgerConfig(**{**ledger_config.__dict__, **overrides})

    def make(block_manager: BlockManager, max_model_len: int) -> KVLedger:
        return KVLedger(block_manager.num_blocks, block_manager.block_size, max_model_len, ledger_config)

    return make


def vllm(config: SchedulerConfig) -> SchedulingPolicy:
    """vLLM V1: FCFS (preempted first); running before waiting; a waiting request is admitted only if its whole
    remaining prompt fits now (`scheduler_reserve_full_isl`), and the head blocks the rest; no admission in a
    step that preempted; the victim is the newest running request, by recompute."""
    return SchedulingPolicy("vllm", FcfsOrder(), NewestVictim(), _no_reservations)


def reserve_max(config: SchedulerConfig) -> SchedulingPolicy:
    """Orca / TGI: reserve prompt + max_tokens at admission, FCFS with head-of-line blocking. The flat sum of
    reservations never passes the pool, so a running request always finds its block: it never preempts."""
    make_ledger = _ledger(config, reserve_fraction=0.0, lending=False, grouping=False, reserve_max=True)
    return SchedulingPolicy("reserve-max", FcfsOrder(), LedgerVictim(), make_ledger)


def ecoserve(config: SchedulerConfig) -> SchedulingPolicy:
    """EcoServe-inspired (papers.md §1.4): GT queue before PT queue in its KV-aware order, exact allocation of
    prompt + bucket(rl_q) with a global reserve, KVC pipelining, GT groups per predicted finish window;
    non-blocking admission within a window. Ablations: the ecoserve_* config switches."""
    ordering = EcoServeOrder() if config.ecoserve_ordering else FcfsOrder()
    return SchedulingPolicy(
        "ecoserve", ordering, LedgerVictim(), _ledger(config), admission_window=config.admission_window
    )


def sjf_oracle(config: SchedulerConfig) -> SchedulingPolicy:
    """Shortest true remaining length first (max_tokens − generated: exact only for ignore_eos requests), the
    victim the longest remaining; vLLM's memory model otherwise. An upper bound for ablations."""
    return SchedulingPolicy(
        "sjf-oracle", ShortestRemainingOrder(), LongestRemainingVictim(), _no_reservations
    )


def justitia(config: SchedulerConfig) -> SchedulingPolicy:
    """Justitia (papers.md §3.4, engine/fairness.py): apps in the order of their virtual finish tag, the head app's
    requests first and the next apps back-filling within the admission window (work-conserving); vLLM's memory
    model (no reservations, whole-prompt admission), so against `vllm` and `vtc` only the order differs; the
    victim is the request the fair order ranks last. The KV capacity M reaches the virtual time through
    `on_capacity` when the scheduler knows its pool (the 1-token value here never meets a request)."""
    fair = JustitiaOrder(
        kv_capacity_tokens=1.0,
        iteration_seconds=config.fair_iteration_s,
        idle_timeout=config.app_idle_timeout,
    )
    ordering = FairOrder(fair, iteration_seconds=config.fair_iteration_s)
    return SchedulingPolicy(
        "justitia",
        ordering,
        FairVictim(ordering),
        _no_reservations,
        admission_window=config.admission_window,
        observer=ordering,
    )


def vtc(config: SchedulerConfig) -> SchedulingPolicy:
    """VTC (OSDI'24): the tenant with the smallest counter of served tokens (1·input + 2·output, divided by the
    tenant's weight) goes first, newcomers lifted to the active minimum; as VTC's Alg. 2 on vLLM, admission stops
    at the first request that does not fit; vLLM's memory model; the victim is the largest counter's newest."""
    ordering = FairOrder(VtcCounters())
    return SchedulingPolicy("vtc", ordering, FairVictim(ordering), _no_reservations, observer=ordering)


def edf(config: SchedulerConfig) -> SchedulingPolicy:
    """Earliest deadline first (QLM's baseline, papers.md §4.5): waiting requests by their next deadline; vLLM's
    memory model and head-of-line blocking; the victim the running request with the latest deadline, recomputed."""
    return SchedulingPolicy("edf", EdfOrder(), LatestDeadlineVictim(), _no_reservations)


def qlm(config: SchedulerConfig) -> SchedulingPolicy:
    """QLM (papers.md §4, engine/qlm.py): FCFS until the RWT estimator, checked every `qlm_tick_s`, predicts a
    group will miss its deadline; then urgent groups first, earliest deadline first, and an urgent request that
    cannot be admitted evicts lower-class running requests (lowest class, most KV, longest remaining), swapping
    their KV to host memory or recomputing it, whichever is cheaper. Across replicas, a new request joins its
    group's replica or goes to the least estimated wait (engine/balance.py). vLLM's memory model otherwise."""
    monitor = QlmMonitor(config.qlm_tick_s, config.qlm_quantile)
    return SchedulingPolicy(
        "qlm",
        QlmOrder(monitor),
        ClassVictim(),
        _no_reservations,
        slo=monitor,
        swaps=True,
        balancer=RwtBalancer(config.qlm_quantile),
        models=QlmModels(),
    )


def qlm_lp(config: SchedulerConfig) -> SchedulingPolicy:
    """qlm with QLM's LP reorder (papers.md §4.3 "lp", engine/qlm_lp.py): when a group is found urgent, the order of
    the virtual queue's groups that minimizes their summed start times with every group starting by its deadline,
    solved exactly (HiGHS) for up to 8 groups; EDF over the urgent groups when larger or infeasible."""
    monitor = QlmMonitor(config.qlm_tick_s, config.qlm_quantile, reorder="lp")
    return dataclasses.replace(qlm(config), name="qlm-lp", ordering=QlmLpOrder(monitor), slo=monitor)


def kairos(config: SchedulerConfig) -> SchedulingPolicy:
    """The composition (DESIGN §4), each part an existing object:

      - ordering: QLM's urgent groups first, earliest deadline first (`QlmOrder.urgent_first` of the QLM
        monitor), in front of Justitia's fair order (`UrgentFirst`); while no deadline is at risk the order is
        Justitia's alone, and running requests always keep the fair order;
      - ledger: EcoServe's exact allocation of prompt + bucket(rl_q) with a global reserve, KVC lending and GT
        groups (`_ledger(config)`, the ecoserve_* switches apply), non-blocking admission within the window;
      - victims: `LedgerVictim` (the pressure ladder after stop-admitting, lending and the reserve): a request
        running past its reservation first, then a borrower, then batch class before interactive, the newest
        admission among equals; the lender never. The same selector picks who an urgent request evicts (the
        scheduler offers it only lower-class running requests);
      - observer: the fair order (Justitia's virtual time sees capacity, arrivals, service, finishes);
      - slo: the QLM monitor (violation check every `qlm_tick_s`, step meter); swaps as qlm: an evicted
        request's KV goes to host memory when that is cheaper than recomputing it;
      - balancer: least-loaded across replica groups, not QLM's RWT balancer: in the 2-replica simulation
        (docs/results/qlm.md, "Load balancing") QLM's join-the-group rule cost 26-47 points of interactive
        attainment against least-loaded, and no RWT variant beat it by more than noise; `qlm` keeps the RWT rule;
      - models: QLM's deadline-driven model swaps, as qlm (engine/model_swap.py).

    Left out: EcoServe's own GT/PT ordering (Justitia's order replaces it) and KunServe's drop, which lives in
    the replica layer (engine/kunserve.py, engine/replicas.py), not in a single scheduler's policy."""
    monitor = QlmMonitor(config.qlm_tick_s, config.qlm_quantile)
    fair = JustitiaOrder(
        kv_capacity_tokens=1.0,
        iteration_seconds=config.fair_iteration_s,
        idle_timeout=config.app_idle_timeout,
    )
    fair_order = FairOrder(fair, iteration_seconds=config.fair_iteration_s)
    return SchedulingPolicy(
        "kairos",
        UrgentFirst(QlmOrder(monitor).urgent_first, fair_order),
        LedgerVictim(),
        _ledger(config),
        admission_window=config.admission_window,
        observer=fair_order,
        slo=monitor,
        swaps=True,
        balancer=LeastLoaded(),
        models=QlmModels(),
    )


POLICIES: dict[str, Callable[[SchedulerConfig], SchedulingPolicy]] = {
    "vllm": vllm,
    "reserve-max": reserve_max,
    "ecoserve": ecoserve,
    "sjf-oracle": sjf_oracle,
    "justitia": justitia,
    "vtc": vtc,
    "edf": edf,
    "qlm": qlm,
    "qlm-lp": qlm_lp,
    "kairos": kairos,
}


def make_policy(name: str, config: SchedulerConfig | None = None) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](config or SchedulerConfig(policy=name))
