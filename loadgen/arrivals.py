"""Arrival processes: send-time offsets (s since the run starts) for a number of requests.

- all at once: every offset 0 (`vllm bench serve --request-rate inf`);
- gamma at a rate with burstiness k: gaps ~ Gamma(shape=k, scale=1/(k·rate)), so the mean gap is 1/rate and the
  gaps' coefficient of variation is 1/sqrt(k) (k = 1 is Poisson; k < 1 burstier), as `vllm bench serve`;
- renewal with a Weibull or Gamma shape (ServeGen's per-client fits), rescaled to a given mean rate;
- trace replay: recorded timestamps minus the first, times `time_scale` (> 1 stretches, < 1 compresses).
The first request of a generated process is sent at offset 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DISTRIBUTIONS = ("gamma", "weibull")


def all_at_once(num: int) -> list[float]:
    return [0.0] * num


def gamma(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Offsets of a gamma renewal process: mean gap 1/rate s, CV 1/sqrt(burstiness)."""
    if num <= 0:
        return []
    return _offsets(renewal_gaps(num - 1, rate, "gamma", burstiness, rng))


def poisson(num: int, rate: float, rng: np.random.Generator) -> list[float]:
    return gamma(num, rate, 1.0, rng)


def schedule(num: int, rate: float | None, burstiness: float, rng: np.random.Generator) -> list[float]:
    """`rate` None or inf: all at once; else gamma arrivals at `rate` req/s."""
    if rate is None or math.isinf(rate):
        return all_at_once(num)
    return gamma(num, rate, burstiness, rng)


def replay(timestamps_s: Sequence[float], time_scale: float = 1.0) -> list[float]:
    """Recorded send times, made relative to the first and multiplied by `time_scale`."""
    if not timestamps_s:
        return []
    t0 = min(timestamps_s)
    return [(t - t0) * time_scale for t in timestamps_s]


def renewal_gaps(num: int, rate: float, dist: str, shape: float, rng: np.random.Generator) -> np.ndarray:
    """`num` gaps (s) with mean exactly 1/rate in expectation and the given distribution shape.

    ServeGen fits Gamma(a) and Weibull(c) to each client's gaps; only the shape is kept here and the scale is
    set from the rate, so a rescaled rate keeps the client's burstiness.
    """
    if rate <= 0 or shape <= 0:
        raise ValueError(f"rate and shape must be > 0, got rate={rate}, shape={shape}")
    if dist == "gamma":
        return rng.gamma(shape, 1.0 / (shape * rate), size=num)
    if dist == "weibull":
        mean_unit = math.gamma(1.0 + 1.0 / shape)  # mean of Weibull(c, scale=1)
        return rng.weibull(shape, size=num) / (mean_unit * rate)
    raise ValueError(f"unknown inter-arrival distribution {dist!r}; expected one of {DISTRIBUTIONS}")


def _offsets(gaps: np.ndarray) -> list[float]:
    return [0.0, *np.cumsum(gaps).tolist()]
