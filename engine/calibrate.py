"""`kairos simulate calibrate`: time the real ModelRunner over a grid of step shapes and fit the cost model.

The grid covers what the scheduler produces: prefill chunks of several sizes (from position 0 and on top of a
cached context), decode batches of several sizes and context lengths, and prefill chunks mixed with decodes.
Shapes run in a seeded random order (so a burst of background load smears over the grid instead of hitting one
family of shapes), each once to warm up, then `repeats` times; the fastest run is its time (the cost of the step
itself; slower runs measure whoever else used the CPU). A seeded quarter of the shapes is held out: the fits
(engine/cost_model.py, non-negative, relative least squares; the four-term form and the one with prefill
attention) see the rest, the reported R² and relative errors are on the held-out shapes, and the form with the
lower held-out p90 error is written. K/V contents are whatever the pool holds: timing does not
depend on them. Only the runner is timed, not the scheduler's Python (about 0.25 ms a step at 256 running).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.cost_model import CostModel, StepShape, fit_errors, fit_nonnegative, h100_llama3_8b
from engine.protocol import SamplingParams

HOLDOUT_FRACTION = 0.25
GREEDY = SamplingParams(temperature=0.0)
FILL_TOKEN_ID = 100  # any id below the vocabulary size
NOTES_MARKER = "\n<!-- generated above by `kairos simulate calibrate`; notes below this line are kept -->\n"


@dataclass(frozen=True)
class GridPoint:
    """One step shape: prefill chunks as (num_tokens, start_position), then `num_decode` decodes at `decode_context`."""

    label: str
    chunks: tuple[tuple[int, int], ...] = ()
    num_decode: int = 0
    decode_context: int = 0

    @property
    def sum_context(self) -> int:
        return sum(n + start for n, start in self.chunks) + self.num_decode * self.decode_context


def default_grid(max_context_tokens: int) -> list[GridPoint]:
    """Shapes whose total context fits in `max_context_tokens` (the pool), at most 2048 new tokens a step."""
    grid = [GridPoint(f"prefill {n}", ((n, 0),)) for n in (16, 64, 128, 256, 512, 1024, 1536, 2048)]
    grid += [GridPoint(f"prefill {n} at {s}", ((n, s),)) for n, s in ((256, 1024), (512, 2048), (1024, 3072))]
    grid += [GridPoint(f"prefill {k}x{n}", ((n, 0),) * k) for k, n in ((4, 128), (8, 256), (16, 64))]
    for batch in (1, 4, 16, 32, 64, 128, 256):
        for context in (64, 256, 1024, 2048):
            grid.append(GridPoint(f"decode {batch} at {context}", (), batch, context))
    for chunk in (128, 512, 1024):
        for batch, context in ((8, 1024), (32, 256), (64, 512), (128, 128)):
            grid.append(
                GridPoint(f"mixed {chunk} + decode {batch} at {context}", ((chunk, 0),), batch, context)
            )
    return [p for p in grid if p.sum_context <= max_context_tokens]


def scheduler_output(point: GridPoint, block_size: int) -> SchedulerOutput:
    """The point as the scheduler would hand it over: disjoint block tables carved from block 0 upwards."""
    items: list[ScheduledRequest] = []
    next_block = 0

    def table(num_tokens: int) -> list[int]:
        nonlocal next_block
        num_blocks = -(-num_tokens // block_size)
        next_block += num_blocks
        return list(range(next_block - num_blocks, next_block))

    for i, (n, start) in enumerate(point.chunks):
        items.append(ScheduledRequest(f"p{i}", [FILL_TOKEN_ID] * n, start, table(start + n), GREEDY, True))
    for i in range(point.num_decode):
        ctx = point.decode_context
        items.append(ScheduledRequest(f"d{i}", [FILL_TOKEN_ID], ctx - 1, table(ctx), GREEDY, True, 1))
    return SchedulerOutput(items)


def measure(
    execute: Callable[[SchedulerOutput], Any], points: Sequence[GridPoint], block_size: int, repeats: int
) -> list[float]:
    """Fastest of `repeats` timed runs of `execute` per point, after one warm-up run of the same shape; points
    are visited in a seeded random order, results returned in the points' order."""
    seconds = [0.0] * len(points)
    for i in np.random.default_rng(0).permutation(len(points)).tolist():
        output = scheduler_output(points[i], block_size)
        execute(output)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            execute(output)
            times.append(time.perf_counter() - t0)
        seconds[i] = min(times)
    return seconds


