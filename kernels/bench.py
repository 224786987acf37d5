"""GPU benchmark for issue 10: Triton kernel bandwidth against the device's, end-to-end decode speed of Kairos
against Hugging Face transformers, and greedy agreement with the CPU path; writes docs/results/gpu.md (+ .json).

    python -m kernels.bench                      # everything (~10-20 min on an H100)
    python -m kernels.bench --part kernels       # kernels only (~1 min)
    python -m kernels.bench --quick              # fewer shapes and batch sizes, a smoke run

It needs CUDA and refuses without it: these numbers are only meaningful measured on a GPU, and nothing here is
estimated. The reference bandwidth is measured (a device-to-device copy), next to the data-sheet figure where
torch exposes the memory clock and bus width. `synthetic:llama-3-8b` has random weights: its rows are labelled.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEFAULT_OUT = Path("docs/results/gpu.md")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, bf16 KV, 16-token blocks.
ATTN_SHAPE = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
DECODE_SHAPES = ((1, 1024), (1, 8192), (8, 2048), (32, 2048), (64, 4096), (128, 1024), (256, 2048))


@dataclass
class Report:
    device: dict
    command: str
    date: str
    kernels: list[dict] = field(default_factory=list)
    e2e: list[dict] = field(default_factory=list)
    greedy: list[dict] = field(default_factory=list)


# ---- device -----------------------------------------------------------------------------------------------------


def measure_copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Achievable DRAM bandwidth, bytes/s: a device-to-device copy reads and writes num_bytes."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    import triton.testing

    ms = triton.testing.do_bench(functools.partial(dst.copy_, src), warmup=5, rep=50)
    return 2 * num_bytes / (ms * 1e-3)


def describe_device() -> dict:
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    import triton

    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "sms": props.multi_processor_count,
        "copy_bandwidth_gbs": round(measure_copy_bandwidth() / 1e9, 1),
        # DDR: two transfers per clock. Only where this torch exposes both fields.
        "datasheet_bandwidth_gbs": round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)
        if clock_khz and bus_bits
        else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }


# ---- kernels ----------------------------------------------------------------------------------------------------


def _paged_cache(num_tokens_per_request: list[int], shape: dict, seed: int = 0):
    """Random K/V pools and int32 block tables over shuffled blocks, one row per request."""
    bs = shape["block_size"]
    blocks_per = [-(-n // bs) for n in num_tokens_per_request]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = sum(blocks_per) + 1
    cache_shape = (num_blocks, bs, shape["num_kv_heads"], shape["head_dim"])
    k_cache = torch.randn(cache_shape, generator=gen, device="cuda").to(shape["dtype"])
    v_cache = torch.randn(cache_shape, generator=gen, device="cuda").to(shape["dtype"])
    order = torch.randperm(num_blocks, device="cuda", generator=gen)  # shuffled, like a long-running pool
    tables = torch.zeros(len(blocks_per), max(blocks_per), dtype=torch.int32, device="cuda")
    start = 0
    for r, n in enumerate(blocks_per):
        tables[r, :n] = order[start : start + n]
        start += n
    return k_cache, v_cache, tables


def bench_kernels(shapes: tuple[tuple[int, int], ...], copy_bw: float) -> list[dict]:
    """Decode attention GB/s per (batch, context); KV store GB/s; extend attention TFLOP/s. Each kernel is
    checked against the reference on its benchmark shape first (a wrong fast kernel is not a result)."""
    import triton.testing

    from kernels import reference, triton_attention

    s = ATTN_SHAPE
    rows = []
    elt = torch.empty((), dtype=s["dtype"]).element_size()
    for batch, ctx in shapes:
        k_cache, v_cache, tables = _paged_cache([ctx] * batch, s)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, s["num_heads"], s["head_dim"], device="cuda", dtype=s["dtype"])
        scale = s["head_dim"] ** -0.5
        out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        check = min(batch, 2)
        ref = reference.paged_decode_attention(
            q[:check].float(), k_cache.float(), v_cache.float(), tables[:check], lens[:check], scale
        )
        max_err = (out[:check].float() - ref).abs().max().item()
        decode = functools.partial(
            triton_attention.paged_decode_attention, q, k_cache, v_cache, tables, lens, scale
        )
        ms = triton.testing.do_bench(decode)
        kv_bytes = 2 * batch * ctx * s["num_kv_heads"] * s["head_dim"] * elt
        io_bytes = 2 * q.numel() * elt
        gbs = (kv_bytes + io_bytes) / (ms * 1e-3) / 1e9
        rows.append(
            dict(
                kernel="paged_decode_attention",
                shape=f"B={batch} ctx={ctx}",
                ms=round(ms, 4),
                gb_per_s=round(gbs, 1),
                pct_of_copy_bw=round(100 * gbs * 1e9 / copy_bw, 1),
                max_abs_err_vs_reference=max_err,
            )
        )
        del k_cache, v_cache
        torch.cuda.empty_cache()

    # KV store: 8192 tokens (a big prefill step) into a shuffled pool.
    num_tokens = 8192
    k_cache, v_cache, _ = _paged_cache([num_tokens], s)
    k = torch.randn(num_tokens, s["num_kv_heads"], s["head_dim"], device="cuda", dtype=s["dtype"])
    v = torch.randn_like(k)
    slots = torch.randperm(k_cache.shape[0] * s["block_size"], device="cuda")[:num_tokens]
    triton_attention.store_kv(k, v, k_cache, v_cache, slots)
    ref_k = k_cache.clone().view(-1, s["num_kv_heads"], s["head_dim"])
    ok = torch.equal(ref_k[slots], k)
    ms = triton.testing.do_bench(lambda: triton_attention.store_kv(k, v, k_cache, v_cache, slots))
    moved = 2 * 2 * k.numel() * elt  # read k and v, write them
    gbs = moved / (ms * 1e-3) / 1e9
    rows.append(
        dict(
            kernel="store_kv",
            shape=f"T={num_tokens}",
            ms=round(ms, 4),
            gb_per_s=round(gbs, 1),
            pct_of_copy_bw=round(100 * gbs * 1e9 / copy_bw, 1),
            max_abs_err_vs_reference=0.0 if ok else float("nan"),
        )
    )

    # Extend: 4 requests, each a 1024-token chunk after a 1024-token cached prefix.
    num_reqs, chunk, prefix = 4, 1024, 1024
    ctx = chunk + prefix
    k_cache, v_cache, tables = _paged_cache([ctx] * num_reqs, s)
    lens = torch.full((num_reqs,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(0, (num_reqs + 1) * chunk, chunk, dtype=torch.int32, device="cuda")
    q = torch.randn(num_reqs * chunk, s["num_heads"], s["head_dim"], device="cuda", dtype=s["dtype"])
    scale = s["head_dim"] ** -0.5

    def extend() -> torch.Tensor:
        return triton_attention.paged_extend_attention(q, k_cache, v_cache, tables, qsl, lens, scale, chunk)

    out = extend()
    ref = reference.paged_prefill_attention(
        q[:chunk].float(), k_cache.float(), v_cache.float(), tables[:1], qsl[:2], lens[:1], scale
    )
    max_err = (out[:chunk].float() - ref).abs().max().item()
    ms = triton.testing.do_bench(extend)
    pairs = num_reqs * (chunk * prefix + chunk * (chunk + 1) // 2)  # visible (query, key) pairs
    tflops = 4 * s["num_heads"] * s["head_dim"] * pairs / (ms * 1e-3) / 1e12
    rows.append(
        dict(
            kernel="paged_extend_attention",
            shape=f"{num_reqs} x {chunk} new after {prefix} cached",
            ms=round(ms, 4),
            tflop_per_s=round(tflops, 1),
            max_abs_err_vs_reference=max_err,
        )
    )
    return rows


# ---- end to end -------------------------------------------------------------------------------------------------


def _kairos_runner(model: str, dtype: str, cuda_graphs: bool = True, device: str = "cuda"):
    from engine.config import DeviceConfig, ModelConfig
    from engine.runner import ModelRunner

    return ModelRunner(
        ModelConfig(model=model, dtype=dtype, max_model_len=2048),
        DeviceConfig(device=device, gpu_memory_utilization=0.85),
        block_size=16,
        cuda_graphs=cuda_graphs,
    )


def kairos_decode(runner, batch: int, prompt_len: int, steps: int, seed: int = 0) -> dict:
    """Prefill `batch` random prompts in one step, then `steps` decode steps of the whole batch. TPOT = the
    mean decode step (each step ends with the sampled tokens on the host, so it is synchronised)."""
    from engine.batch import ScheduledRequest, SchedulerOutput
    from engine.protocol import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=1 << 20)
    rng = random.Random(seed)
    blocks_per = -(-(prompt_len + steps) // runner.block_size)
    if batch * blocks_per > runner.num_kv_blocks:
        return {"skipped": f"needs {batch * blocks_per} KV blocks, pool has {runner.num_kv_blocks}"}
    tables = [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(batch)]
    prompts = [[rng.randrange(10, runner.vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    # Prefill in steps of at most 8192 tokens, as a token budget would (32k tokens of 8B activations at once
    # would need ~10 GB outside the KV pool).
    per_step = max(1, 8192 // prompt_len)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    last: dict[str, int] = {}
    for first in range(0, batch, per_step):
        step = [
            ScheduledRequest(f"r{i}", prompts[i], 0, tables[i], greedy, True)
            for i in range(first, min(batch, first + per_step))
        ]
        last.update(runner.execute(SchedulerOutput(step)).sampled)
    prefill_s = time.perf_counter() - t0
    step_times = []
    for step in range(steps):
        scheduled = [
            ScheduledRequest(f"r{i}", [last[f"r{i}"]], prompt_len + step, tables[i], greedy, True, step + 1)
            for i in range(batch)
        ]
        t0 = time.perf_counter()
        last = runner.execute(SchedulerOutput(scheduled)).sampled
        step_times.append(time.perf_counter() - t0)
    tpot = sum(step_times[2:]) / max(1, len(step_times) - 2)  # the first steps may still compile
    return {
        "prefill_s": round(prefill_s, 4),
        "tpot_ms": round(tpot * 1e3, 3),
        "tokens_per_s": round(batch / tpot, 1),
    }


def hf_model(model: str, dtype: torch.dtype):
    """transformers on the same GPU: SmolLM2 from the prepared directory; the 8B shape with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.model_store import resolve_model

    path = resolve_model(model)
    if model.startswith("synthetic:"):
        with torch.device("cuda"):  # HF's own random init, made on the GPU
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


