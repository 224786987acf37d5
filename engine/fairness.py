"""Fair shares across applications and tenants: Justitia's virtual-time fair queuing, and the VTC baseline.

Torch-free objects the scheduler calls with an explicit `now` (the engine may run on a virtual clock):
`on_arrival(request, now)`, `on_progress(request, new_prompt_tokens, new_output_tokens, now)`,
`on_finish(request, now)` and `order(waiting, now) -> list`. Nothing here allocates KV or builds batches; the
order is a preference that the scheduler's admission (KV ledger, token budget) fills as far as it can.

    request cost    c(p, d) = p·d + d²/2   KV token-time: the KV footprint p+t summed over d decode steps
    app cost        C_a = Σ c over the app's requests; Ĉ_a its prediction (predictor/app_cost.py, else a sum)
    Justitia        apps in the order of their finish in a fluid fair-sharing reference (WFQ virtual time)
    VTC             per-tenant counters of served tokens (1·input + 2·output); the smallest goes first
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from engine.request import Request

logger = logging.getLogger(__name__)


def request_cost(num_prompt_tokens: float, num_output_tokens: float) -> float:
    """Justitia's memory-centric cost of one request, in token·iterations: the KV it holds (p + t tokens at decode
    step t) summed over its d decode steps, p·d + d(d+1)/2 ≈ p·d + d²/2. Prefill adds nothing (β = 0): memory,
    not compute, is what a request takes from the others (reference/papers.md §3.4)."""
    return num_prompt_tokens * num_output_tokens + num_output_tokens * num_output_tokens / 2.0


def predicted_request_cost(request: Request) -> float:
    """c(p, r̂) with r̂ the request's predicted median length (rl_mean), else its max_tokens (the worst case)."""
    length = request.rl_mean if request.rl_mean > 0 else float(request.sampling.max_tokens)
    return request_cost(request.num_prompt_tokens, length)


def parse_tenant_weights(text: str) -> dict[str, float]:
    """`tenantA=2,tenantB=1` → {"tenantA": 2.0, "tenantB": 1.0}; tenants not named weigh 1. ValueError on a bad
    entry (a missing `=`, a repeated tenant, a weight that is not a positive finite number)."""
    weights: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"tenant weight {entry!r} is not NAME=WEIGHT")
        if name in weights:
            raise ValueError(f"tenant {name!r} is given twice")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"tenant {name!r}: weight {value.strip()!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"tenant {name!r}: weight must be a positive number, got {value.strip()!r}")
        weights[name] = weight
    return weights


# ---- the fluid reference ---------------------------------------------------------------------------------


