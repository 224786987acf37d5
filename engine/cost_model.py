"""The simulator's cost model: one engine step takes `a + b·prefill_tokens + c·num_decode + d·Σcontext` seconds.

    prefill_tokens   tokens of the step's prefill chunks (scheduled items of more than one token, as the runner
                     splits them), recompute after preemption included
    num_decode       scheduled items of exactly one token
    Σcontext         Σ over scheduled items of start_position + num_tokens (tokens attended, i.e. KV read)

An optional fifth term `e·prefill_pairs` (causal query-key pairs of the prefill chunks: n·start + n(n+1)/2 per
chunk) models prefill attention, which grows with the square of a long prompt; the four-term form cannot (on
CPU it under-predicts a lone 2048-token prefill by half). It is 0 unless a calibration fitted it.

Coefficients come from `kairos simulate calibrate` (a least-squares fit to the real ModelRunner, engine/calibrate.py)
or from a preset. Presets are ASSUMPTIONS derived from data-sheet numbers, never measurements; they say so in
`source`. Numpy only: no torch here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.batch import SchedulerOutput

FEATURES = ("a_s", "b_s_per_prefill_token", "c_s_per_decode", "d_s_per_context_token", "e_s_per_prefill_pair")


@dataclass(frozen=True)
class StepShape:
    """What the cost model reads off one step."""

    prefill_tokens: int
    num_decode: int
    sum_context: int
    prefill_pairs: int = 0

    @classmethod
    def of(cls, output: SchedulerOutput) -> StepShape:
        prefill = num_decode = context = pairs = 0
        for item in output.scheduled:
            n = len(item.token_ids)
            if n > 1:
                prefill += n
                pairs += n * item.start_position + n * (n + 1) // 2
            else:
                num_decode += 1
            context += item.start_position + n
        return cls(prefill, num_decode, context, pairs)

    def row(self) -> tuple[float, ...]:
        return (
            1.0,
            float(self.prefill_tokens),
            float(self.num_decode),
            float(self.sum_context),
            float(self.prefill_pairs),
        )


@dataclass(frozen=True)
class CostModel:
    """Seconds per step as a linear function of the step's shape, plus the pool it was measured (or assumed) with."""

    a_s: float
    b_s_per_prefill_token: float
    c_s_per_decode: float
    d_s_per_context_token: float
    e_s_per_prefill_pair: float = 0.0
    name: str = "custom"
    source: str = "measured"  # "measured" or "ASSUMPTION: ..." for presets
    num_kv_blocks: int = 0  # the pool of the engine it describes (0: unknown; the CLI then needs --kv-blocks)
    block_size: int = 16
    max_model_len: int = 8192
    info: dict[str, Any] = field(default_factory=dict)  # calibration command, machine, date, fit errors
    # Host swap pool (QLM eviction): KV bytes per token and device<->host bandwidth; 0 = unknown (no swapping).
    kv_bytes_per_token: int = 0
    host_bytes_per_s: float = 0.0

    def step_seconds(self, shape: StepShape) -> float:
        return (
            self.a_s
            + self.b_s_per_prefill_token * shape.prefill_tokens
            + self.c_s_per_decode * shape.num_decode
            + self.d_s_per_context_token * shape.sum_context
            + self.e_s_per_prefill_pair * shape.prefill_pairs
        )

    def swap_seconds_per_block(self, block_size: int) -> float | None:
        """Seconds to copy one KV block one way between device and host (bytes / host bandwidth), as the real
        runner measures at start-up (engine/runner.py); None when the model knows no bandwidth."""
        if self.kv_bytes_per_token <= 0 or self.host_bytes_per_s <= 0:
            return None
        return self.kv_bytes_per_token * block_size / self.host_bytes_per_s

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in FEATURES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        return cls(**data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")

    @classmethod
    def load(cls, spec: str) -> CostModel:
        """A preset name (PRESETS) or a JSON file written by `kairos simulate calibrate`."""
        if spec in PRESETS:
            return PRESETS[spec]
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"cost model {spec!r}: not a preset ({', '.join(PRESETS)}) and not a file")
        return cls.from_dict(orjson.loads(path.read_bytes()))


# ---- fitting ------------------------------------------------------------------------------------------------