def hf_decode(hf, batch: int, prompt_len: int, steps: int, seed: int = 0) -> dict:
    """generate() with greedy decoding and no early stop; TPOT = (t(steps) - t(1)) / (steps - 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, hf.config.vocab_size, (batch, prompt_len), generator=gen).cuda()
    mask = torch.ones_like(ids)

    def run(new: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up
    first, full = run(1), run(steps)
    tpot = (full - first) / (steps - 1)
    return {
        "prefill_s": round(first, 4),
        "tpot_ms": round(tpot * 1e3, 3),
        "tokens_per_s": round(batch / tpot, 1),
    }


def bench_e2e(
    models: list[str], batch_sizes: list[int], prompt_len: int, steps: int, copy_bw: float
) -> list[dict]:
    rows = []
    for model in models:
        dtype = "float32" if model == "default" else "bfloat16"
        label = f"{model} (SYNTHETIC random weights)" if model.startswith("synthetic:") else model
        for cuda_graphs in (True, False):
            runner = _kairos_runner(model, dtype, cuda_graphs)
            runner.warmup()
            weight_bytes = runner.model.weights.num_bytes
            for batch in batch_sizes:
                row = dict(engine="kairos", graphs=cuda_graphs, model=label, dtype=dtype, batch=batch)
                row.update(kairos_decode(runner, batch, prompt_len, steps))
                if batch == 1 and "tpot_ms" in row:
                    roofline_ms = weight_bytes / copy_bw * 1e3
                    row["weights_roofline_ms"] = round(roofline_ms, 3)
                    row["tpot_over_roofline"] = round(row["tpot_ms"] / roofline_ms, 2)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            del runner
            gc.collect()
            torch.cuda.empty_cache()
        hf = hf_model(model, getattr(torch, dtype))
        for batch in batch_sizes:
            row = dict(engine="hf-transformers", graphs=False, model=label, dtype=dtype, batch=batch)
            try:
                row.update(hf_decode(hf, batch, prompt_len, steps))
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def greedy_agreement(model: str = "default", num_tokens: int = 32) -> list[dict]:
    """Greedy tokens on the GPU against the CPU path: fp32 must agree token for token (acceptance); bf16 on the
    GPU is reported as the number of leading tokens that agree with fp32 on the CPU. "default" (SmolLM2) is
    prompted with a chat; `synthetic:smollm2-135m` (the same shape, the same seeded weights on both devices, no
    download) with fixed token ids."""
    from engine.batch import ScheduledRequest, SchedulerOutput
    from engine.model_store import resolve_model
    from engine.protocol import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=1 << 20)
    if model.startswith("synthetic:"):
        prompt = [(37 * i + 11) % 4000 + 10 for i in range(40)]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def generate(runner) -> list[int]:
        table = list(range(-(-(len(prompt) + num_tokens) // runner.block_size)))
        out = runner.execute(SchedulerOutput([ScheduledRequest("g", prompt, 0, table, greedy, True)]))
        tokens = [out.sampled["g"]]
        for i in range(num_tokens - 1):
            step = ScheduledRequest("g", [tokens[-1]], len(prompt) + i, table, greedy, True, i + 1)
            tokens.append(runner.execute(SchedulerOutput([step])).sampled["g"])
        return tokens

    cpu = generate(_kairos_runner(model, "float32", device="cpu"))
    rows = []
    for dtype in ("float32", "bfloat16"):
        gpu = generate(_kairos_runner(model, dtype))
        gc.collect()
        torch.cuda.empty_cache()
        agree = next((i for i, (a, b) in enumerate(zip(cpu, gpu, strict=True)) if a != b), len(cpu))
        rows.append(dict(model=model, gpu_dtype=dtype, tokens=num_tokens, leading_tokens_equal=agree))
    return rows


# ---- report -----------------------------------------------------------------------------------------------------


def render(report: Report) -> str:
    d = report.device
    lines = [
        "# GPU results (issue 10)",
        "",
        f"Measured by `{report.command}` on {report.date}.",
        "",
        f"Device: **{d['name']}** ({d['memory_gib']} GiB, {d['sms']} SMs); torch {d['torch']}, triton {d['triton']}, "
        f"CUDA {d['cuda']}. Device-to-device copy bandwidth (measured): **{d['copy_bandwidth_gbs']} GB/s**"
        + (
            f"; data-sheet peak from the memory clock: {d['datasheet_bandwidth_gbs']} GB/s."
            if d["datasheet_bandwidth_gbs"]
            else "."
        ),
        "",
    ]
    if report.kernels:
        lines += [
            "## Kernels (Llama-3-8B attention shape: 32 heads / 8 KV heads, head_dim 128, bf16, 16-token blocks)",
            "",
        ]
        lines += [
            "| kernel | shape | ms | GB/s | % of copy bandwidth | TFLOP/s | max abs err vs reference |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report.kernels:
            lines.append(
                f"| {r['kernel']} | {r['shape']} | {r['ms']} | {r.get('gb_per_s', '')} | {r.get('pct_of_copy_bw', '')} "
                f"| {r.get('tflop_per_s', '')} | {r['max_abs_err_vs_reference']:.2e} |"
            )
        lines.append("")
    if report.e2e:
        lines += ["## End to end: decode TPOT and throughput (engine-level, no HTTP)", ""]
        lines += [
            "| engine | CUDA graphs | model | dtype | batch | prefill s | TPOT ms | tokens/s | TPOT / weight roofline |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report.e2e:
            if "skipped" in r:
                lines.append(
                    f"| {r['engine']} | {r['graphs']} | {r['model']} | {r['dtype']} | {r['batch']} | skipped: {r['skipped']} | | | |"
                )
                continue
            lines.append(
                f"| {r['engine']} | {r['graphs']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['prefill_s']} | {r['tpot_ms']} "
                f"| {r['tokens_per_s']} | {r.get('tpot_over_roofline', '')} |"
            )
        lines.append("")
    if report.greedy:
        lines += ["## Greedy agreement with the CPU path (CPU fp32 as the reference)", ""]
        lines += ["| model | GPU dtype | tokens | leading tokens equal |", "|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['gpu_dtype']} | {r['tokens']} | {r['leading_tokens_equal']} |"
            for r in report.greedy
        ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kernels", "e2e", "greedy", "all"), default="all")
    parser.add_argument("--models", default="default,synthetic:llama-3-8b")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument(
        "--greedy-model",
        default="default",
        help="default (SmolLM2, needs its weights) or synthetic:smollm2-135m",
    )
    parser.add_argument("--quick", action="store_true", help="3 kernel shapes, batch 1/16/256, 16 steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--merge", action="store_true", help="keep the other parts of an earlier --out .json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "kernels/bench.py needs CUDA (no GPU visible to torch): nothing measured, nothing written"
        )

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    shapes, steps = DECODE_SHAPES, args.decode_steps
    if args.quick:
        shapes, batch_sizes, steps = DECODE_SHAPES[:: len(DECODE_SHAPES) // 2], [1, 16, 256], 16
    device = describe_device()
    copy_bw = device["copy_bandwidth_gbs"] * 1e9
    report = Report(
        device=device,
        command="python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    if args.merge and (previous := args.out.with_suffix(".json")).is_file():
        # Parts measured by earlier commands (a device command runs 10 minutes at most) are kept; their
        # commands and dates are listed with this one's.
        old = json.loads(previous.read_text())
        report.kernels, report.e2e, report.greedy = old["kernels"], old["e2e"], old["greedy"]
        report.command = f"{old['command']}` ({old['date']}), then `{report.command}"
    if args.part in ("kernels", "all"):
        report.kernels = bench_kernels(shapes, copy_bw)
    if args.part in ("e2e", "all"):
        models = args.models.split(",")
        measured = bench_e2e(models, batch_sizes, args.prompt_len, steps, copy_bw)
        report.e2e = [r for r in report.e2e if r["model"].split(" ")[0] not in models] + measured
    if args.part in ("greedy", "all"):
        report.greedy = greedy_agreement(args.greedy_model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(report))
    args.out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1, default=str))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
