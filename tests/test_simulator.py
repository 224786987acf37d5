"""The simulator: the virtual clock follows the cost model exactly, replays are deterministic and fast, a big pool
never preempts and a tight one does (the same scheduler code as the real engine), the calibration fit recovers
known coefficients, and `kairos simulate` runs end to end. No model is loaded."""

from __future__ import annotations

import math
import time

import numpy as np
import orjson
import pytest

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.calibrate import GridPoint, default_grid, fit_report, scheduler_output
from engine.config import SchedulerConfig
from engine.cost_model import PRESETS, CostModel, StepShape, fit_nonnegative
from engine.protocol import SamplingParams
from engine.simulator import (
    EOS_TOKEN_ID,
    SimConfig,
    SimRequest,
    SimulatedRunner,
    VirtualClock,
    simulate,
)
from loadgen.datasets import DEFAULT_DATA_DIR

# Round numbers in binary, so sums of step costs are exact.
COST = CostModel(
    a_s=0.5, b_s_per_prefill_token=2.0**-6, c_s_per_decode=2.0**-5, d_s_per_context_token=2.0**-10
)
GREEDY = SamplingParams(temperature=0.0)


def config(num_blocks: int, block_size: int = 16, check: bool = True, **sched) -> SimConfig:
    scheduler = SchedulerConfig(block_size=block_size, **sched)
    return SimConfig(
        scheduler=scheduler, num_kv_blocks=num_blocks, max_model_len=4096, check_invariants=check
    )


def isolated_seconds(cost: CostModel, prompt: int, output: int) -> tuple[float, float]:
    """(TTFT, E2E) of one request alone whose prompt fits one step: a prefill step, then one decode per token."""
    ttft = cost.a_s + cost.b_s_per_prefill_token * prompt + cost.d_s_per_context_token * prompt
    decodes = sum(
        cost.a_s + cost.c_s_per_decode + cost.d_s_per_context_token * (prompt + k + 1)
        for k in range(output - 1)
    )
    return ttft, ttft + decodes


