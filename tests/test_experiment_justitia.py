"""E3: the fluid fair reference against hand-worked cases, and `kairos bench experiment justitia --quick` end to end
(the simulated part: four policies, metrics, JSON, tables and plot)."""

from __future__ import annotations

import math

import orjson
import pytest

from loadgen.experiment_justitia import POLICIES, app_metrics, main
from loadgen.fluid import FluidRequest, fluid_finish, water_fill


def test_water_fill_gives_capped_apps_their_cap_and_splits_the_rest():
    assert water_fill({"a": 1.0, "b": 10.0, "c": 10.0}, 9.0) == {"a": 1.0, "b": 4.0, "c": 4.0}


def test_a_lone_request_runs_at_its_own_decode_pace():
    """c = 10·10 + 50 = 150; capped at c / (d·t_tok) = 150 / (10·0.1) = 150/s: done after d·t_tok = 1 s."""
    finish = fluid_finish([FluidRequest("a", 2.0, 10, 10)], service_rate=1e6, token_seconds=0.1)
    assert finish["a"] == pytest.approx(3.0)


def test_two_equal_apps_share_the_server_and_a_late_small_one_finishes_early():
    """Server rate 100/s. Apps a and b of cost 150 each from t=0: 50/s each, both done at t=3. A small app c
    (cost 1·1 + 0.5 = 1.5) arriving at t=1 takes a third until it leaves at t=1.045; a and b finish later."""
    requests = [FluidRequest("a", 0.0, 10, 10), FluidRequest("b", 0.0, 10, 10)]
    alone = fluid_finish(requests, service_rate=100.0, token_seconds=1e-6)
    assert alone == {"a": pytest.approx(3.0), "b": pytest.approx(3.0)}
    finish = fluid_finish([*requests, FluidRequest("c", 1.0, 1, 1)], service_rate=100.0, token_seconds=1e-6)
    assert finish["c"] == pytest.approx(1.0 + 1.5 / (100 / 3))
    assert finish["a"] == pytest.approx(3.015)


def test_app_metrics_slowdown_is_one_when_the_run_matches_the_reference():
    rows = [
        {
            "status": "ok",
            "app_id": "a",
            "tenant": "t",
            "start_s": 0.0,
            "end_s": 3.0,
            "prompt_tokens": 10,
            "output_tokens": 10,
        },
        {
            "status": "ok",
            "app_id": "b",
            "tenant": "t",
            "start_s": 0.0,
            "end_s": 6.0,
            "prompt_tokens": 10,
            "output_tokens": 10,
        },
    ]
    m = app_metrics(rows, service_rate=100.0, token_seconds=1e-6)
    assert m["per_app"]["a"]["slowdown"] == pytest.approx(1.0)
    assert m["max_slowdown"] == pytest.approx(2.0)
    assert m["jain_apps"] == pytest.approx((1 + 0.5) ** 2 / (2 * (1 + 0.25)))


def test_quick_experiment_writes_every_policy(tmp_path):
    assert main(["--quick", "--out-dir", str(tmp_path)]) == 0
    doc = orjson.loads((tmp_path / "quick.json").read_bytes())
    rows = doc["results"]["simulated quick"]
    assert [m["policy"] for m in rows] == list(POLICIES)
    for m in rows:
        assert m["num_apps"] > 5 and m["num_failed"] == 0
        assert m["max_slowdown"] >= m["p99_slowdown"] > 0
        assert 0 < m["jain_apps"] <= 1
        assert all(math.isfinite(a["act_s"]) and a["act_s"] > 0 for a in m["per_app"].values())
    assert "| justitia |" in (tmp_path / "quick-tables.md").read_text()
    assert (tmp_path / "quick-act.png").stat().st_size > 1000
