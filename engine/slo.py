"""SLO classes: named latency targets (TTFT, TPOT, end-to-end) and the deadlines they give a request.

A class is chosen per request by the server (X-SLO-Class › `priority` naming a class › `service_tier` ›
"interactive", server/schema.py); its targets come from one table built at the edge from the defaults below and
`--slo NAME:ttft=S,tpot=S,e2e=S` overrides (a new NAME adds a class). A target left out is "none" (infinite).

Defaults (documented in README; QLM §4.5 uses TTFT p99 of 20 s interactive and 1 min / 1 h batch on 7B-70B GPU
serving; ours are tighter for interactive because a chat user waits at the screen):

    interactive   ttft = 2 s, tpot = 0.2 s      (a reader's pace: 5 tokens/s)
    batch         e2e  = 600 s                  (a 10-minute offline job)

Deadlines are on the scheduler's clock and count from engine intake (`Request.queued_time`), so the few
milliseconds between the HTTP arrival and intake are not charged. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INF = math.inf


@dataclass(frozen=True)
class SloTarget:
    """Latency targets in seconds; INF = no target of that kind."""

    ttft_s: float = INF
    tpot_s: float = INF
    e2e_s: float = INF

    @property
    def tightness(self) -> float:
        """The class's most urgent promise, in seconds: what 'lower class' means when choosing eviction victims
        (a larger value is a more relaxed, lower class)."""
        return min(self.ttft_s, self.e2e_s)


DEFAULT_SLO_TARGETS: dict[str, SloTarget] = {
    "interactive": SloTarget(ttft_s=2.0, tpot_s=0.2),
    "batch": SloTarget(e2e_s=600.0),
}

_KEYS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s"}


def parse_slo_spec(spec: str) -> tuple[str, SloTarget]:
    """'interactive:ttft=2,tpot=0.2' -> ("interactive", SloTarget(2, 0.2, INF)). Raises ValueError on a bad
    name, key or value. Keys: ttft, tpot, e2e (seconds, > 0)."""
    name, sep, body = spec.partition(":")
    name = name.strip().lower()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad --slo {spec!r}; expected NAME:ttft=S,tpot=S,e2e=S (e.g. batch:e2e=600)")
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in _KEYS:
            raise ValueError(f"bad --slo key {key!r} in {spec!r}; use ttft, tpot or e2e")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"bad --slo value {value!r} in {spec!r}; expected seconds") from None
        if not seconds > 0:
            raise ValueError(f"--slo {key} must be positive seconds, got {value!r}")
        values[_KEYS[key.strip()]] = seconds
    if not values:
        raise ValueError(f"--slo {spec!r} sets no target")
    return name, SloTarget(**values)


def build_slo_table(specs: tuple[str, ...] = ()) -> dict[str, SloTarget]:
    """The defaults with each spec applied in order. A spec for an existing class replaces only the keys it
    names (`--slo interactive:ttft=1` keeps tpot=0.2); a new name adds a class."""
    table = dict(DEFAULT_SLO_TARGETS)
    for spec in specs:
        name, target = parse_slo_spec(spec)
        if (old := table.get(name)) is not None:
            named = {k: v for k, v in target.__dict__.items() if v != INF}
            target = SloTarget(**{**old.__dict__, **named})
        table[name] = target
    return table
