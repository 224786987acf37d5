"""E1 (loadgen/experiment_ecoserve.py): the --quick simulator part end to end, its summary rules, and the two
engine-side pieces it reads (the stand-in predictor's coverage, the KV gauges in EngineStats.extra)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from engine.simulator import SimRequest
from loadgen.datasets import DEFAULT_DATA_DIR
from loadgen.experiment_ecoserve_report import BEGIN, END, max_rate_under

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


@needs_data
def test_quick_sim_part_writes_rows_summary_plot_and_markdown(tmp_path) -> None:
    from loadgen.cli import main

    out, md = tmp_path / "ecoserve", tmp_path / "ecoserve.md"
    md.write_text(f"# E1\n\nkept above\n\n{BEGIN}\nold\n{END}\n\nkept below\n")
    argv = ["experiment", "ecoserve", "--part", "sim", "--quick", "--sim-variants", "vllm", "ecoserve"]
    assert main([*argv, "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0

    result = orjson.loads((out / "sim.json").read_bytes())
    rows = result["rows"]
    assert {(r["workload"], r["variant"], r["rate"]) for r in rows} == {
        (w, v, rate)
        for w, rates in (("sharegpt", (16.0, 32.0)), ("azure-conv", (16.0,)))
        for v in ("vllm", "ecoserve")
        for rate in rates
    }
    for row in rows:
        assert row["completed"] == row["num_requests"] == 120
        assert 0.0 <= row["slo_attainment"] <= 1.0 and row["p90_norm_latency_ms"] > 0
        assert row["command"].startswith("kairos simulate --workload")
        # the ledger reports reservations, vllm has none; the ledger never writes past the pool
        assert (row["kv_mean_reserved_tokens"] is None) == (row["variant"] == "vllm")
        assert row["kv_mean_written_tokens"] <= row["kv_pool_tokens"]
    assert not list((tmp_path / "work" / "sim").rglob("*.json"))  # raw per-point reports are not kept
    summary = result["summary"]
    assert set(summary) == {"sharegpt", "azure-conv"}
    assert summary["sharegpt"]["vllm"]["ratio_to_vllm"] in (None, 1.0)
    assert result["cost_model"]["name"] == "h100-llama3-8b" and result["meta"]["quick"] is True
    assert (out / "sim.png").stat().st_size > 0

    text = md.read_text()
    assert text.startswith("# E1\n\nkept above") and text.endswith("kept below\n") and "old" not in text
    assert "#### sharegpt" in text and "| ecoserve |" in text and "ecoserve/sim.png" in text


def test_max_rate_is_the_last_rate_before_the_first_miss() -> None:
    def point(latency: float | None) -> dict:
        return {"p90_norm_latency_ms": latency, "completed": 1}

    curve = {8.0: point(10.0), 12.0: point(40.0), 16.0: point(90.0), 20.0: point(30.0)}
    assert max_rate_under(curve, 50.0) == 12.0  # 20 passes again, but after a miss: not counted
    assert max_rate_under(curve, 5.0) is None
    assert max_rate_under({8.0: point(None)}, 50.0) is None


def test_stand_in_predictor_covers_the_asked_share() -> None:
    from engine.simulate_cli import with_rl_noise
    from loadgen.experiment_ecoserve import STANDIN_COVERAGE, STANDIN_SIGMA

    requests = [SimRequest(0.0, 10, 200, rl_mean=200.0, rl_q=200.0)] * 4000
    tagged = with_rl_noise(requests, STANDIN_SIGMA, np.random.default_rng(0), STANDIN_COVERAGE)
    coverage = np.mean([r.rl_q >= 200 for r in tagged])
    ratio = np.mean([r.rl_q / 200 for r in tagged])
    assert abs(coverage - 0.9) < 0.02 and 1.75 < ratio < 1.92  # predictor.md: coverage 0.891, ratio 1.835
    assert abs(np.median([np.log(r.rl_mean / 200) for r in tagged])) < 0.03  # the median tag stays unbiased


def test_engine_stats_carry_written_and_reserved_kv_tokens() -> None:
    from engine.config import EngineConfig, SchedulerConfig
    from engine.core import EngineCore, build_scheduler
    from engine.protocol import AddRequest, SamplingParams
    from tests.fake_runner import FakeRunner

    for policy, has_ledger in (("ecoserve", True), ("vllm", False)):
        runner = FakeRunner(num_kv_blocks=64, block_size=16)
        core = EngineCore(
            build_scheduler(EngineConfig(scheduler=SchedulerConfig(policy=policy)), runner), runner
        )
        sampling = SamplingParams(max_tokens=100, ignore_eos=True)
        core.add_request(AddRequest("a", list(range(3, 23)), sampling, 0.0, rl_mean=40.0, rl_q=40.0))
        core.step()
        extra = core.stats().extra
        assert extra["kv_written_tokens"] == 20.0  # the prompt, prefilled in one step
        assert ("kv_reserved_tokens" in extra) == has_ledger
        if has_ledger:
            assert extra["kv_reserved_tokens"] == 20 + 64  # prompt + bucket(rl_q 40) at width 64