class VirtualTime:
    """WFQ virtual time V(t) of a fluid GPS server that shares `service_rate` (KV token-time per unit of `now`:
    M tokens of KV capacity / seconds per iteration) among the flows it still owes service, in proportion to
    their weights: dV/dt = R / Σ_{backlogged} w. A flow is backlogged in the reference while V < its finish tag
    F; it leaves when V reaches F, which raises the others' rate. V is piecewise linear and is advanced lazily,
    event by event (each reference departure is a breakpoint), never by a periodic tick.

    V is in cost per unit weight: a flow of weight w that is backlogged over [t1, t2] receives w·(V(t2) − V(t1))
    of service in the reference. When nothing is backlogged V stands still.
    """

    def __init__(self, service_rate: float) -> None:
        if not service_rate > 0:
            raise ValueError(f"service_rate must be positive, got {service_rate}")
        self.service_rate = service_rate
        self.value = 0.0
        self.last_time: float | None = None
        self._backlog: dict[Hashable, tuple[float, float]] = {}  # flow -> (finish tag, weight)
        self._heap: list[tuple[float, int, Hashable]] = []  # (finish tag, seq, flow); stale entries skipped
        self._seq = itertools.count()
        self._total_weight = 0.0

    def set_service_rate(self, service_rate: float, now: float) -> None:
        """A new capacity (DESIGN §5.1 C6: after a KunServe drop or restore M changes); V so far is kept."""
        self.advance(now)
        self.service_rate = service_rate

    def advance(self, now: float) -> float:
        """Move V to `now` through every reference departure on the way; returns V(now). Time never goes back."""
        if self.last_time is None:
            self.last_time = now
        if now <= self.last_time:
            return self.value
        while self._backlog:
            finish, flow = self._head()
            to_departure = (finish - self.value) * self._total_weight / self.service_rate
            if self.last_time + to_departure > now:
                break
            self.last_time += to_departure
            self.value = finish
            self._remove(flow)
        if self._backlog:
            self.value += (now - self.last_time) * self.service_rate / self._total_weight
        self.last_time = now
        return self.value

    def set_finish(self, flow: Hashable, finish: float, weight: float, now: float) -> None:
        """Flow is owed service until V reaches `finish` (a later tag replaces an earlier one)."""
        self.advance(now)
        if flow in self._backlog:
            self._remove(flow)
        if finish <= self.value:
            return
        self._backlog[flow] = (finish, weight)
        self._total_weight += weight
        heapq.heappush(self._heap, (finish, next(self._seq), flow))

    def is_backlogged(self, flow: Hashable) -> bool:
        return flow in self._backlog

    @property
    def num_backlogged(self) -> int:
        return len(self._backlog)

    def _head(self) -> tuple[float, Hashable]:
        while True:
            finish, _, flow = self._heap[0]
            if self._backlog.get(flow, (None,))[0] == finish:
                return finish, flow
            heapq.heappop(self._heap)

    def _remove(self, flow: Hashable) -> None:
        del self._backlog[flow]
        # Re-summed rather than decremented, so rounding never leaves a positive weight with nothing backlogged.
        self._total_weight = sum(w for _, w in self._backlog.values())


# ---- applications ----------------------------------------------------------------------------------------


@dataclass
class AppState:
    """One active application: its tags in the fluid reference, predicted and actual cost, and what is in flight."""

    app_id: str
    tenant: str
    weight: float
    first_arrival: float
    predicted_cost: float  # Ĉ_a, KV token-time; grows by re-prediction
    initial_cost: float  # Ĉ_a at arrival: the least a re-prediction adds
    start_tag: float  # S_a of the current segment
    finish_tag: float  # F_a: the app's place in the order
    actual_cost: float = 0.0
    num_requests: int = 0
    num_unfinished: int = 0
    last_event: float = 0.0  # the last arrival or finish: the idle clock starts here
    num_repredictions: int = 0
    has_app_prediction: bool = False  # Ĉ came from the app-level model (else: a running sum of requests)
    num_declared_requests: int = 0  # metadata.app_num_requests of its first request; 0 = undeclared

    @property
    def is_overrun(self) -> bool:
        return self.actual_cost > self.predicted_cost


@dataclass
class _RequestTally:
    app_id: str
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    predicted_cost: float = 0.0


