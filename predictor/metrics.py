"""Length-prediction metrics: point accuracy and ranking of the median, coverage and cost of the upper quantile.

`reservation_ratio` = Σ upper / Σ true is the KV EcoServe reserves per token actually generated;
`over_reservation` = mean(upper / true) weighs short requests more (true is floored at 1 token).
"""

from __future__ import annotations

import numpy as np

BINS = (0, 64, 128, 256, 512)  # bins 0–64–128–256–512–∞ for bin_accuracy
BUCKET_WIDTH = 64


def _rank_corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0, 0.0  # a constant prediction ranks nothing
    return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def length_metrics(true: np.ndarray, median: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    true, median, upper = (np.asarray(a, dtype=np.float64) for a in (true, median, upper))
    spearman, kendall = _rank_corr(median, true)
    return {
        "n": int(len(true)),
        "mae": float(np.mean(np.abs(median - true))),
        "spearman": spearman,
        "kendall_tau": kendall,
        "bucket_accuracy_64": float(
            np.mean(np.floor(median / BUCKET_WIDTH) == np.floor(true / BUCKET_WIDTH))
        ),
        "bin_accuracy": float(np.mean(np.digitize(median, BINS) == np.digitize(true, BINS))),
        "coverage": float(np.mean(true <= upper)),
        "reservation_ratio": float(np.sum(upper) / max(np.sum(true), 1.0)),
        "over_reservation": float(np.mean(upper / np.maximum(true, 1.0))),
    }
