"""predictor/app_cost.py: the MLP learns a rule the per-request sum cannot see; weights round-trip through JSON;
the server-side tagger predicts once per app; the shipped model loads."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.fairness import request_cost
from predictor.app_cost import (
    DEFAULT_MODEL_PATH,
    AppCostModel,
    AppCostTagger,
    TrainParams,
    app_features,
    fit,
    load_app_cost_tagger,
    metrics,
    sum_baseline,
)
from predictor.app_cost_data import App, BinnedLengthTags


def synthetic_rule(num_apps: int, seed: int):
    """Map-reduce apps cost 3× the sum of their requests (a reduce over long outputs), agents 10×, chat 1×."""
    rng = random.Random(seed)
    factor = {"map-reduce": 3.0, "agent": 10.0, "chat": 1.0}
    x, cost, base = [], [], []
    for _ in range(num_apps):
        app_type = rng.choice(sorted(factor))
        n = rng.choice((1, 4, 16, 64))
        p, r = rng.randint(20, 2000), rng.randint(10, 600)
        x.append(app_features(app_type, n, p, r, 2 * r))
        base.append(sum_baseline(n, p, r))
        cost.append(factor[app_type] * sum_baseline(n, p, r))
    return np.asarray(x), np.asarray(cost), np.asarray(base)


@pytest.fixture(scope="module")
def learned() -> AppCostModel:
    x, cost, _ = synthetic_rule(800, seed=0)
    return fit(x, np.log1p(cost), TrainParams(epochs=400))


def test_mlp_learns_a_rule_the_sum_baseline_misses(learned):
    x, cost, base = synthetic_rule(500, seed=1)
    predicted = np.expm1(learned.predict_log(x))
    mlp, baseline = metrics(predicted, cost), metrics(base, cost)
    assert mlp["median_error_factor"] < 1.15
    assert mlp["within_2x"] > 0.95
    assert baseline["within_2x"] < 0.5  # agents (10×) and map-reduce (3×) are outside 2×


def test_weights_round_trip_through_json(learned, tmp_path):
    path = tmp_path / "m.json"
    learned.save(path)
    loaded = AppCostModel.load(path)
    x, _, _ = synthetic_rule(20, seed=2)
    np.testing.assert_allclose(loaded.predict_log(x), learned.predict_log(x), rtol=1e-4)


def test_load_refuses_other_features(learned, tmp_path):
    path = tmp_path / "m.json"
    learned.save(path)
    path.write_text(path.read_text().replace("log_rl_q", "log_something_else"))
    with pytest.raises(ValueError, match="other features"):
        AppCostModel.load(path)


def test_tagger_predicts_once_per_app_and_is_off_without_a_model(learned):
    tagger = AppCostTagger(learned, max_apps=2)
    first = tagger.tag("app-1", "map-reduce", 16, 500, 100, 300)
    # A later request of the app (another prompt) gets the estimate made at the first request.
    assert tagger.tag("app-1", "", 0, 9000, 5, 5) == first
    assert (
        tagger.tag("", "chat", 0, 500, 100, 300) > 0
    )  # a request that is its own app: predicted, not cached
    tagger.tag("app-2", "chat", 0, 10, 10, 10)
    tagger.tag("app-3", "chat", 0, 10, 10, 10)  # evicts app-1 (least recently used)
    assert tagger.tag("app-1", "chat", 0, 10, 10, 10) != first
    assert AppCostTagger(None).tag("a", "agent", 0, 100, 10, 10) == 0.0


def test_loading_the_shipped_model_and_a_missing_one(tmp_path):
    assert load_app_cost_tagger("none").model is None
    assert load_app_cost_tagger(tmp_path / "missing.json").model is None
    tagger = load_app_cost_tagger("default")
    assert DEFAULT_MODEL_PATH.exists() and tagger.model is not None
    # Bigger declared apps are predicted to cost more.
    small = tagger.tag("", "map-reduce", 4, 544, 200, 500)
    large = tagger.tag("", "map-reduce", 64, 544, 200, 500)
    assert large > small > 0


def test_app_cost_is_the_sum_of_request_costs():
    app = App("map-reduce", 3, 100, 10, ((100, 10), (100, 20), (30, 50)))
    assert app.cost == request_cost(100, 10) + request_cost(100, 20) + request_cost(30, 50)


def test_binned_length_tags_follow_the_prompt_length():
    requests = [(p, 10) for p in range(1, 100)] + [(p, 500) for p in range(1000, 1100)]
    tags = BinnedLengthTags(requests)
    assert tags.tag(50) == (10.0, 10.0)
    assert tags.tag(1050) == (500.0, 500.0)
