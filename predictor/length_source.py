"""Where a request's response-length tags come from: the predictor, or the truth (E1's oracle ablations).

    predictor      rl_mean / rl_q as the length predictor tagged them (the default)
    oracle         the true length: an `ignore_eos` request generates exactly max_tokens tokens, so
                   rl_mean = rl_q = max_tokens. Other requests stop at EOS, whose position nobody knows in
                   advance: they keep the predictor's tags. Oracle runs therefore need ignore_eos workloads.
    oracle-noise   the true length times exp(N(0, sigma)) (multiplicative lognormal), at least 1 token; the noise
                   is a function of (seed, prompt, max_tokens), so a replayed workload gets the same noise whatever
                   the arrival interleaving.

Pure Python (no numpy): the server imports it on every request.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_SOURCES = ("predictor", "oracle", "oracle-noise")


@dataclass(frozen=True)
class LengthSource:
    kind: str = "predictor"
    noise_sigma: float = 0.0  # oracle-noise: sigma of the lognormal factor
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_SOURCES:
            raise ValueError(f"length source must be one of {LENGTH_SOURCES}, got {self.kind!r}")
        if self.noise_sigma < 0:
            raise ValueError(f"length noise sigma must be >= 0, got {self.noise_sigma}")

    def lengths(
        self, rl_mean: float, rl_q: float, max_tokens: int, ignore_eos: bool, prompt_ids: Sequence[int]
    ) -> tuple[float, float]:
        """(rl_mean, rl_q) to send to the engine."""
        if self.kind == "predictor" or not ignore_eos:
            return rl_mean, rl_q
        if self.kind == "oracle":
            return float(max_tokens), float(max_tokens)
        noisy = max(
            1.0, max_tokens * math.exp(self._rng(max_tokens, prompt_ids).gauss(0.0, self.noise_sigma))
        )
        return noisy, noisy

    def _rng(self, max_tokens: int, prompt_ids: Sequence[int]) -> random.Random:
        key = zlib.crc32(b",".join(str(t).encode() for t in (self.seed, max_tokens, *prompt_ids)))
        return random.Random(key)
