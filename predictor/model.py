"""LengthPredictor: two LightGBM quantile models (median and an upper quantile) with a conformal correction.

Both boosters fit log1p(length) with the pinball loss (a quantile of log1p(y) is log1p of the quantile of y).
The upper score is a blend s(x) = b·f_0.5(x) + (1−b)·f_q(x) (b = `upper_blend`, default 0.5: on ShareGPT the
median model ranks better than the q-model, and the blend reserves ~4 % less KV at the same coverage), then
tilted about its training mean c: u(x) = c + a·(s(x) − c). The slope a (`upper_slope`) is picked on the
early-stopping slice to minimise the KV reserved at the target coverage: reserving for the q-quantile of every
request is not the cheapest way to cover a share q of them; a < 1 covers short requests (cheap) more often and
long ones (expensive) less often. u is calibrated split-conformally (CQR, Romano et al. 2019, one-sided): on a
calibration split that training never saw, r_i = log1p(y_i) − u(x_i); the offset is the ⌈(n+1)q⌉-th smallest,
so P(y ≤ expm1(u(x) + offset)) ≥ q for a new exchangeable request. Predictions are clamped to the request's
max_tokens (the engine never generates more), and upper ≥ median.

**Censored targets** (`censored`, on by default when ≥ 20 % of the training rows ran to max_tokens). A small model
at temperature 1 often never stops: 52 % of SmolLM2-135M's answers hit max_tokens = 1024. Then the conditional
median *is* the cap for most prompts, the pinball-loss median booster stops after one round (a constant) and the
whole predictor collapses to the baseline. The censored model is a mixture instead:
    P(y ≥ cap | x) = p(x)                           a binary booster (`cap_booster`)
    log1p(y) | y < cap, x  ~  N(μ(x), σ²)            an L2 booster on the uncapped rows (`median_booster`), σ from
                                                     its residuals on the calibration split
    median(x) = cap if p ≥ 0.5, else the 0.5 / (1 − p) quantile of the uncapped part
and the upper score is an L2 booster on log1p(y) over *all* rows (`upper_booster`: capped rows at the cap), whose
ranking survives where the q-quantile is flat. Calibration counts what serving returns: upper = max(bound,
median), so rows whose median is already the cap are covered for free and the offset is set on the rest
(`floored_conformal_offset`).

One file holds everything: JSON metadata with both boosters as LightGBM model text (gzip'd when named *.gz). Serving calls
`Booster.predict(num_threads=1)` (reference/cpu-feasibility.md §4: 1 thread is faster for one row and leaves
the cores to the model).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from predictor.buckets import BucketSpec
from predictor.dataset import Dataset, SplitSpec
from predictor.features import (
    DENSE_NAMES,
    FEATURE_VERSION,
    FeatureRow,
    FeatureSpec,
    RequestInfo,
    extract,
    to_csr,
    to_dense,
)
from predictor.knn import KnnIndex

logger = logging.getLogger(__name__)

FORMAT = "kairos-length-predictor"
_MAX_TOKENS_COL = DENSE_NAMES.index("log_max_tokens")
# Seeds of the inner splits (early-stopping slice, kNN folds), far from any --split-seed: with equal seeds the
# inner hash equals the outer one, and every train row would fall on the same side of the inner split.
_STOP_SLICE_SALT = 1_000_003
_KNN_FOLD_SALT = 2_000_003


@dataclass(frozen=True)
class Prediction:
    median: float  # tokens; what the server puts in AddRequest.rl_mean
    upper: float  # tokens; the calibrated `quantile`-quantile, AddRequest.rl_q
    quantile: float
    bucket: int  # BucketSpec edge of `upper` (EcoServe reserves prompt + bucket)


@dataclass(frozen=True)
class TrainParams:
    quantile: float = 0.9
    upper_blend: float = 0.5  # weight of the median model in the upper score (0 = the q-model alone)
    # the other model of the upper score: "quantile" (pinball at q) or "mean" (L2 on log1p: a smooth score where
    # the q-quantile itself is flat, e.g. when most requests run to max_tokens)
    upper_base: str = "quantile"
    # "auto": the censored mixture (module docstring) when ≥ censored_share of the train rows hit max_tokens
    censored: str = "auto"  # "auto", "on", "off"
    censored_share: float = 0.2
    upper_slopes: tuple[float, ...] = (
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
        1.1,
    )  # candidates for the tilt a; (1.0,) = none
    learning_rate: float = 0.02
    num_leaves: int = 31
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.5
    lambda_l2: float = 1.0
    max_rounds: int = 3000
    early_stopping_rounds: int = 50
    num_threads: int = 2  # training only; prediction always uses 1
    seed: int = 0
    knn_k: int = 10  # nearest training prompts as features (knn.py); 0 = off
    knn_folds: int = 5  # out-of-fold kNN features for the train rows


def _clamp(median: float, upper: float, max_tokens: int) -> tuple[float, float]:
    if max_tokens > 0:
        median, upper = min(median, max_tokens), min(upper, max_tokens)
    median = max(median, 1.0)
    return median, max(upper, median)


def _max_tokens_of(row: FeatureRow) -> int:
    return int(round(math.expm1(row.dense[_MAX_TOKENS_COL])))


def conformal_offset(scores: np.ndarray, quantile: float) -> float:
    """The ⌈(n+1)q⌉-th smallest score (split conformal); +inf-safe: with too few points, the largest."""
    n = len(scores)
    if n == 0:
        return 0.0
    k = min(n, int(math.ceil((n + 1) * quantile)))
    return float(np.sort(scores)[k - 1])


def floored_conformal_offset(scores: np.ndarray, covered_anyway: np.ndarray, quantile: float) -> float:
    """Split conformal when the served bound is max(expm1(u + offset), floor): rows with y ≤ floor are covered
    whatever the offset, so the offset only has to cover enough of the others to reach ⌈(n+1)q⌉ in all."""
    n = len(scores)
    if n == 0:
        return 0.0
    need = min(n, int(math.ceil((n + 1) * quantile))) - int(np.sum(covered_anyway))
    rest = np.sort(scores[~covered_anyway])
    if need <= 0 or len(rest) == 0:
        return float(rest[0]) if len(rest) else float(np.min(scores))
    return float(rest[min(need, len(rest)) - 1])


def mixture_quantile(p_cap, mu, sigma: float, cap, level: float):
    """The `level`-quantile of y when P(y ≥ cap) = p_cap and log1p(y) | y < cap ~ N(mu, sigma²), in tokens."""
    from scipy.special import ndtri

    p_cap, mu = np.atleast_1d(np.asarray(p_cap, float)), np.atleast_1d(np.asarray(mu, float))
    cap = np.broadcast_to(np.asarray(cap, float), mu.shape)
    out = np.array(cap, dtype=float)
    need = level / np.maximum(1.0 - p_cap, 1e-9)
    below = need < 1.0
    out[below] = np.minimum(np.expm1(mu[below] + sigma * ndtri(need[below])), cap[below])
    return out


@dataclass
class LengthPredictor:
    spec: FeatureSpec
    median_booster: object  # lightgbm.Booster (lightgbm is imported lazily)
    upper_booster: object
    quantile: float
    offset: float  # conformal correction of the upper score, in log1p space
    upper_blend: float = 0.0
    upper_slope: float = 1.0
    upper_center: float = 0.0
    buckets: BucketSpec = BucketSpec()
    baseline: dict = field(default_factory=dict)  # constant-median baseline: {"median": .., "upper": ..}
    info: dict = field(default_factory=dict)  # training facts: sizes, split, rounds, calibration coverage
    knn: KnnIndex | None = None  # nearest-training-prompt features (knn.py), prepended to the row
    prior: LengthPredictor | None = (
        None  # a model of another responder (ChatGPT); its log-median is a feature
    )
    # censored mode (module docstring): P(y ≥ cap) booster, residual sd of the uncapped model, the training cap
    cap_booster: object | None = None
    sigma: float = 0.0
    cap: float = 0.0

    def design_row(self, row: FeatureRow) -> np.ndarray:
        """[1, columns]: (prior log-median,) (kNN,) then features.py's layout."""
        parts = [to_dense(row, self.spec)]
        if self.knn is not None:
            parts.insert(0, self.knn.features(row)[None, :])
        if self.prior is not None:
            parts.insert(
                0, self.prior.median_booster.predict(self.prior.design_row(row), num_threads=1)[:, None]
            )
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def design(self, rows: list[FeatureRow]):
        return _design(rows, self.spec, self.knn, prior=self.prior)

    # ---- serving ------------------------------------------------------------------------------------------

    def predict(self, request: RequestInfo) -> Prediction:
        return self.predict_row(extract(request, self.spec))

    def predict_row(self, row: FeatureRow) -> Prediction:
        x = self.design_row(row)
        median = float(self._median(x)[0])
        log_q = float(self.upper_booster.predict(x, num_threads=1)[0])
        log_upper = self.log_upper(math.log1p(median), log_q)
        median, upper = _clamp(median, math.expm1(log_upper), _max_tokens_of(row))
        return Prediction(median, upper, self.quantile, self.buckets.bucket(upper))

    def _median(self, x) -> np.ndarray:
        """Median in tokens (unclamped) for design rows x."""
        mu = self.median_booster.predict(x, num_threads=1)
        if self.cap_booster is None:
            return np.expm1(mu)
        return mixture_quantile(self.cap_booster.predict(x, num_threads=1), mu, self.sigma, self.cap, 0.5)

    def log_upper(self, log_median, log_q):
        """The calibrated upper bound in log1p space (floats or arrays)."""
        score = self.upper_blend * log_median + (1.0 - self.upper_blend) * log_q
        return self.upper_center + self.upper_slope * (score - self.upper_center) + self.offset

    # ---- batches (training, evaluation) --------------------------------------------------------------------

    def predict_many(self, rows: list[FeatureRow]) -> tuple[np.ndarray, np.ndarray]:
        """(median, upper) arrays, clamped like predict_row."""
        if not rows:
            return np.zeros(0), np.zeros(0)
        x = self.design(rows)
        median = self._median(x)
        log_q = self.upper_booster.predict(x, num_threads=1)
        upper = np.expm1(self.log_upper(np.log1p(median), log_q))
        pairs = [_clamp(m, u, _max_tokens_of(r)) for m, u, r in zip(median, upper, rows, strict=True)]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    # ---- file -----------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """JSON; gzip-compressed when the name ends in .gz (the shipped model: ~4x smaller)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_doc()).encode("utf-8")
        path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)

    def to_doc(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "spec": self.spec.to_dict(),
            "quantile": self.quantile,
            "offset": self.offset,
            "upper_blend": self.upper_blend,
            "upper_slope": self.upper_slope,
            "upper_center": self.upper_center,
            "buckets": asdict(self.buckets),
            "baseline": self.baseline,
            "info": self.info,
            "knn": self.knn.to_dict() if self.knn is not None else None,
            "prior": self.prior.to_doc() if self.prior is not None else None,
            "median_model": self.median_booster.model_to_string(),
            "upper_model": self.upper_booster.model_to_string(),
            "cap_model": self.cap_booster.model_to_string() if self.cap_booster is not None else None,
            "sigma": self.sigma,
            "cap": self.cap,
        }

    @classmethod
    def load(cls, path: str | Path) -> LengthPredictor:
        data = Path(path).read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic
            data = gzip.decompress(data)
        return cls.from_doc(json.loads(data), str(path))

    @classmethod
    def from_doc(cls, doc: dict, path: str = "model") -> LengthPredictor:
        import lightgbm as lgb

        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        if (
            doc["spec"].get("version") != FEATURE_VERSION
        ):  # features.py changed since: the trees would misread
            raise ValueError(
                f"{path}: features v{doc['spec'].get('version')}, this code computes v{FEATURE_VERSION}"
            )
        return cls(
            spec=FeatureSpec(**doc["spec"]),
            median_booster=lgb.Booster(model_str=doc["median_model"]),
            upper_booster=lgb.Booster(model_str=doc["upper_model"]),
            quantile=doc["quantile"],
            offset=doc["offset"],
            upper_blend=doc.get("upper_blend", 0.0),
            upper_slope=doc.get("upper_slope", 1.0),
            upper_center=doc.get("upper_center", 0.0),
            buckets=BucketSpec(**doc["buckets"]),
            baseline=doc["baseline"],
            info=doc["info"],
            knn=KnnIndex.from_dict(doc["knn"]) if doc.get("knn") else None,
            prior=cls.from_doc(doc["prior"], f"{path} (prior)") if doc.get("prior") else None,
            cap_booster=lgb.Booster(model_str=doc["cap_model"]) if doc.get("cap_model") else None,
            sigma=doc.get("sigma", 0.0),
            cap=doc.get("cap", 0.0),
        )