def split_holdout(num: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded HOLDOUT_FRACTION of the points is kept out of the fit."""
    order = np.random.default_rng(seed).permutation(num).tolist()
    num_held = max(1, round(num * HOLDOUT_FRACTION))
    return sorted(order[num_held:]), sorted(order[:num_held])


def fit_report(
    shapes: Sequence[StepShape], seconds: Sequence[float], seed: int = 0, num_terms: int = 4
) -> tuple[np.ndarray, dict]:
    """Fit on the training split; errors on both splits (held-out first: that is the honest number)."""
    train, held = split_holdout(len(shapes), seed)
    coef = fit_nonnegative([shapes[i] for i in train], [seconds[i] for i in train], num_terms=num_terms)
    probe = CostModel(*coef.tolist())
    errors = {
        "num_terms": num_terms,
        "coefficients": coef.tolist(),
        "held_out": fit_errors(probe, [shapes[i] for i in held], [seconds[i] for i in held]),
        "train": fit_errors(probe, [shapes[i] for i in train], [seconds[i] for i in train]),
        "held_out_index": held,
    }
    return coef, errors


def machine_description() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    pick = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
    return {
        "lscpu": {k: fields[k].strip() for k in pick if k in fields},
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def calibrate(
    model: str, device: str, repeats: int, out_json: Path, out_markdown: Path | None, argv: Sequence[str]
) -> CostModel:
    """Load the model, time the grid, fit, write the cost-model JSON (and the markdown summary)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine process (docs/architecture.md)
    from engine.config import DeviceConfig, ModelConfig
    from engine.model_store import resolve_model
    from engine.runner import ModelRunner  # torch lives behind this import

    started = time.perf_counter()
    machine_before = machine_description()
    runner = ModelRunner(ModelConfig(model=model), DeviceConfig(device=device), block_size=16)
    runner.warmup()
    points = default_grid(min(runner.num_kv_blocks, 40_000 // 16) * 16)
    seconds = measure(runner.execute, points, runner.block_size, repeats)
    shapes = [StepShape.of(scheduler_output(p, runner.block_size)) for p in points]
    fits = {n: fit_report(shapes, seconds, num_terms=n) for n in (4, 5)}
    chosen = min(fits, key=lambda n: fits[n][1]["held_out"]["p90_rel_error"])
    coef = fits[chosen][0]
    held_labels = [points[i].label for i in fits[chosen][1]["held_out_index"]]
    fitted = CostModel(
        *coef.tolist(),
        name=f"{runner.device}-{resolve_model(model).name}",
        source="measured",
        num_kv_blocks=runner.num_kv_blocks,
        block_size=runner.block_size,
        max_model_len=runner.max_model_len,
        info={
            "command": " ".join(["kairos", "simulate", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine_before,
            "load_average_after": os.getloadavg(),
            "device": runner.device,
            "model": model,
            "repeats": repeats,
            "calibration_seconds": round(time.perf_counter() - started, 1),
            "fit": {"chosen_num_terms": chosen, "held_out_labels": held_labels}
            | {f"{n}_terms": report for n, (_, report) in fits.items()},
            "points": [
                {"label": p.label, **shape.__dict__, "seconds": s, "predicted": None}
                for p, shape, s in zip(points, shapes, seconds, strict=True)
            ],
        },
    )
    for row, shape in zip(fitted.info["points"], shapes, strict=True):
        row["predicted"] = fitted.step_seconds(shape)
    fitted.save(out_json)
    if out_markdown is not None:
        out_markdown.parent.mkdir(parents=True, exist_ok=True)
        kept = out_markdown.read_text().partition(NOTES_MARKER)[2] if out_markdown.is_file() else ""
        out_markdown.write_text(render_markdown(fitted, out_json) + NOTES_MARKER + kept)
    return fitted


def _loads(loads: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in loads)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} µs"


def _fit_rows(fit: dict[str, Any]) -> list[str]:
    rows = []
    for n in (4, 5):
        report = fit[f"{n}_terms"]
        a, b, c, d, e = report["coefficients"]
        coef = f"a {_us(a)}, b {_us(b)}, c {_us(c)}, d {_us(d)}" + (f", e {e * 1e9:.3g} ns" if n == 5 else "")
        chosen = " (written)" if fit["chosen_num_terms"] == n else ""
        for split in ("held_out", "train"):
            r = report[split]
            rows.append(
                f"| {n} terms{chosen} | {coef if split == 'held_out' else ''} | {split.replace('_', ' ')} | "
                f"{r['num_points']} | {r['r2']:.3f} | {r['median_rel_error']:.1%} | {r['p90_rel_error']:.1%} | "
                f"{r['max_rel_error']:.1%} |"
            )
    return rows


def render_markdown(fitted: CostModel, json_path: Path) -> str:
    """docs/results/simulator.md: the measured fits, every grid point, and the H100 preset's derivation."""
    info = fitted.info
    preset = h100_llama3_8b()
    lines = [
        "# Simulator cost model",
        "",
        "The simulator (`engine/simulator.py`, `kairos simulate`) runs the real `EngineCore` and scheduler on a",
        "virtual clock; one step costs `a + b·prefill_tokens + c·num_decode + d·Σcontext` seconds, optionally",
        "`+ e·prefill_pairs` (causal query-key pairs of prefill chunks) (`engine/cost_model.py`). Simulated",
        "results are always labelled as simulated. Regenerate this file with the command below.",
        "",
        f"## Measured: {fitted.name}",
        "",
        f"Command: `{info['command']}` ({info['date']}, {info['calibration_seconds']} s).",
        f"Machine: {', '.join(f'{k} {v}' for k, v in info['machine']['lscpu'].items())}; load average (1, 5, 15 "
        f"min) {_loads(info['machine']['load_average'])} before, {_loads(info['load_average_after'])} after: "
        "a load above the core count means other work shared the CPUs, and the timings carry its noise.",
        f"JSON: `{json_path}`. Pool: {fitted.num_kv_blocks} blocks of {fitted.block_size} tokens. Each shape: "
        f"fastest of {info['repeats']} runs after a warm-up, shapes in a seeded random order.",
        "",
        "Fits: non-negative least squares on relative error over a seeded 75 % of the grid; the other 25 % is",
        "held out. Errors are |predicted − measured| / measured; R² is on seconds.",
        "",
        "| form | coefficients | points | n | R² | median rel. error | p90 rel. error | max rel. error |",
        "|---|---|---|---|---|---|---|---|",
        *_fit_rows(info["fit"]),
        "",
        "| shape | prefill tokens | decodes | Σcontext | prefill pairs | measured ms | predicted ms | held out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    held_labels = set(info["fit"]["held_out_labels"])
    for p in info["points"]:
        lines.append(
            f"| {p['label']} | {p['prefill_tokens']} | {p['num_decode']} | {p['sum_context']} | "
            f"{p['prefill_pairs']} | {p['seconds'] * 1e3:.2f} | {p['predicted'] * 1e3:.2f} | "
            f"{'yes' if p['label'] in held_labels else ''} |"
        )
    lines += [
        "",
        "## Preset `h100-llama3-8b` — an ASSUMPTION, not a measurement",
        "",
        "No GPU was measured. The preset is a data-sheet roofline (`engine/cost_model.py` `h100_llama3_8b`):",
        "",
        "- Llama-3-8B: 8.03e9 parameters → 16.06 GB of bf16 weights; 32 layers, hidden 4096, 8 KV heads × 128",
        "  dims × 2 (K, V) × 2 bytes = 128 KiB of KV per token.",
        "- H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 80 GiB.",
        f"- a = weights / bandwidth = {_us(preset.a_s)} (each step streams the weights once: the decode floor).",
        f"- b = c = 2 × 8.03e9 FLOP / 989 TFLOP/s = {_us(preset.b_s_per_prefill_token)} per token.",
        f"- d = 128 KiB / 3.35 TB/s = {preset.d_s_per_context_token * 1e9:.1f} ns per context token (KV read).",
        f"- e = 4 × 4096 × 32 FLOP / 989 TFLOP/s = {preset.e_s_per_prefill_pair * 1e9:.2f} ns per prefill "
        "query-key pair (QKᵀ and PV).",
        f"- Pool: 80 GiB × 0.9 − weights − 512 MiB = {preset.num_kv_blocks} blocks of 16 tokens "
        f"({preset.num_kv_blocks * 16:,} tokens).",
        "",
        "Adding memory and compute time (rather than taking the max) is pessimistic for overlapped kernels;",
        "100 % of peak is optimistic. Treat GPU-scale simulated numbers as the shape of a result, not its size.",
        "",
    ]
    return "\n".join(lines)


def main_calibrate(args: Any, argv: Sequence[str]) -> int:
    fitted = calibrate(args.model, args.device, args.repeats, args.out, args.markdown, argv)
    fit = fitted.info["fit"]
    for n in (4, 5):
        held = fit[f"{n}_terms"]["held_out"]
        sys.stdout.write(
            f"{n} terms{' (written)' if fit['chosen_num_terms'] == n else ''}: "
            f"{', '.join(f'{c:.3g}' for c in fit[f'{n}_terms']['coefficients'])} s; held-out R² {held['r2']:.3f}, "
            f"median rel. error {held['median_rel_error']:.1%}, p90 {held['p90_rel_error']:.1%}\n"
        )
    sys.stdout.write(f"{fitted.name}: wrote {args.out}\n")
    return 0