def test_runner_advances_the_clock_by_the_cost_model() -> None:
    clock = VirtualClock(10.0)
    runner = SimulatedRunner(COST, clock, num_kv_blocks=64, max_model_len=4096)
    output = SchedulerOutput(
        [
            ScheduledRequest("p", [5] * 10, 5, [0, 1], GREEDY, True),  # prefill chunk of 10 on a context of 5
            ScheduledRequest("q", [5] * 4, 0, [2], GREEDY, False),  # mid-prompt chunk: no sample
            ScheduledRequest("d1", [7], 20, [3, 4], GREEDY, True, 3),
            ScheduledRequest("d2", [7], 7, [5], GREEDY, True, 1),
        ]
    )
    model_output = runner.execute(output)
    pairs = (10 * 5 + 10 * 11 // 2) + 4 * 5 // 2  # causal query-key pairs of the two prefill chunks
    shape = StepShape(prefill_tokens=14, num_decode=2, sum_context=15 + 4 + 21 + 8, prefill_pairs=pairs)
    expected = 0.5 + 14 * 2.0**-6 + 2 * 2.0**-5 + 48 * 2.0**-10
    assert StepShape.of(output) == shape
    assert clock() == 10.0 + expected
    assert model_output.elapsed_seconds == expected
    assert set(model_output.sampled) == {"p", "d1", "d2"}
    assert EOS_TOKEN_ID not in model_output.sampled.values()


def test_lone_request_takes_exactly_its_cost_and_idle_time_is_skipped() -> None:
    requests = [SimRequest(0.0, 40, 6), SimRequest(1000.0, 100, 3)]  # far apart: no overlap
    result = simulate(requests, COST, config(num_blocks=64))
    for request, record in zip(requests, result.records, strict=True):
        ttft, e2e = isolated_seconds(COST, request.num_prompt_tokens, request.num_output_tokens)
        assert record.first_token_s - record.arrival_s == ttft
        assert record.finish_s - record.arrival_s == e2e
        assert len(record.token_times_s) == request.num_output_tokens
    assert result.records[1].arrival_s == 1000.0  # the clock jumped over the idle gap
    assert sum(s.seconds for s in result.steps) == pytest.approx(
        sum(isolated_seconds(COST, r.num_prompt_tokens, r.num_output_tokens)[1] for r in requests)
    )


def test_huge_pool_no_preemption_latency_is_queueing_plus_service() -> None:
    """Every request, once admitted, gets one token per step with no gap: its latency is the wait before its
    first step plus the steps it shares, and nothing is ever preempted."""
    rng = np.random.default_rng(1)
    arrivals = np.cumsum(rng.exponential(0.2, 200))
    requests = [
        SimRequest(float(t), int(rng.integers(8, 300)), int(rng.integers(1, 80))) for t in arrivals.tolist()
    ]
    result = simulate(requests, COST, config(num_blocks=20_000, check=False))  # checks are O(pool)
    assert result.num_preemptions_total == 0
    step_ends = [s.end_s for s in result.steps]
    index_of = {t: i for i, t in enumerate(step_ends)}
    for request, record in zip(requests, result.records, strict=True):
        assert record.is_done and record.num_preemptions == 0
        assert len(record.token_times_s) == request.num_output_tokens
        first = index_of[record.token_times_s[0]]
        assert record.token_times_s == step_ends[first : first + request.num_output_tokens]
        ttft, _ = isolated_seconds(COST, request.num_prompt_tokens, 1)
        assert record.first_token_s - record.arrival_s >= ttft - 1e-9  # queueing ≥ 0 on top of the prefill


def test_tight_pool_vllm_preempts_and_still_finishes_exact_lengths() -> None:
    requests = [SimRequest(0.0, 32, 64) for _ in range(8)]  # 8 × 96 tokens, a pool of 320
    result = simulate(requests, COST, config(num_blocks=20, policy="vllm"))
    assert result.num_preemptions_total > 0
    assert sum(r.num_preemptions for r in result.records) == result.num_preemptions_total
    assert all(len(r.token_times_s) == 64 and r.finish_reason == "length" for r in result.records)
    assert max(s.kv_allocated_tokens for s in result.steps) <= 320


def test_replay_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    requests = [
        SimRequest(i * 0.05, int(rng.integers(8, 200)), int(rng.integers(1, 100))) for i in range(150)
    ]
    first = simulate(requests, COST, config(num_blocks=60))
    second = simulate(requests, COST, config(num_blocks=60))
    assert first.num_preemptions_total > 0  # the run exercises preemption, not just the easy path
    assert [r.token_times_s for r in first.records] == [r.token_times_s for r in second.records]
    assert first.steps == second.steps


def test_closed_loop_request_arrives_after_its_predecessor_finishes() -> None:
    requests = [SimRequest(0.0, 16, 4), SimRequest(2.5, 16, 4, after=0)]
    result = simulate(requests, COST, config(num_blocks=64))
    assert result.records[1].arrival_s == result.records[0].finish_s + 2.5


def test_client_max_tokens_ends_by_simulated_eos_at_the_true_length() -> None:
    requests = [SimRequest(0.0, 16, 5, max_tokens=100)]
    result = simulate(requests, COST, config(num_blocks=64))
    assert result.records[0].finish_reason == "stop"
    assert len(result.records[0].token_times_s) == 5


def test_kv_reserved_is_the_ledgers_total_for_reserving_policies_only() -> None:
    requests = [SimRequest(i * 0.01, 40, 20, max_tokens=200) for i in range(10)]
    reserving = simulate(requests, COST, config(num_blocks=400, policy="reserve-max"))
    assert all(s.kv_reserved_tokens is not None for s in reserving.steps)
    # reserve-max holds prompt + client max_tokens (40 + 200) for every running request, whatever it has written
    assert all(s.kv_reserved_tokens == 240 * s.num_running >= s.kv_written_tokens for s in reserving.steps)
    plain = simulate(requests, COST, config(num_blocks=400, policy="vllm"))
    assert all(s.kv_reserved_tokens is None for s in plain.steps)


def test_two_thousand_requests_replay_in_seconds() -> None:
    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1 / 40, 2000))
    requests = [
        SimRequest(float(t), int(rng.integers(16, 1024)), int(rng.integers(1, 128)))
        for t in arrivals.tolist()
    ]
    start = time.process_time()  # CPU time: the test machine's cores are shared
    result = simulate(requests, PRESETS["h100-llama3-8b"], SimConfig())
    cpu_seconds = time.process_time() - start
    assert all(r.is_done for r in result.records)
    assert result.end_s > 40  # ~50 s of simulated traffic ...
    assert cpu_seconds < 10  # ... in a few CPU seconds


# ---- cost model and calibration fit -------------------------------------------------------------------------


def grid_shapes() -> list[StepShape]:
    return [StepShape.of(scheduler_output(p, 16)) for p in default_grid(40_000)]


def test_fit_recovers_known_coefficients_exactly() -> None:
    truth = CostModel(3e-3, 4e-5, 2e-4, 3e-7)
    shapes = grid_shapes()
    seconds = [truth.step_seconds(s) for s in shapes]
    for relative in (True, False):
        coef = fit_nonnegative(shapes, seconds, relative=relative)
        np.testing.assert_allclose(coef, truth.coefficients, rtol=1e-6)
    with_attention = CostModel(3e-3, 4e-5, 2e-4, 3e-7, e_s_per_prefill_pair=2e-9)
    seconds5 = [with_attention.step_seconds(s) for s in shapes]
    np.testing.assert_allclose(
        fit_nonnegative(shapes, seconds5, num_terms=5), with_attention.coefficients, rtol=1e-6
    )
    assert fit_nonnegative(shapes, seconds5, num_terms=4)[4] == 0.0  # the four-term fit never uses e
    coef, errors = fit_report(shapes, seconds)
    assert errors["held_out"]["r2"] == pytest.approx(1.0)
    assert errors["held_out"]["p90_rel_error"] < 1e-9


