"""Frozen engine configuration, built once at the edge (the CLI) and passed to the engine process as a slice.

Derived numbers (the KV block count after sizing the pool) are returned by the runner, never written back here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "ki": 2**10,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mi": 2**20,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gi": 2**30,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864, '1.5GB' -> 1500000000, '4096' -> 4096. Raises ValueError on anything else."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 64MiB, 2GiB, 500MB, 1048576)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "vllm"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    block_size: int = 16
    enable_prefix_caching: bool = True
    # KV ledger and EcoServe (engine/kv_ledger.py, engine/policy.py); ignored by policies without reservations.
    kv_reserve_fraction: float = 0.05  # global reserve for under-predicted requests, fraction of the pool
    rl_bucket_width: int = 64  # tokens per response-length bucket (reservation = prompt + bucket(rl_q))
    admission_window: int = 8  # non-blocking policies stop after this many waiting requests fail to fit
    ecoserve_lending: bool = True  # ablation "no lending": reservations must fit flat, no KVC pipelining
    ecoserve_grouping: bool = True  # ablation "no grouping": account every GT on its own
    ecoserve_ordering: bool = True  # ablation "no ordering": FCFS instead of EcoServe's KV-aware order
    # Justitia / VTC (engine/fairness.py): an app stays active this long (s) after its last request finished;
    # seconds per engine step in the fluid reference's service rate M / t_iter (the simulator sets it from its
    # cost model; on a real engine it is the measured decode step, `kairos serve --fair-iteration-s`).
    app_idle_timeout: float = 5.0
    fair_iteration_s: float = 0.05
    # QLM (engine/slo.py, engine/qlm.py): `--slo NAME:ttft=S,tpot=S,e2e=S` overrides of the default classes; the
    # violation check's period on the scheduler clock; the RWT estimator's quantile (z_q of its CLT bound).
    slo: tuple[str, ...] = ()
    qlm_tick_s: float = 0.1
    qlm_quantile: float = 0.99


@dataclass(frozen=True)
class ModelConfig:
    model: str = "default"  # "default", a local HF directory, or "tiny-random" (tests)
    served_model_name: str = ""
    dtype: str = "float32"
    max_model_len: int = 0  # 0 = the model's own max_position_embeddings (capped at 8192)
    # QLM model swapping (engine/model_swap.py): more models of the same shape on the replica, kept in host memory
    # until swapped in, and the names requests use for them (`kairos serve --model A --model B`).
    extra_models: tuple[str, ...] = ()
    extra_served_model_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:0"
    kv_cache_memory: int = 0  # bytes for the KV pool; 0 = derive from device memory
    device_memory: int = 0  # bytes per replica (CPU budget); 0 = default
    gpu_memory_utilization: float = 0.9
    num_threads: int = 0  # torch intra-op threads in the engine; 0 = torch's default
    swap_space: int = 0  # bytes of host memory for swapped-out KV (QLM eviction); 0 = evict by recompute only
    # KunServe (engine/replicas.py, engine/kunserve.py): replicas of the model in the one engine process, one per
    # device in a comma-separated `device` list, else `replicas` on `device` (each with the budget above); parameter
    # drop "auto" = on with >= 2 replicas; the memory monitor's thresholds (usage = blocks in use / all blocks).
    replicas: int = 1
    param_drop: str = "auto"  # "auto" | "on" | "off"
    drop_usage: float = 0.95
    restore_usage: float = 0.5
    monitor_interval_s: float = 0.1
    monitor_window: int = 30
    min_pipeline_s: float = 5.0  # restore hysteresis: dwell in pipeline mode, and the DP pools' fill after a
    restore_fit_usage: float = 0.8  # restore must stay at or under this (engine/kunserve.py MonitorConfig)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    device: DeviceConfig = DeviceConfig()
    stats_interval_s: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        """Inverse of to_dict; unknown keys are an error."""
        parts = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            sub_cls = {"model": ModelConfig, "scheduler": SchedulerConfig, "device": DeviceConfig}.get(f.name)
            parts[f.name] = _strict(sub_cls, data[f.name]) if sub_cls else data[f.name]
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return cls(**parts)


def _strict(cls: type, data: dict):
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)