class AppRegistry:
    """The active applications, their costs and their virtual-time tags (Justitia §3.4, WFQ bookkeeping).

    An app is active from its first request until its last request finishes and it then stays idle for
    `idle_timeout` (units of `now`): an agent that thinks between calls keeps its place. Tags follow WFQ:

        arrival (new or returning app)   S_a = max(V(now), F_a_prev)     F_a = S_a + Ĉ_a / w_a
        re-prediction (actual > Ĉ_a)     S_a = max(V(now), F_a)          F_a = S_a + ΔĈ_a / w_a

    F_a_prev is the finish tag the app id left with; it is remembered after retirement until V passes it, so an
    app cannot gain by leaving and coming back. A re-prediction opens a new segment from max(V, F): an app that
    overran gets no credit for the time the reference already spent on it. Ĉ_a at arrival is the app-level
    prediction the server attached (AddRequest.app_cost); without one it is the sum of the per-request
    predictions c(p, rl_mean), times the declared number of requests, growing as unforeseen requests arrive.
    On overrun Ĉ_a becomes actual + max(predicted remainder of its unfinished requests, Ĉ_a at arrival): each
    re-prediction adds at least the first estimate, so an app re-predicts at most C_a / Ĉ_a(arrival) times.
    """

    def __init__(self, virtual_time: VirtualTime, idle_timeout: float = 5.0) -> None:
        self.virtual_time = virtual_time
        self.idle_timeout = idle_timeout
        self.apps: dict[str, AppState] = {}
        self._past_finish: dict[str, float] = {}  # retired app id -> its last F, while V < F
        self._requests: dict[str, _RequestTally] = {}

    # ---- events -------------------------------------------------------------------------------------------

    def on_arrival(self, request: Request, now: float) -> AppState:
        self.expire(now)
        v_now = self.virtual_time.advance(now)
        tally = _RequestTally(request.app_id, predicted_cost=predicted_request_cost(request))
        self._requests[request.request_id] = tally
        app = self.apps.get(request.app_id)
        if app is None:
            app = self._open(request, tally.predicted_cost, v_now, now)
        elif not app.has_app_prediction and app.num_requests >= max(app.num_declared_requests, 1):
            # More requests than declared: their cost is new demand.
            self._extend(app, tally.predicted_cost, now)
        app.num_requests += 1
        app.num_unfinished += 1
        app.last_event = now
        return app

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None:
        """Service since the last call: prompt tokens prefilled for the first time (a recompute is not new
        service) and output tokens sampled. The app's actual cost grows by c(p', d') − c(p, d)."""
        tally = self._requests.get(request.request_id)
        if tally is None or (app := self.apps.get(tally.app_id)) is None:
            return
        before = request_cost(tally.num_prompt_tokens, tally.num_output_tokens)
        tally.num_prompt_tokens += new_prompt_tokens
        tally.num_output_tokens += new_output_tokens
        app.actual_cost += request_cost(tally.num_prompt_tokens, tally.num_output_tokens) - before
        if app.is_overrun:
            self._repredict(app, now)

    def on_finish(self, request: Request, now: float) -> None:
        tally = self._requests.pop(request.request_id, None)
        if tally is None or (app := self.apps.get(tally.app_id)) is None:
            return
        app.num_unfinished -= 1
        app.last_event = now

    def expire(self, now: float) -> list[str]:
        """Retire apps idle for `idle_timeout`; returns their ids. Their finish tags are kept while they matter."""
        v_now = self.virtual_time.advance(now)
        retired = [
            a.app_id
            for a in self.apps.values()
            if a.num_unfinished == 0 and now - a.last_event >= self.idle_timeout
        ]
        for app_id in retired:
            app = self.apps.pop(app_id)
            if app.finish_tag > v_now:
                self._past_finish[app_id] = app.finish_tag
        if self._past_finish:
            self._past_finish = {k: f for k, f in self._past_finish.items() if f > v_now}
        return retired

    # ---- tags ---------------------------------------------------------------------------------------------

    def _open(self, request: Request, request_cost_: float, v_now: float, now: float) -> AppState:
        has_app_prediction = request.app_cost > 0
        cost = request.app_cost if has_app_prediction else request_cost_ * max(request.app_num_requests, 1)
        cost = max(cost, 1.0)  # a zero-cost app would tie every other app at its start tag
        weight = request.tenant_weight if request.tenant_weight > 0 else 1.0
        start = max(v_now, self._past_finish.pop(request.app_id, 0.0))
        app = AppState(
            app_id=request.app_id,
            tenant=request.tenant,
            weight=weight,
            first_arrival=now,
            predicted_cost=cost,
            initial_cost=cost,
            start_tag=start,
            finish_tag=start + cost / weight,
            has_app_prediction=has_app_prediction,
            num_declared_requests=request.app_num_requests,
        )
        self.apps[app.app_id] = app
        self.virtual_time.set_finish(app.app_id, app.finish_tag, weight, now)
        return app

    def _extend(self, app: AppState, added_cost: float, now: float) -> None:
        """Ĉ_a grows by `added_cost` as a new segment: S = max(V, F), F = S + ΔĈ / w."""
        app.predicted_cost += added_cost
        app.start_tag = max(self.virtual_time.advance(now), app.finish_tag)
        app.finish_tag = app.start_tag + added_cost / app.weight
        self.virtual_time.set_finish(app.app_id, app.finish_tag, app.weight, now)

    def _repredict(self, app: AppState, now: float) -> None:
        remainder = sum(
            max(t.predicted_cost - request_cost(t.num_prompt_tokens, t.num_output_tokens), 0.0)
            for t in self._requests.values()
            if t.app_id == app.app_id
        )
        new_cost = app.actual_cost + max(remainder, app.initial_cost)
        app.num_repredictions += 1
        logger.debug(
            "app %s overran %.0f (actual %.0f): re-predicted %.0f",
            app.app_id,
            app.predicted_cost,
            app.actual_cost,
            new_cost,
        )
        self._extend(app, new_cost - app.predicted_cost, now)