@dataclass(frozen=True)
class ConstantPredictor:
    """The fallback when no model file loads, and the evaluation baseline: the same numbers for every request.

    Defaults: upper 1024 = the SmolLM2 ground truth's 0.9-quantile (max_tokens 1024; 55 % of its answers run
    there, docs/results/predictor.md); median 256, not the ground truth's median (also 1024, which would put every
    request in one EcoServe bucket), but about ShareGPT's ChatGPT-answer median, a middle guess for unknown models.
    """

    median: float = 256.0
    upper: float = 1024.0
    quantile: float = 0.9
    buckets: BucketSpec = BucketSpec()

    def predict(self, request: RequestInfo) -> Prediction:
        median, upper = _clamp(self.median, self.upper, request.max_tokens)
        return Prediction(median, upper, self.quantile, self.buckets.bucket(upper))


# ---- training --------------------------------------------------------------------------------------------------


def _booster(
    train_x, train_y, valid_x, valid_y, alpha: float | None, params: TrainParams, binary: bool = False
):
    """alpha: the quantile to fit (pinball loss); None = the mean (L2); binary: P(label = 1) (log loss)."""
    import lightgbm as lgb

    if binary:
        objective = {"objective": "binary"}
    else:
        objective = (
            {"objective": "regression"} if alpha is None else {"objective": "quantile", "alpha": alpha}
        )
    lgb_params = {
        **objective,
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "min_data_in_leaf": params.min_data_in_leaf,
        "feature_fraction": params.feature_fraction,
        "lambda_l2": params.lambda_l2,
        "num_threads": params.num_threads,
        "seed": params.seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbose": -1,
    }
    train_set = lgb.Dataset(train_x, train_y, free_raw_data=False)
    valid_set = lgb.Dataset(valid_x, valid_y, reference=train_set)
    callbacks = [lgb.early_stopping(params.early_stopping_rounds, verbose=False)]
    return lgb.train(lgb_params, train_set, params.max_rounds, valid_sets=[valid_set], callbacks=callbacks)


