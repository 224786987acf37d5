"""Shared by the workload builders: their config, data-file readers and small seeded helpers.

Every random choice draws from its own stream of the seed (numpy SeedSequence entropy = (seed, stream)), so
changing one option does not reshuffle the others.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadgen import arrivals
from loadgen.plan import DEFAULT_TENANT

# ../shared/data relative to the repo root (this file's grandparent)
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

STREAM_SAMPLE, STREAM_ARRIVALS, STREAM_PROMPTS, STREAM_LENGTHS = range(4)


@dataclass(frozen=True)
class WorkloadConfig:
    """Options shared by every builder. `rate` None keeps the workload's own timing: the trace's timestamps
    (times `time_scale`), ServeGen's recorded rates (divided by `time_scale`), or all at once otherwise."""

    data_dir: Path = DEFAULT_DATA_DIR
    num_requests: int = 100
    seed: int = 0
    max_model_len: int = 2048
    prompt_format: str = "ids"  # "ids" (token ids, /v1/completions) or "text" (words; chat)
    vocab_size: int = 32000
    rate: float | None = None
    burstiness: float = 1.0
    time_scale: float = 1.0
    max_tokens: int | None = None  # sharegpt: tokens to generate; traces: a cap on the scaled recorded length
    use_recorded_length: bool = False  # sharegpt only
    input_scale: float = 0.0  # 0: automatic (synthetic.fit_lengths)
    output_scale: float = 0.0
    num_tenants: int = 0  # 0: the workload's own tenants (one, "default", for most)
    slo_class: str | None = None  # None: the workload's own class
    mooncake_trace: str = "conversation"  # or "synthetic"
    servegen_window_s: int = 0

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, stream))


def data_file(config: WorkloadConfig, name: str) -> Path:
    path = Path(config.data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file (set --data-dir to the folder of data/GUIDE.md)")
    return path


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def assign_tenants(config: WorkloadConfig, num: int) -> list[str]:
    """--num-tenants N on a single-tenant workload: request i goes to tenant-(i mod N), so tenants are equal."""
    if config.num_tenants <= 1:
        return [DEFAULT_TENANT] * num
    return [f"tenant-{i % config.num_tenants}" for i in range(num)]


def take_first(rows: list[Any], config: WorkloadConfig, what: str) -> list[Any]:
    """The first N rows of a trace (a contiguous window keeps its burst structure)."""
    if config.num_requests > len(rows):
        raise ValueError(f"asked for {config.num_requests} requests, {what} has {len(rows)}")
    return rows[: config.num_requests]


def p95(values: list[float]) -> float:
    """The reference length the automatic token scale maps onto the budget (synthetic.fit_lengths)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), 95))


def trace_offsets(config: WorkloadConfig, timestamps_s: list[float]) -> list[float]:
    """Recorded timing × time_scale, unless --rate asks for generated arrivals instead."""
    if config.rate is None:
        return arrivals.replay(timestamps_s, config.time_scale)
    return arrivals.schedule(len(timestamps_s), config.rate, config.burstiness, config.rng(STREAM_ARRIVALS))