def fit_nonnegative(
    shapes: Sequence[StepShape], seconds: Sequence[float], relative: bool = True, num_terms: int = 4
) -> np.ndarray:
    """Non-negative least squares for (a, b, c, d), or (a, b, c, d, e) with num_terms=5; returns all five
    (unfitted ones 0). With `relative`, each row is divided by its measured time, so
    the fit minimizes relative error: steps range from milliseconds to a second, and an absolute fit would let
    the big prefills decide everything while a 10 ms decode step is off by 50 %.

    At most five unknowns: try every support (2^5 subsets), solve ordinary least squares on it, keep the feasible
    one with the least residual. The NNLS optimum is the OLS solution on its own support, so this is exact."""
    if num_terms not in (4, 5):
        raise ValueError(f"num_terms is 4 or 5, got {num_terms}")
    x = np.array([s.row()[:num_terms] for s in shapes], dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(y) != len(x) or len(y) < 4:
        raise ValueError(f"need at least 4 (shape, seconds) pairs of equal count, got {len(x)} and {len(y)}")
    if relative:
        x, y = x / y[:, None], np.ones_like(y)
    best, best_residual = np.zeros(len(FEATURES)), float(np.sum(y**2))
    for k in range(1, num_terms + 1):
        for support in itertools.combinations(range(num_terms), k):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((x[:, cols] @ coef - y) ** 2))
            if residual < best_residual:
                best = np.zeros(len(FEATURES))
                best[cols] = coef
                best_residual = residual
    return best


def fit_errors(model: CostModel, shapes: Sequence[StepShape], seconds: Sequence[float]) -> dict[str, float]:
    """R², median and p90 |predicted − measured| / measured on the given points (held-out ones, for honesty)."""
    y = np.asarray(seconds, dtype=np.float64)
    pred = np.array([model.step_seconds(s) for s in shapes])
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    rel = np.abs(pred - y) / y
    return {
        "num_points": len(y),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "median_rel_error": float(np.median(rel)),
        "p90_rel_error": float(np.percentile(rel, 90)),
        "max_rel_error": float(rel.max()),
    }


# ---- presets (assumptions) ----------------------------------------------------------------------------------


def h100_llama3_8b() -> CostModel:
    """ASSUMPTION, not a measurement: an H100-SXM-class GPU serving Llama-3-8B in bf16, from data-sheet rooflines.

    Facts used (public): Llama-3-8B has 8.03e9 parameters → 16.06 GB of bf16 weights; 32 layers, 8 KV heads of
    dim 128, so KV = 32 · 8 · 128 · 2 (K and V) · 2 bytes = 131,072 B = 128 KiB per token. H100 SXM: 3.35 TB/s
    HBM3, 989 TFLOP/s dense bf16, 80 GiB.

    a = weights / bandwidth = 16.06e9 / 3.35e12              = 4.79 ms  (every step streams the weights once)
    b = 2 · 8.03e9 FLOP per token / 989e12 FLOP/s            = 16.2 µs per prefill token (dense matmuls)
    c = the same matmul FLOPs for a decode token             = 16.2 µs per decode request
    d = KV bytes per token / bandwidth = 131072 / 3.35e12    = 39.1 ns per context token (KV read once per step)
    e = 4 · 4096 (hidden) · 32 layers FLOP / 989e12          = 0.53 ns per prefill query-key pair (QKᵀ and PV)

    Adding the memory and compute terms (instead of taking their max, as a roofline would) overestimates a step
    that overlaps them perfectly; assuming 100 % of peak underestimates every real kernel. Both are assumptions.
    KV pool: 80 GiB × 0.9 (gpu_memory_utilization) − weights − 512 MiB activations (engine/runner.py's rule)
    = 56.5 GiB → 28,949 blocks of 16 tokens (2 MiB each), 463k tokens.
    Host swap (QLM eviction): PCIe 5 x16 at ~50 GB/s effective (64 GB/s raw per direction; pinned-memory copies
    reach ~80 % of it) → one 2 MiB block in 41.9 µs each way. An assumption too.
    """
    params = 8.03e9
    weight_bytes = 2 * params
    hbm_bytes_per_s = 3.35e12
    bf16_flops = 989e12
    kv_bytes_per_token = 32 * 8 * 128 * 2 * 2
    block_size = 16
    pool_bytes = 80 * 2**30 * 0.9 - weight_bytes - 512 * 2**20
    return CostModel(
        a_s=weight_bytes / hbm_bytes_per_s,
        b_s_per_prefill_token=2 * params / bf16_flops,
        c_s_per_decode=2 * params / bf16_flops,
        d_s_per_context_token=kv_bytes_per_token / hbm_bytes_per_s,
        e_s_per_prefill_pair=4 * 4096 * 32 / bf16_flops,
        name="h100-llama3-8b",
        source="ASSUMPTION: data-sheet roofline (H100 SXM 3.35 TB/s, 989 TFLOP/s bf16; Llama-3-8B bf16), "
        "PCIe 5 ~50 GB/s effective host swap; not measured; see engine/cost_model.py h100_llama3_8b",
        num_kv_blocks=int(pool_bytes // (kv_bytes_per_token * block_size)),
        block_size=block_size,
        max_model_len=8192,
        info={"kv_bytes_per_token": kv_bytes_per_token, "weight_bytes": weight_bytes},
        kv_bytes_per_token=kv_bytes_per_token,
        host_bytes_per_s=50e9,  # ASSUMPTION: PCIe 5 x16, ~50 GB/s effective
    )


PRESETS: dict[str, CostModel] = {"h100-llama3-8b": h100_llama3_8b()}