def _design(
    rows: list[FeatureRow],
    spec: FeatureSpec,
    knn: KnnIndex | None,
    knn_features: np.ndarray | None = None,
    prior: LengthPredictor | None = None,
):
    """[len(rows), columns] CSR, laid out as design_row: (prior,) (kNN,) then features.py's layout."""
    from scipy.sparse import csr_matrix, hstack

    parts = [to_csr(rows, spec)]
    if knn is not None:
        parts.insert(0, csr_matrix(knn.features_many(rows) if knn_features is None else knn_features))
    if prior is not None:
        parts.insert(0, csr_matrix(prior.median_booster.predict(prior.design(rows), num_threads=1)[:, None]))
    return parts[0] if len(parts) == 1 else hstack(parts).tocsr()


def _out_of_fold_knn(train: Dataset, spec: FeatureSpec, params: TrainParams) -> np.ndarray:
    """kNN features of each train row from an index over the other folds (grouped), never from itself."""
    out = np.zeros((len(train), 4))
    folds = np.array(
        [SplitSpec(seed=_KNN_FOLD_SALT + params.seed).fold(key, params.knn_folds) for key in train.keys]
    )
    log_y = np.log1p(train.y)
    for f in range(params.knn_folds):
        inside, outside = np.where(folds == f)[0], np.where(folds != f)[0]
        if len(inside) == 0 or len(outside) == 0:
            continue
        index = KnnIndex.build([train.rows[i] for i in outside], log_y[outside], spec.hash_dim, params.knn_k)
        out[inside] = index.features_many([train.rows[i] for i in inside])
    return out