def test_fit_under_noise_stays_close_and_non_negative() -> None:
    truth = CostModel(
        3e-3, 4e-5, 2e-4, 0.0
    )  # d = 0: an unconstrained fit would go negative about half the time
    shapes = grid_shapes()
    rng = np.random.default_rng(4)
    seconds = [truth.step_seconds(s) * (1 + rng.normal(0, 0.03)) for s in shapes]
    coef = fit_nonnegative(shapes, seconds)
    assert np.all(coef >= 0)
    np.testing.assert_allclose(coef[:3], truth.coefficients[:3], rtol=0.15)


def test_grid_points_fit_their_pool_and_match_their_shape() -> None:
    for point in default_grid(8_000):
        output = scheduler_output(point, 16)
        assert StepShape.of(output).sum_context == point.sum_context <= 8_000
        used = [b for item in output.scheduled for b in item.block_ids]
        assert len(used) == len(set(used))  # disjoint block tables
    assert GridPoint("x", ((5, 3),), 2, 10).sum_context == 28


def test_cost_model_json_round_trip_and_h100_preset_is_labelled_an_assumption(tmp_path) -> None:
    preset = PRESETS["h100-llama3-8b"]
    assert preset.source.startswith("ASSUMPTION")
    assert math.isclose(preset.a_s, 16.06e9 / 3.35e12) and preset.num_kv_blocks == 28_949
    assert math.isclose(preset.d_s_per_context_token, 131072 / 3.35e12) and preset.e_s_per_prefill_pair > 0
    path = tmp_path / "cost.json"
    preset.save(path)
    assert CostModel.load(str(path)) == preset
    with pytest.raises(ValueError, match="not a preset"):
        CostModel.load(str(tmp_path / "missing.json"))


def test_rl_noise_is_seeded_log_normal_around_the_truth() -> None:
    from engine.simulate_cli import with_rl_noise

    requests = [SimRequest(0.0, 10, 200, rl_mean=200.0, rl_q=200.0)] * 2000
    noisy = with_rl_noise(requests, 0.5, np.random.default_rng(0))
    assert noisy == with_rl_noise(requests, 0.5, np.random.default_rng(0))
    ratios = np.log([r.rl_q / 200.0 for r in noisy])
    assert abs(np.median(ratios)) < 0.05 and 0.45 < ratios.std() < 0.55
    assert all(r.rl_mean == r.rl_q and r.num_output_tokens == 200 for r in noisy)


def test_cut_at_drops_late_arrivals_and_their_chains_and_reindexes() -> None:
    from engine.simulate_cli import cut_at
    from loadgen.plan import PlannedRequest

    def planned(index: int, offset: float, after: int | None = None) -> PlannedRequest:
        return PlannedRequest(index, offset, (1, 2), 2, 4, True, after=after)

    plan = [
        planned(0, 0.0),
        planned(1, 12.0),
        planned(2, 1.0, after=1),
        planned(3, 3.0),
        planned(4, 0.5, after=3),
    ]
    kept = cut_at(plan, 10.0)
    assert [(r.index, r.offset_s, r.after) for r in kept] == [(0, 0.0, None), (1, 3.0, None), (2, 0.5, 1)]
    assert cut_at(plan, None) == plan


# ---- CLI ----------------------------------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


@needs_data
def test_cli_replays_a_trace_end_to_end(tmp_path, capsys) -> None:
    from server.cli import main

    out = tmp_path / "sim.json"
    argv = [
        "simulate",
        "--workload",
        "azure-conv",
        "--num-requests",
        "60",
        "--kv-blocks",
        "1000",
        "--json",
        str(out),
    ]
    assert main([*argv, "--goodput", "ttft:1000"]) == 0
    printed = capsys.readouterr().out
    assert "SIMULATED" in printed and "h100-llama3-8b" in printed
    report = orjson.loads(out.read_bytes())
    assert report["simulated"] is True and report["workload"] == "azure-conv, SIMULATED"
    assert report["completed"] == 60 and report["num_kv_blocks"] == 1000
    assert 0 <= report["slo_attainment"] <= 1
    assert len(report["requests"]) == 60 and "num_preemptions" in report["requests"][0]
    assert report["kv"]["max_usage"] <= 1.0


@needs_data
def test_cli_rate_and_duration_and_a_cost_model_file(tmp_path, capsys) -> None:
    from engine.simulate_cli import main

    cost = tmp_path / "cost.json"
    CostModel(2e-3, 5e-5, 1e-4, 1e-7, name="test", num_kv_blocks=1000).save(cost)
    out = tmp_path / "r.json"
    argv = ["--workload", "sharegpt", "--rate", "5", "--duration", "10", "--cost-model", str(cost)]
    assert main([*argv, "--policy", "vllm", "--json", str(out)]) == 0
    report = orjson.loads(out.read_bytes())
    assert report["cost_model"] == "test" and report["num_kv_blocks"] == 1000
    assert 0 < report["num_prompts"] <= 50
    assert all(r["start_s"] < 10 for r in report["requests"])
    assert main(["--workload", "sharegpt", "--cost-model", "nope"]) == 2
    assert "not a preset" in capsys.readouterr().err
