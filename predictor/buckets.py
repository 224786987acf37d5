"""Response-length buckets: EcoServe groups generation tasks by predicted RL bucket and reserves KV per bucket.

`BucketSpec("linear", 64)` rounds a prediction up to a multiple of 64 tokens (papers.md: bucket = ceil(r/W)·W);
`BucketSpec("pow2", 16)` rounds up to a power of two no smaller than 16 (coarse groups, e.g. QLM's group key).
A bucket is an upper bound: reserving `prompt + bucket(rl_q)` never reserves less than the prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKET_SCHEMES = ("linear", "pow2")


@dataclass(frozen=True)
class BucketSpec:
    scheme: str = "linear"
    width: int = 64  # linear: bucket width in tokens; pow2: the smallest bucket

    def __post_init__(self) -> None:
        if self.scheme not in BUCKET_SCHEMES:
            raise ValueError(f"bucket scheme must be one of {BUCKET_SCHEMES}, got {self.scheme!r}")
        if self.width < 1:
            raise ValueError(f"bucket width must be >= 1, got {self.width}")

    def bucket(self, num_tokens: float) -> int:
        """The bucket's upper edge (tokens) for a predicted length: the smallest edge >= num_tokens."""
        n = max(float(num_tokens), 1.0)
        if self.scheme == "linear":
            return int(math.ceil(n / self.width)) * self.width
        return max(self.width, 1 << int(math.ceil(math.log2(n))))

    def index(self, num_tokens: float) -> int:
        """0-based bucket number (handy as a group key)."""
        edge = self.bucket(num_tokens)
        if self.scheme == "linear":
            return edge // self.width - 1
        return int(math.log2(edge // self.width))

    @classmethod
    def parse(cls, text: str) -> BucketSpec:
        """'linear:64' | 'pow2:16' | '64' (linear)."""
        scheme, _, width = text.rpartition(":")
        return cls(scheme or "linear", int(width))
