"""The fluid fair reference of experiment E3: when would each application have finished under ideal fair sharing?

Model (Justitia's, reference/papers.md §3.4, with a speed limit per request):
  - the server serves R units of KV token-time per second (R = M / t_iter: M tokens of KV, t_iter s per step);
  - request j of prompt p and d output tokens costs c_j = p·d + d²/2 and enters the reference at the time it was
    actually sent in the run (so an agent's next call keeps the run's timing);
  - a request cannot run faster than its own decode pace: at most c_j / (d_j·t_tok) per second, t_tok the time of
    one decode step of an unloaded engine;
  - active applications share R max-min fairly (water-filling, equal weights) under those caps; inside an app its
    requests share in proportion to their caps.
An app's reference completion is when its last request finishes in this fluid system. Its slowdown is
(actual completion − first send) / (reference completion − first send): 1 means it finished as late as ideal fair
sharing would have let it; below 1, earlier (a policy can beat the reference for some apps, never for all).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FluidRequest:
    app_id: str
    send_s: float
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def cost(self) -> float:
        return self.num_prompt_tokens * self.num_output_tokens + self.num_output_tokens**2 / 2.0


def water_fill(caps: dict[str, float], capacity: float) -> dict[str, float]:
    """Max-min fair rates: nobody above its cap, the rest split equally."""
    rates: dict[str, float] = {}
    left = capacity
    ordered = sorted(caps.items(), key=lambda kv: kv[1])
    for k, (name, cap) in enumerate(ordered):
        rates[name] = min(cap, left / (len(ordered) - k))
        left -= rates[name]
    return rates


def fluid_finish(requests: list[FluidRequest], service_rate: float, token_seconds: float) -> dict[str, float]:
    """Reference completion time (s, the run's clock) of every app: event-driven, exact for piecewise-constant
    rates (they change only when a request enters or leaves)."""
    pending = sorted(range(len(requests)), key=lambda i: requests[i].send_s)
    remaining: dict[int, float] = {}
    cap = {i: r.cost / (max(r.num_output_tokens, 1) * token_seconds) for i, r in enumerate(requests)}
    finish: dict[str, float] = {}
    now, next_arrival = 0.0, 0
    while next_arrival < len(pending) or remaining:
        while next_arrival < len(pending) and requests[pending[next_arrival]].send_s <= now:
            i = pending[next_arrival]
            remaining[i] = requests[i].cost
            next_arrival += 1
        if not remaining:
            now = requests[pending[next_arrival]].send_s
            continue
        app_caps: dict[str, float] = {}
        for i in remaining:
            app_caps[requests[i].app_id] = app_caps.get(requests[i].app_id, 0.0) + cap[i]
        app_rates = water_fill(app_caps, service_rate)
        rate = {i: app_rates[requests[i].app_id] * cap[i] / app_caps[requests[i].app_id] for i in remaining}
        step = min(remaining[i] / rate[i] for i in remaining)
        if next_arrival < len(pending):
            step = min(step, requests[pending[next_arrival]].send_s - now)
        now += step
        for i in list(remaining):
            remaining[i] -= rate[i] * step
            if remaining[i] <= 1e-9 * max(requests[i].cost, 1.0):
                del remaining[i]
                finish[requests[i].app_id] = max(finish.get(requests[i].app_id, 0.0), now)
    return finish