def _cheapest_slope(score: np.ndarray, log_y: np.ndarray, center: float, params: TrainParams) -> float:
    """The tilt whose conformally calibrated bound reserves the fewest tokens on these rows."""

    def cost(slope: float) -> float:
        tilted = center + slope * (score - center)
        return float(np.sum(np.expm1(tilted + conformal_offset(log_y - tilted, params.quantile))))

    return min(params.upper_slopes, key=cost) if len(score) else 1.0


def fit(
    train: Dataset,
    calib: Dataset,
    spec: FeatureSpec,
    params: TrainParams | None = None,
    buckets: BucketSpec | None = None,
    split: SplitSpec | None = None,
    prior: LengthPredictor | None = None,
) -> LengthPredictor:
    """Fit both quantile models on `train` (early stopping on a grouped 15 % slice of it), then calibrate the
    upper score on `calib`. With params.knn_k > 0 the kNN index holds every train row; train rows get their
    kNN features out of fold, calibration rows from the full index (exactly what serving will see)."""
    params = params or TrainParams()
    buckets = buckets or BucketSpec()
    knn = KnnIndex.build(train.rows, np.log1p(train.y), spec.hash_dim, params.knn_k) if params.knn_k else None
    if prior is not None and prior.spec != spec:
        raise ValueError(f"the prior computes features {prior.spec}, this model {spec}")
    train_x = _design(train.rows, spec, knn, _out_of_fold_knn(train, spec, params) if knn else None, prior)
    train_y = np.log1p(train.y)
    inner = SplitSpec(test_fraction=0.0, calib_fraction=0.15, seed=_STOP_SLICE_SALT + params.seed)
    is_stop = np.array([inner.part(key) == "calib" for key in train.keys], dtype=bool)
    if is_stop.all() or not is_stop.any():  # too few rows to hold some out: stop on the training rows
        fit_rows = stop_rows = np.arange(len(train))
    else:
        fit_rows, stop_rows = np.where(~is_stop)[0], np.where(is_stop)[0]
    fx, fy, sx, sy = train_x[fit_rows], train_y[fit_rows], train_x[stop_rows], train_y[stop_rows]
    caps = np.array([_max_tokens_of(r) for r in train.rows], dtype=float)
    is_capped = (caps > 0) & (train.y >= caps)
    censored = params.censored == "on" or (
        params.censored == "auto" and bool(np.mean(is_capped) >= params.censored_share)
    )
    if params.upper_base not in ("quantile", "mean"):
        raise ValueError(f"upper_base must be 'quantile' or 'mean', got {params.upper_base!r}")
    cap_booster, sigma, cap = None, 0.0, 0.0
    cx, cy = _design(calib.rows, spec, knn, prior=prior), np.log1p(calib.y)
    calib_caps = np.array([_max_tokens_of(r) for r in calib.rows], dtype=float)
    if censored:
        # mixture: P(cap) + log-normal body on the uncapped rows; upper score = L2 on every row (docstring)
        fc, sc_ = is_capped[fit_rows], is_capped[stop_rows]
        cap_booster = _booster(fx, fc.astype(float), sx, sc_.astype(float), None, params, binary=True)
        median_booster = _booster(
            fx[np.where(~fc)[0]], fy[~fc], sx[np.where(~sc_)[0]], sy[~sc_], None, params
        )
        upper_booster = _booster(fx, fy, sx, sy, None, params)
        calib_uncapped = np.where(~((calib_caps > 0) & (calib.y >= calib_caps)))[0]
        resid = cy[calib_uncapped] - median_booster.predict(cx[calib_uncapped], num_threads=1)
        sigma = float(np.std(resid)) if len(resid) > 1 else 1.0
        cap = float(np.median(caps[is_capped])) if is_capped.any() else float(np.max(caps))
        blend = 0.0
    else:
        median_booster = _booster(fx, fy, sx, sy, 0.5, params)
        upper_alpha = params.quantile if params.upper_base == "quantile" else None
        upper_booster = _booster(fx, fy, sx, sy, upper_alpha, params)
        blend = params.upper_blend

    def median_tokens(x) -> np.ndarray:
        mu = median_booster.predict(x, num_threads=1)
        if cap_booster is None:
            return np.expm1(mu)
        return mixture_quantile(cap_booster.predict(x, num_threads=1), mu, sigma, cap, 0.5)

    def score(x) -> np.ndarray:
        return blend * np.log1p(median_tokens(x)) + (1 - blend) * upper_booster.predict(x, num_threads=1)

    center = float(np.mean(score(fx)))
    slope = _cheapest_slope(score(sx), sy, center, params)
    tilted = center + slope * (score(cx) - center)
    # what serving returns is max(bound, median), both clamped to max_tokens: a row already covered by its
    # (clamped) median needs no offset
    floor = np.log1p(np.minimum(median_tokens(cx), np.where(calib_caps > 0, calib_caps, np.inf)))
    offset = floored_conformal_offset(cy - tilted, cy <= floor + 1e-9, params.quantile)
    all_y = np.concatenate([train.y, calib.y])
    predictor = LengthPredictor(
        spec=spec,
        median_booster=median_booster,
        upper_booster=upper_booster,
        quantile=params.quantile,
        offset=offset,
        upper_blend=blend,
        upper_slope=slope,
        upper_center=center,
        buckets=buckets,
        baseline={"median": float(np.median(all_y)), "upper": float(np.quantile(all_y, params.quantile))},
        info={
            "num_train": len(train),
            "num_calib": len(calib),
            "rounds_median": median_booster.best_iteration or median_booster.current_iteration(),
            "rounds_upper": upper_booster.best_iteration or upper_booster.current_iteration(),
            "calib_coverage": float(np.mean((cy <= tilted + offset) | (cy <= floor + 1e-9)))
            if len(calib)
            else None,
            "censored": censored,
            "split": asdict(split) if split else None,
            "params": asdict(params),
        },
        knn=knn,
        prior=prior,
        cap_booster=cap_booster,
        sigma=sigma,
        cap=cap,
    )
    logger.info(
        "trained on %d rows (%d rounds median, %d upper), slope %.2f, calibrated on %d: offset %.3f (x%.2f)",
        len(train),
        predictor.info["rounds_median"],
        predictor.info["rounds_upper"],
        slope,
        len(calib),
        offset,
        math.exp(offset),
    )
    return predictor
