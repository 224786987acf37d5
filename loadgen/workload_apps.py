"""The `apps` workload (experiment E3, Justitia): LLM applications, each a set of related calls with one app id.

Apps arrive open-loop at --rate apps/s (default: all at once) and cycle through three shapes:

  map-reduce        k map calls (a chunk of 256, 512 or 1024 tokens plus a shared 32-token instruction, answered
                    with a real ShareGPT response length), then one reduce call whose prompt is the maps' outputs
                    plus the instruction. The reduce is sent when the map with the longest answer finishes (maps
                    start together with equal prompts, so that map is the last to finish when served alike; the
                    client has no wait-for-all rule).
  self-consistency  one Alpaca-Eval instruction sampled k times in parallel (the same prompt: prefix-cache hits);
                    each answer's length is one of the ten recorded models' answers to it
  agent             one real agent session (agent_sessions_lmcache.csv), chained as in the `agents` workload

k cycles through {1, 4, 16, 64} for the task-parallel shapes. Lengths are real counts, scaled into the context
(--input-scale / --output-scale, else automatic) and clipped by --max-tokens. --num-requests counts calls; the last
app may be cut short. The tenant is the shape (agents: the framework), so Jain's index over tenants compares shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from loadgen import arrivals
from loadgen.datasets import (
    STREAM_ARRIVALS,
    STREAM_LENGTHS,
    STREAM_PROMPTS,
    STREAM_SAMPLE,
    WorkloadConfig,
    data_file,
    p95,
    read_csv,
    read_jsonl,
)
from loadgen.plan import DEFAULT_SLO_CLASS, PlannedRequest, Workload
from loadgen.synthetic import LengthFit, PromptMaker, fit_lengths
from loadgen.workload_agents import SessionPlanner, read_sessions

PARALLEL_WIDTHS = (1, 4, 16, 64)
CHUNK_TOKENS = (256, 512, 1024)
INSTRUCTION_TOKENS = 32
SHAPES = ("map-reduce", "self-consistency", "agent")
FIT_REF_INPUT = 1024 + INSTRUCTION_TOKENS  # the largest map prompt sets the input scale
FIT_REF_OUTPUT = 1024  # ShareGPT's answers are cut at 1,024 tokens here


def build_apps(config: WorkloadConfig) -> Workload:
    fit = fit_lengths(
        FIT_REF_INPUT,
        FIT_REF_OUTPUT,
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )
    lengths = config.rng(STREAM_LENGTHS)
    sharegpt = [
        min(int(r["response_tokens"]), FIT_REF_OUTPUT)
        for r in read_jsonl(data_file(config, "sharegpt_first_turn.jsonl"))
    ]
    alpaca: dict[int, tuple[int, list[int]]] = {}
    for row in read_jsonl(data_file(config, "alpaca_eval_outputs.jsonl")):
        entry = alpaca.setdefault(row["prompt_id"], (int(row["instruction_tokens"]), []))
        entry[1].append(int(row["output_tokens"]))
    instructions = list(alpaca.values())
    sessions = list(read_sessions(config).items())
    session_order = config.rng(STREAM_SAMPLE).permutation(len(sessions)).tolist()
    maker = PromptMaker(config.prompt_format, config.vocab_size, config.rng(STREAM_PROMPTS))
    agents = SessionPlanner(config, maker, _agent_fit(config))

    requests: list[PlannedRequest] = []
    apps: list[list[PlannedRequest]] = []
    counts = {shape: 0 for shape in SHAPES}
    # Arrival offsets for as many apps as could possibly be needed (one call each); only the used ones matter.
    starts = arrivals.schedule(
        config.num_requests, config.rate, config.burstiness, config.rng(STREAM_ARRIVALS)
    )
    for i, start in enumerate(starts):
        if len(requests) >= config.num_requests:
            break
        shape = SHAPES[i % len(SHAPES)]
        k = PARALLEL_WIDTHS[(i // len(SHAPES)) % len(PARALLEL_WIDTHS)]
        app_id = f"{shape}-{i}"
        if shape == "agent":
            key, calls = sessions[session_order[counts[shape] % len(sessions)]]
            app = agents.requests(key, calls, start, len(requests))
            app = [_retag(r, f"agent-{i}:{key[0]}", key[0]) for r in app]
        elif shape == "map-reduce":
            app = list(_map_reduce(app_id, k, start, len(requests), fit, maker, lengths, sharegpt, config))
        else:
            app = list(
                _self_consistency(app_id, k, start, len(requests), fit, maker, lengths, instructions, config)
            )
        counts[shape] += 1
        app = app[: config.num_requests - len(requests)]
        requests.extend(app)
        apps.append(app)
    info = {
        "source": "sharegpt_first_turn.jsonl, alpaca_eval_outputs.jsonl, agent_sessions_lmcache.csv",
        "length_fit": fit.to_dict(),
        "num_apps": len(apps),
        "apps_per_shape": counts,
        "parallel_widths": list(PARALLEL_WIDTHS),
        "time_scale": config.time_scale,
    }
    return Workload("apps", tuple(requests), info)


def _agent_fit(config: WorkloadConfig) -> LengthFit:
    """Agent calls keep the `agents` workload's own scaling (its p95s), so both workloads agree."""
    rows = list(read_csv(data_file(config, "agent_sessions_lmcache.csv")))
    return fit_lengths(
        p95([float(r["input_tokens"]) for r in rows]),
        p95([float(r["output_tokens"]) for r in rows]),
        config.max_model_len,
        config.input_scale,
        config.output_scale,
        config.max_tokens,
    )