# ---- Justitia ------------------------------------------------------------------------------------------


class JustitiaOrder:
    """Justitia's order: "saturated serving in fair completion order" (arXiv 2510.17015, reconstructed in
    reference/papers.md §3.4). Apps go by virtual finish tag F_a (ties: earlier arrival); all of the head app's
    ready requests come first, then the next app's, and so on: the head app may take every free slot, and what
    it cannot use is back-filled by the next apps (work-conserving). Inside an app, requests keep arrival order.

    Delay bound (the PGPS bound of Parekh & Gallager 1993, Thm 1, with an app as the flow and a request as the
    non-preemptive unit): let R = M / t_iter be the KV service rate (M tokens of KV capacity, t_iter seconds per
    engine step), c_max = max over requests of p·d + d²/2, and T_a^GPS the time at which the fluid reference
    (`VirtualTime`, all apps sharing R by weight) finishes app a. If a's requests are all ready at its arrival,
    its cost is predicted exactly and the engine serves at rate R, then a finishes by

        T_a ≤ T_a^GPS + c_max / R + t_iter

    whatever the other apps do: a request of a later-tagged app that is already running when a arrives (at most
    c_max of service) and the step in progress are the only things served ahead of a out of F order. With
    prediction error the bound holds against the reference built from the predicted costs; re-prediction keeps
    an under-predicted app from holding the head beyond Ĉ_a plus one request. Between two apps that stay
    backlogged across re-predictions (segments of at most Δ_a of predicted cost each) the normalized service
    difference obeys the WFQ fairness bound |W_i/w_i − W_j/w_j| ≤ Δ_i/w_i + Δ_j/w_j + c_max·(1/w_i + 1/w_j).
    """

    name = "justitia"

    def __init__(
        self, kv_capacity_tokens: float, iteration_seconds: float, idle_timeout: float = 5.0
    ) -> None:
        self.iteration_seconds = iteration_seconds
        self.virtual_time = VirtualTime(kv_capacity_tokens / iteration_seconds)
        self.registry = AppRegistry(self.virtual_time, idle_timeout)

    def set_capacity(self, kv_capacity_tokens: float, iteration_seconds: float, now: float) -> None:
        self.iteration_seconds = iteration_seconds
        self.virtual_time.set_service_rate(kv_capacity_tokens / iteration_seconds, now)

    def on_arrival(self, request: Request, now: float) -> None:
        self.registry.on_arrival(request, now)

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None:
        self.registry.on_progress(request, new_prompt_tokens, new_output_tokens, now)

    def on_finish(self, request: Request, now: float) -> None:
        self.registry.on_finish(request, now)

    def app_key(self, app_id: str) -> tuple[float, float, str]:
        """The ordering key of an app: (F_a, first arrival, id); an unknown app goes last."""
        app = self.registry.apps.get(app_id)
        if app is None:
            return (math.inf, math.inf, app_id)
        return (app.finish_tag, app.first_arrival, app_id)

    def order(self, waiting: Iterable[Request], now: float) -> list[Request]:
        """The head app's ready requests first, then the next app's (apps by F_a, requests by arrival)."""
        self.virtual_time.advance(now)
        return sorted(waiting, key=lambda r: (*self.app_key(r.app_id), r.arrival_time, r.request_id))

    def head_app(self, waiting: Iterable[Request], now: float) -> str | None:
        """The app that is served saturated now (the smallest F among apps with a ready request)."""
        ordered = self.order(waiting, now)
        return ordered[0].app_id if ordered else None


