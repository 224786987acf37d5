"""loadgen plans: seeded and reproducible, scaled into the context, with each workload's structure
(Mooncake shared prefixes, chained agent calls, ServeGen tenants) and the arrival processes' statistics."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen import arrivals
from loadgen.datasets import DEFAULT_DATA_DIR, WorkloadConfig
from loadgen.synthetic import WORDS, PromptMaker, budgets, fit_lengths
from loadgen.workloads import WORKLOADS, build_workload

pytestmark = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


def config(**kw: object) -> WorkloadConfig:
    return WorkloadConfig(**{"num_requests": 12, "seed": 3, **kw})


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_same_seed_same_plan_and_fits_context(name: str) -> None:
    a = build_workload(name, config(max_model_len=512))
    assert a == build_workload(name, config(max_model_len=512))
    assert len(a.requests) == 12
    max_input, max_output = budgets(512)
    for r in a.requests:
        assert 1 <= r.num_prompt_tokens <= max_input and 1 <= r.max_tokens <= max_output
        if isinstance(r.prompt, tuple):
            assert len(r.prompt) == r.num_prompt_tokens and all(1000 <= t < 32000 for t in r.prompt)
    if name.startswith("mixed-"):  # each class is fit by its own builder
        assert a.info["interactive"]["length_fit"]["max_model_len"] == 512
    elif name != "sharegpt":
        assert a.info["length_fit"]["max_model_len"] == 512


@pytest.mark.parametrize("name", ["sharegpt", "azure-conv", "mooncake", "agents", "servegen"])
def test_other_seed_other_plan(name: str) -> None:
    assert build_workload(name, config(rate=5.0)) != build_workload(name, config(rate=5.0, seed=4))


def test_sharegpt_recorded_length_and_prefix_property() -> None:
    small = build_workload("sharegpt", config(num_requests=5, use_recorded_length=True))
    large = build_workload("sharegpt", config(num_requests=20, use_recorded_length=True))
    assert small.requests == large.requests[:5]  # a smaller run is a subset of a larger one
    assert all(r.ignore_eos and isinstance(r.prompt, str) for r in small.requests)
    assert len({r.max_tokens for r in large.requests}) > 1  # recorded lengths, not one constant
    fixed = build_workload("sharegpt", config(max_tokens=7))
    assert {r.max_tokens for r in fixed.requests} == {7} and not any(r.ignore_eos for r in fixed.requests)


def test_azure_replays_timestamps_scaled() -> None:
    one = build_workload("azure-conv", config())
    half = build_workload("azure-conv", config(time_scale=0.5))
    assert one.requests[0].offset_s == 0.0
    assert one.requests[1].offset_s == pytest.approx(4.314579)  # second row of azure2023_conv.csv
    assert [r.offset_s for r in half.requests] == pytest.approx([r.offset_s / 2 for r in one.requests])
    code = build_workload("azure-code", config())
    assert {r.slo_class for r in code.requests} == {"batch"} and all(r.ignore_eos for r in code.requests)
    # token counts: scaled by the recorded factor (first row: 374 in, 44 out)
    fit = one.info["length_fit"]
    assert one.requests[0].num_prompt_tokens == round(374 * fit["input_scale"])
    assert one.requests[0].max_tokens == round(44 * fit["output_scale"])


def test_mooncake_same_hash_ids_share_prefixes() -> None:
    w = build_workload("mooncake", config(num_requests=6))
    block = w.info["block_tokens"]
    # rows 0..2 of mooncake_conversation.jsonl all start with hash id 0, then differ
    first, second = w.requests[0].prompt, w.requests[1].prompt
    assert first[:block] == second[:block]
    assert first[block : 2 * block] != second[block : 2 * block]


def test_mooncake_text_prompts_share_word_prefixes() -> None:
    w = build_workload("mooncake", config(num_requests=3, prompt_format="text"))
    words = [r.prompt.split() for r in w.requests]
    assert len(words[0]) == w.requests[0].num_prompt_tokens and set(words[0]) <= set(WORDS)
    assert words[0][: w.info["block_tokens"]] == words[1][: w.info["block_tokens"]]


def test_agents_are_chained_sessions_with_shared_prefixes() -> None:
    w = build_workload("agents", config(num_requests=40, rate=1.0))
    apps = {r.app_id for r in w.requests}
    assert len(apps) == w.info["num_sessions"] >= 2 and all(apps)
    for r in w.requests:
        if r.after is not None:
            prev = w.requests[r.after]
            assert prev.app_id == r.app_id and r.after < r.index
    chained = [r for r in w.requests if r.after is not None]
    assert chained, "every session has chained calls"
    # the recorded prefix reuse survives scaling: most chained calls start with their predecessor's tokens
    shared = [r for r in chained if r.prompt[:4] == w.requests[r.after].prompt[:4]]
    assert len(shared) >= len(chained) // 2


def test_servegen_tenants_rates_and_lengths() -> None:
    w = build_workload("servegen", config(num_requests=400, rate=10.0, num_tenants=4))
    tenants = w.info["tenants"]
    assert len(tenants) == 4
    assert sum(t["rate_rps"] for t in tenants.values()) == pytest.approx(10.0)
    counts = {name: sum(r.tenant == name for r in w.requests) for name in tenants}
    by_rate = sorted(tenants, key=lambda n: tenants[n]["rate_rps"])
    assert counts[by_rate[-1]] + counts[by_rate[-2]] > counts[by_rate[0]] + counts[by_rate[1]]  # rate skew
    span = w.requests[-1].offset_s
    assert 400 / span == pytest.approx(10.0, rel=0.35)


def test_bad_inputs_raise() -> None:
    with pytest.raises(FileNotFoundError):
        build_workload("azure-code", config(data_dir=DEFAULT_DATA_DIR / "nope"))
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("nope", config())
    with pytest.raises(ValueError, match="window"):
        build_workload("servegen", config(servegen_window_s=7))


def test_gamma_arrivals_rate_and_burstiness() -> None:
    rng = np.random.default_rng(0)
    for k in (1.0, 0.25):
        offsets = arrivals.gamma(20001, rate=4.0, burstiness=k, rng=rng)
        gaps = np.diff(offsets)
        assert offsets[0] == 0.0
        assert gaps.mean() == pytest.approx(0.25, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(k), rel=0.1)
    weibull = arrivals.renewal_gaps(20000, 2.0, "weibull", 0.5, rng)
    assert weibull.mean() == pytest.approx(0.5, rel=0.1)
    assert arrivals.schedule(3, None, 1.0, rng) == [0.0, 0.0, 0.0]
    assert arrivals.replay([10.0, 11.0, 13.0], time_scale=2.0) == [0.0, 2.0, 6.0]


def test_length_fit_and_prompt_maker() -> None:
    fit = fit_lengths(input_ref=3000, output_ref=100, max_model_len=2048, max_tokens=50)
    assert (fit.max_input_tokens, fit.input_scale, fit.output_scale) == (1488, 1488 / 3000, 1.0)
    assert fit.input(6000) == 1488 and fit.output(80) == 50 and fit.input(0) == 1
    maker = PromptMaker("ids", 320, np.random.default_rng(0))
    assert all(80 <= t < 320 for t in maker.fresh(100))
    assert maker.block(7, 5) == maker.block(7, 5) != maker.block(8, 5)
    with pytest.raises(ValueError):
        PromptMaker("x", 320, np.random.default_rng(0))
