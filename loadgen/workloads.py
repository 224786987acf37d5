"""Workload builders: a dataset from `../shared/data` (data/GUIDE.md) → a seeded, reproducible `Workload`.

sharegpt    real first-turn prompts; max_tokens = --max-tokens, or the recorded length with ignore_eos
azure-conv  Azure 2023 conversation trace: timestamps + token counts → synthetic prompts (interactive class)
azure-code  Azure 2023 code trace, extremely bursty, long prompts / short outputs (batch class)
mooncake    Mooncake trace: hash_ids → shared prefix blocks (same id → same tokens), so prefix caching is hit
agents      agent sessions: each session is an application; its calls are chained (workload_agents.py)
servegen    ServeGen per-client rates, burstiness and lengths → tenants (workload_servegen.py)
apps        LLM applications: map-reduce and self-consistency (k ∈ {1,4,16,64}) and agent sessions (workload_apps.py)
mixed-code, mixed-sharegpt   azure-conv as interactive + azure-code or ShareGPT as batch (QLM E2; workload_mixed.py)

Trace token counts are scaled into the model's context (synthetic.LengthFit); the factors go into `info`.
"""

from __future__ import annotations

from collections.abc import Callable

from loadgen import arrivals
from loadgen.datasets import (
    STREAM_ARRIVALS,
    STREAM_PROMPTS,
    STREAM_SAMPLE,
    WorkloadConfig,
    assign_tenants,
    data_file,
    p95,
    read_csv,
    read_jsonl,
    take_first,
    trace_offsets,
)
from loadgen.plan import DEFAULT_SLO_CLASS, PlannedRequest, Workload
from loadgen.synthetic import MOONCAKE_BLOCK_TOKENS, PromptMaker, budgets, fit_lengths
from loadgen.workload_agents import build_agents
from loadgen.workload_apps import build_apps
from loadgen.workload_mixed import build_mixed_code, build_mixed_sharegpt
from loadgen.workload_servegen import build_servegen

SHAREGPT_DEFAULT_MAX_TOKENS = 128
MIN_SHAREGPT_PROMPT_TOKENS = 4  # as vllm bench serve's ShareGPT filter


# ---- sharegpt -----------------------------------------------------------------------------------------------


def build_sharegpt(config: WorkloadConfig) -> Workload:
    """A seeded sample of first-turn prompts whose recorded SmolLM2 count fits the input budget; a smaller N
    with the same seed is a prefix of a larger one. Prompts are real text, so they are filtered, not scaled."""
    max_input, max_output = budgets(config.max_model_len)
    rows = [
        r
        for r in read_jsonl(data_file(config, "sharegpt_first_turn.jsonl"))
        if MIN_SHAREGPT_PROMPT_TOKENS <= r["prompt_tokens"] <= max_input
    ]
    if config.num_requests > len(rows):
        raise ValueError(f"asked for {config.num_requests} prompts, {len(rows)} fit {max_input} tokens")
    order = config.rng(STREAM_SAMPLE).permutation(len(rows))[: config.num_requests]
    chosen = [rows[i] for i in order.tolist()]
    if config.use_recorded_length:  # --max-tokens, if given, caps the recorded lengths
        max_tokens = min(config.max_tokens or max_output, max_output)
        lengths = [max(1, min(r["response_tokens"], max_tokens)) for r in chosen]
    else:
        max_tokens = min(config.max_tokens or SHAREGPT_DEFAULT_MAX_TOKENS, max_output)
        lengths = [max_tokens] * len(chosen)
    offsets = arrivals.schedule(len(chosen), config.rate, config.burstiness, config.rng(STREAM_ARRIVALS))
    tenants = assign_tenants(config, len(chosen))
    requests = tuple(
        PlannedRequest(
            index=i,
            offset_s=offsets[i],
            prompt=row["prompt"],
            num_prompt_tokens=row["prompt_tokens"],
            max_tokens=lengths[i],
            ignore_eos=config.use_recorded_length,
            tenant=tenants[i],
            slo_class=config.slo_class or DEFAULT_SLO_CLASS,
        )
        for i, row in enumerate(chosen)
    )
    info = {
        "source": "sharegpt_first_turn.jsonl",
        "sample": "seeded permutation prefix",
        "max_input_tokens": max_input,
        "max_output_tokens": max_tokens,
        "use_recorded_length": config.use_recorded_length,
        "num_output_clipped": sum(r["response_tokens"] > max_tokens for r in chosen)
        if config.use_recorded_length
        else 0,
    }
    return Workload("sharegpt", requests, info)