# ---- VTC -----------------------------------------------------------------------------------------------


class VtcCounters:
    """Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24, Alg. 2).

    Each tenant u has a counter c_u of the service it received, weighted: c_u += (w_in·input + w_out·output) / w_u
    with w_in = 1, w_out = 2 (the paper's setting). Input tokens are charged when they are prefilled, output
    tokens as they are sampled. The tenant with the smallest counter is served first; within a tenant, FCFS.
    A tenant that arrives with nothing waiting (new, or back from idle) is lifted to the smallest counter among
    tenants with waiting requests, or, when none waits, to the counter of the last tenant that stopped waiting,
    so that idling never banks credit. "Waiting" is arrived and not yet started (no prefill yet): after a
    request's first progress it counts as served.
    """

    name = "vtc"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = {}
        self._num_waiting: dict[str, int] = defaultdict(int)  # tenant -> requests arrived, not started
        self._waiting_ids: set[str] = set()
        self._last_left: str | None = None  # the last tenant whose waiting count fell to zero

    def on_arrival(self, request: Request, now: float) -> None:
        tenant = request.tenant
        self.weights[tenant] = request.tenant_weight if request.tenant_weight > 0 else 1.0
        if self._num_waiting[tenant] == 0:
            self._lift(tenant)
        self._num_waiting[tenant] += 1
        self._waiting_ids.add(request.request_id)

    def on_progress(
        self, request: Request, new_prompt_tokens: int, new_output_tokens: int, now: float
    ) -> None:
        self._leave_waiting(request)
        served = self.input_weight * new_prompt_tokens + self.output_weight * new_output_tokens
        self.counters[request.tenant] += served / self.weights.get(request.tenant, 1.0)

    def on_finish(self, request: Request, now: float) -> None:
        self._leave_waiting(request)  # aborted before it started

    def order(self, waiting: Iterable[Request], now: float) -> list[Request]:
        """Admission as VTC does it: pick the tenant with the smallest counter, take its oldest request, charge
        that request's prompt to a tentative copy of the counter, pick again. Interleaves tenants fairly within
        one step instead of handing the whole queue to the smallest counter."""
        queues: dict[str, deque[Request]] = defaultdict(deque)
        for request in sorted(waiting, key=lambda r: (r.arrival_time, r.request_id)):
            queues[request.tenant].append(request)
        heap = [(self.counters[t], q[0].arrival_time, t) for t, q in queues.items()]
        heapq.heapify(heap)
        ordered: list[Request] = []
        while heap:
            counter, _, tenant = heapq.heappop(heap)
            request = queues[tenant].popleft()
            ordered.append(request)
            if queues[tenant]:
                counter += self.input_weight * request.num_prompt_tokens / self.weights.get(tenant, 1.0)
                heapq.heappush(heap, (counter, queues[tenant][0].arrival_time, tenant))
        return ordered

    def _lift(self, tenant: str) -> None:
        waiting = [self.counters[t] for t, n in self._num_waiting.items() if n > 0 and t != tenant]
        if waiting:
            floor = min(waiting)
        elif self._last_left is not None and self._last_left != tenant:
            floor = self.counters[self._last_left]
        else:
            return
        self.counters[tenant] = max(self.counters[tenant], floor)

    def _leave_waiting(self, request: Request) -> None:
        if request.request_id not in self._waiting_ids:
            return
        self._waiting_ids.discard(request.request_id)
        self._num_waiting[request.tenant] -= 1
        if self._num_waiting[request.tenant] == 0:
            self._last_left = request.tenant
