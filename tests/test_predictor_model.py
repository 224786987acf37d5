"""predictor/model.py on a synthetic dataset with a known length rule (tests/predictor_synth.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from predictor_synth import synth_dataset, synth_prompt, true_length

from predictor.features import FeatureSpec, RequestInfo
from predictor.metrics import length_metrics
from predictor.model import ConstantPredictor, LengthPredictor, TrainParams, conformal_offset, fit

SPEC = FeatureSpec(hash_dim=256)
PARAMS = TrainParams(learning_rate=0.1, max_rounds=300, early_stopping_rounds=20, num_threads=1)


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return fit(synth_dataset(1500, seed=1, spec=SPEC), synth_dataset(800, seed=2, spec=SPEC), SPEC, PARAMS)


def test_recovers_the_length_rule(predictor):
    rng = random.Random(7)
    for essay in (True, False):
        prompts = [synth_prompt(rng, essay) for _ in range(200)]
        preds = [predictor.predict(RequestInfo(p, len(p.split()))) for p in prompts]
        ratios = [pred.median / true_length(p) for pred, p in zip(preds, prompts, strict=True)]
        assert 0.8 < np.median(ratios) < 1.25  # the median model follows the rule, keyword and length
        assert all(pred.median <= pred.upper for pred in preds)
    test = synth_dataset(1000, seed=3, spec=SPEC)
    median, upper = predictor.predict_many(test.rows)
    metrics = length_metrics(test.y, median, upper)
    assert metrics["kendall_tau"] > 0.6
    assert metrics["mae"] < 0.5 * np.mean(np.abs(test.y - np.median(test.y)))


def test_conformal_calibration_hits_the_target_coverage(predictor):
    test = synth_dataset(3000, seed=4, spec=SPEC)
    _, upper = predictor.predict_many(test.rows)
    assert np.mean(test.y <= upper) == pytest.approx(0.9, abs=0.025)


def test_conformal_offset_is_the_finite_sample_quantile():
    scores = np.arange(1.0, 20.0)  # n = 19: ceil(20 * 0.9) = 18th smallest
    assert conformal_offset(scores, 0.9) == 18.0
    assert conformal_offset(np.array([3.0]), 0.9) == 3.0
    assert conformal_offset(np.array([]), 0.9) == 0.0


def test_max_tokens_clamps_both_predictions(predictor):
    pred = predictor.predict(RequestInfo("write a long essay " * 5, 20, max_tokens=30))
    assert pred.median <= 30 and pred.upper <= 30 and pred.bucket == 64


@pytest.mark.parametrize("name", ["model.json", "model.json.gz"])
def test_save_load_round_trip(predictor, tmp_path, name):
    path = tmp_path / name
    predictor.save(path)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    loaded = LengthPredictor.load(path)
    test = synth_dataset(50, seed=5, spec=SPEC)
    for a, b in zip(predictor.predict_many(test.rows), loaded.predict_many(test.rows), strict=True):
        np.testing.assert_allclose(a, b)
    info = RequestInfo("an essay", 2)
    assert loaded.predict(info) == predictor.predict(info)
    assert loaded.spec == SPEC and loaded.baseline == predictor.baseline


def test_load_rejects_other_files_and_other_feature_versions(predictor, tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError):
        LengthPredictor.load(tmp_path / "x.json")
    predictor.save(tmp_path / "old.json")
    doc = json.loads((tmp_path / "old.json").read_text())
    doc["spec"]["version"] -= 1
    (tmp_path / "old.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="features v"):
        LengthPredictor.load(tmp_path / "old.json")


def test_constant_predictor_is_clamped():
    const = ConstantPredictor(median=256, upper=1024)
    assert const.predict(RequestInfo("x", 1)).upper == 1024
    small = const.predict(RequestInfo("x", 1, max_tokens=100))
    assert (small.median, small.upper, small.bucket) == (100, 100, 128)


def test_a_prior_model_feeds_its_prediction_and_travels_in_the_file(predictor, tmp_path):
    # The "served model" answers 3x shorter than the prior's responder: the prior's log-median is its best feature.
    train, calib = synth_dataset(600, seed=6, spec=SPEC), synth_dataset(300, seed=7, spec=SPEC)
    for data in (train, calib):
        data.targets = [max(1.0, t / 3) for t in data.targets]
    child = fit(train, calib, SPEC, PARAMS, prior=predictor)
    assert child.design_row(train.rows[0]).shape[1] == child.design(train.rows[:2]).shape[1]
    child.save(tmp_path / "child.json")
    loaded = LengthPredictor.load(tmp_path / "child.json")
    assert loaded.prior is not None and loaded.prior.offset == predictor.offset
    info = RequestInfo("write an essay about the river", 6)
    assert loaded.predict(info) == child.predict(info)
    assert child.predict(info).median == pytest.approx(predictor.predict(info).median / 3, rel=0.35)
    with pytest.raises(ValueError, match="prior computes features"):
        fit(
            synth_dataset(100, 8, FeatureSpec(hash_dim=128)),
            synth_dataset(50, 9, FeatureSpec(hash_dim=128)),
            FeatureSpec(hash_dim=128),
            PARAMS,
            prior=predictor,
        )


def test_upper_score_from_the_mean_model_is_calibrated_too():
    params = TrainParams(
        learning_rate=0.1,
        max_rounds=300,
        early_stopping_rounds=20,
        num_threads=1,
        upper_base="mean",
        upper_blend=0.0,
    )
    model = fit(synth_dataset(1500, seed=1, spec=SPEC), synth_dataset(800, seed=2, spec=SPEC), SPEC, params)
    test = synth_dataset(3000, seed=4, spec=SPEC)
    _, upper = model.predict_many(test.rows)
    assert np.mean(test.y <= upper) == pytest.approx(0.9, abs=0.025)
    with pytest.raises(ValueError, match="upper_base"):
        fit(synth_dataset(100, 1, SPEC), synth_dataset(50, 2, SPEC), SPEC, TrainParams(upper_base="max"))


def _capped_dataset(n: int, seed: int, cap: int):
    """The synthetic rule with every request capped at max_tokens = cap: "essay" prompts (≥ 400 tokens) always
    run to the cap, "line" prompts (~40-160) almost never: the SmolLM2 situation in miniature."""
    from predictor_synth import synth_rows

    from predictor.dataset import Dataset, group_key
    from predictor.features import extract

    data = Dataset()
    for row in synth_rows(n, seed):
        info = RequestInfo(row["prompt"], row["prompt_tokens"], max_tokens=cap)
        data.rows.append(extract(info, SPEC))
        data.targets.append(float(min(row["response_tokens"], cap)))
        data.keys.append(group_key(row["prompt"]) + row["id"])
    return data


def test_censored_targets_get_the_mixture_model_and_stay_calibrated(tmp_path):
    cap = 300
    model = fit(_capped_dataset(1500, 1, cap), _capped_dataset(800, 2, cap), SPEC, PARAMS)
    assert model.info["censored"] and model.cap == cap and model.cap_booster is not None
    test = _capped_dataset(3000, 4, cap)
    median, upper = model.predict_many(test.rows)
    assert np.mean(test.y <= upper) == pytest.approx(0.9, abs=0.03)
    assert np.all(median <= upper) and np.all(upper <= cap)
    rng = random.Random(9)
    for essay in (True, False):
        prompts = [synth_prompt(rng, essay) for _ in range(100)]
        preds = [model.predict(RequestInfo(p, len(p.split()), max_tokens=cap)) for p in prompts]
        if essay:  # P(cap) ≈ 1: the median is the cap
            assert np.median([p.median for p in preds]) == cap
        else:  # P(cap) ≈ 0: the body model follows the rule
            ratios = [pred.median / true_length(p) for pred, p in zip(preds, prompts, strict=True)]
            assert 0.75 < np.median(ratios) < 1.3
    metrics = length_metrics(test.y, median, upper)
    assert metrics["kendall_tau"] > 0.5
    path = tmp_path / "censored.json.gz"
    model.save(path)
    again = LengthPredictor.load(path)
    assert np.allclose(again.predict_many(test.rows[:50])[0], median[:50])
    # --censored off keeps the plain pinball-loss pair, and the floored calibration still holds its coverage
    plain = fit(
        _capped_dataset(1500, 1, cap),
        _capped_dataset(800, 2, cap),
        SPEC,
        TrainParams(**{**PARAMS.__dict__, "censored": "off"}),
    )
    assert not plain.info["censored"] and plain.cap_booster is None
    assert np.mean(test.y <= plain.predict_many(test.rows)[1]) == pytest.approx(0.9, abs=0.03)


def test_floored_conformal_offset_counts_rows_the_floor_covers():
    from predictor.model import floored_conformal_offset

    scores = np.arange(1.0, 11.0)  # n = 10: ceil(11 * 0.9) = 10 rows must be covered
    assert floored_conformal_offset(scores, np.zeros(10, dtype=bool), 0.9) == 10.0
    covered = np.array([False] * 5 + [True] * 5)  # the floor covers 5: the offset covers the other 5
    assert floored_conformal_offset(scores, covered, 0.9) == 5.0
    assert floored_conformal_offset(scores, np.ones(10, dtype=bool), 0.9) == 1.0


def test_mixture_quantile():
    from scipy.stats import norm

    from predictor.model import mixture_quantile

    # p = 0: the plain log-normal median; p ≥ 0.5: the cap; p = 0.5 − ε … the upper tail of the body
    assert mixture_quantile(0.0, np.log1p(99.0), 0.5, 1000, 0.5)[0] == pytest.approx(99.0)
    assert mixture_quantile(0.6, np.log1p(99.0), 0.5, 1000, 0.5)[0] == 1000
    expected = np.expm1(np.log1p(99.0) + 0.5 * norm.ppf(0.5 / 0.8))
    assert mixture_quantile(0.2, np.log1p(99.0), 0.5, 1000, 0.5)[0] == pytest.approx(expected)