# ---- azure --------------------------------------------------------------------------------------------------


def _build_azure(config: WorkloadConfig, name: str, file_name: str, slo_class: str) -> Workload:
    all_rows = [
        (float(r["timestamp_s"]), int(r["input_tokens"]), int(r["output_tokens"]))
        for r in read_csv(data_file(config, file_name))
    ]
    fit = fit_lengths(
        p95([r[1] for r in all_rows]),
        p95([r[2] for r in all_rows]),
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )
    rows = take_first(all_rows, config, file_name)
    offsets = trace_offsets(config, [r[0] for r in rows])
    maker = PromptMaker(config.prompt_format, config.vocab_size, config.rng(STREAM_PROMPTS))
    tenants = assign_tenants(config, len(rows))
    requests = []
    for i, (_, num_in, num_out) in enumerate(rows):
        num_prompt = fit.input(num_in)
        requests.append(
            PlannedRequest(
                index=i,
                offset_s=offsets[i],
                prompt=maker.render(maker.fresh(num_prompt)),
                num_prompt_tokens=num_prompt,
                max_tokens=fit.output(num_out),
                ignore_eos=True,
                tenant=tenants[i],
                slo_class=config.slo_class or slo_class,
            )
        )
    info = {"source": file_name, "length_fit": fit.to_dict(), "time_scale": config.time_scale}
    info.update(fit.num_clipped([r[1] for r in rows], [r[2] for r in rows]))
    return Workload(name, tuple(requests), info)


def build_azure_conv(config: WorkloadConfig) -> Workload:
    return _build_azure(config, "azure-conv", "azure2023_conv.csv", "interactive")


def build_azure_code(config: WorkloadConfig) -> Workload:
    return _build_azure(config, "azure-code", "azure2023_code.csv", "batch")


# ---- mooncake -----------------------------------------------------------------------------------------------


def build_mooncake(config: WorkloadConfig) -> Workload:
    """Each 512-token hash block becomes `block_tokens` = round(512 × input_scale) tokens of fixed content per
    hash id, so requests that share hash-id prefixes share token prefixes; the prompt is cut to the scaled
    input length (the last block is partial, as in the trace)."""
    file_name = f"mooncake_{config.mooncake_trace}.jsonl"
    all_rows = list(read_jsonl(data_file(config, file_name)))
    fit = fit_lengths(
        p95([r["input_length"] for r in all_rows]),
        p95([r["output_length"] for r in all_rows]),
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )
    block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * fit.input_scale))
    rows = take_first(all_rows, config, file_name)
    offsets = trace_offsets(config, [r["timestamp"] / 1000.0 for r in rows])
    maker = PromptMaker(config.prompt_format, config.vocab_size, config.rng(STREAM_PROMPTS))
    tenants = assign_tenants(config, len(rows))
    requests = []
    for i, row in enumerate(rows):
        units = [u for hash_id in row["hash_ids"] for u in maker.block(hash_id, block_tokens)]
        units = units[: fit.input(row["input_length"])]
        requests.append(
            PlannedRequest(
                index=i,
                offset_s=offsets[i],
                prompt=maker.render(units),
                num_prompt_tokens=len(units),
                max_tokens=fit.output(row["output_length"]),
                ignore_eos=True,
                tenant=tenants[i],
                slo_class=config.slo_class or DEFAULT_SLO_CLASS,
            )
        )
    info = {
        "source": file_name,
        "length_fit": fit.to_dict(),
        "block_tokens": block_tokens,
        "time_scale": config.time_scale,
    }
    info.update(fit.num_clipped([r["input_length"] for r in rows], [r["output_length"] for r in rows]))
    return Workload("mooncake", tuple(requests), info)


WORKLOADS: dict[str, Callable[[WorkloadConfig], Workload]] = {
    "sharegpt": build_sharegpt,
    "azure-conv": build_azure_conv,
    "azure-code": build_azure_code,
    "mooncake": build_mooncake,
    "agents": build_agents,
    "servegen": build_servegen,
    "apps": build_apps,
    "mixed-code": build_mixed_code,
    "mixed-sharegpt": build_mixed_sharegpt,
}


def build_workload(name: str, config: WorkloadConfig) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name](config)