def _retag(r: PlannedRequest, app_id: str, tenant: str) -> PlannedRequest:
    return PlannedRequest(**{**r.__dict__, "app_id": app_id, "tenant": tenant})


def _request(
    index: int,
    offset: float,
    prompt: str | tuple[int, ...],
    num_prompt_tokens: int,
    max_tokens: int,
    tenant: str,
    app_id: str,
    config: WorkloadConfig,
    after: int | None = None,
) -> PlannedRequest:
    return PlannedRequest(
        index=index,
        offset_s=offset,
        prompt=prompt,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=max_tokens,
        ignore_eos=True,
        tenant=tenant,
        app_id=app_id,
        slo_class=config.slo_class or DEFAULT_SLO_CLASS,
        after=after,
    )


def _map_reduce(app_id, k, start, first, fit, maker, rng, sharegpt, config) -> Iterator[PlannedRequest]:
    instruction = maker.fresh(fit.input(INSTRUCTION_TOKENS))
    chunk = fit.input(float(CHUNK_TOKENS[int(rng.integers(len(CHUNK_TOKENS)))]))
    outputs = [fit.output(sharegpt[int(rng.integers(len(sharegpt)))]) for _ in range(k)]
    for j, out in enumerate(outputs):
        units = maker.fresh(chunk) + instruction
        yield _request(first + j, start, maker.render(units), len(units), out, "map-reduce", app_id, config)
    longest = max(range(k), key=lambda j: outputs[j])
    reduce_prompt = min(sum(outputs) + len(instruction), fit.max_input_tokens)
    answer = fit.output(sharegpt[int(rng.integers(len(sharegpt)))])
    units = maker.fresh(max(reduce_prompt - len(instruction), 1)) + instruction
    yield _request(
        first + k, 0.0, maker.render(units), len(units), answer, "map-reduce", app_id, config, first + longest
    )


def _self_consistency(
    app_id, k, start, first, fit, maker, rng, instructions, config
) -> Iterator[PlannedRequest]:
    num_prompt, answers = instructions[int(rng.integers(len(instructions)))]
    units = maker.fresh(fit.input(float(max(num_prompt, 1))))
    prompt = maker.render(units)
    for j in range(k):
        out = fit.output(answers[int(rng.integers(len(answers)))])
        yield _request(first + j, start, prompt, len(units), out, "self-consistency", app_id, config)
