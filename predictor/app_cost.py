"""Justitia's demand prediction: a small MLP that predicts an application's total cost at its first request.

The cost is KV token-time, Σ p·d + d²/2 over the app's requests (engine/fairness.py). At an app's first request
the server knows only the declared shape (metadata.app_type, metadata.app_num_requests, either may be missing),
the first prompt's length and that request's length tags (rl_mean, rl_q). The plain answer, and the engine's
fallback, is the sum of per-request predictions: max(n_declared, 1) · c(p₁, rl_mean₁). The MLP learns what that
sum misses: how the app's later requests differ from the first (a reduce over the maps' outputs, an agent whose
context grows call after call) and how big an undeclared app tends to be.

Where it runs: in the server, not the engine. The engine core is torch-free, and the server already tags requests
(predictor/online.py). Training uses torch (CPU); the shipped weights are JSON (predictor/models/app_cost.json,
a few KB) and serving is a numpy forward pass, so the server never imports torch. `AppCostTagger` predicts once
per app id, at its first request, and puts the same Ĉ_a on every request of the app (AddRequest.app_cost); the
engine's AppRegistry reads it when the app opens.

    python -m predictor.app_cost train -o predictor/models/app_cost.json --report docs/results/app_cost.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.fairness import request_cost
from engine.protocol import APP_TYPES
from predictor.app_cost_data import DATA_DIR, App, BinnedLengthTags, build_apps

logger = logging.getLogger(__name__)

FORMAT = "kairos-app-cost"
FORMAT_VERSION = 1
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "app_cost.json"
FEATURE_NAMES = (
    *(f"type={t or 'undeclared'}" for t in ("", *APP_TYPES)),
    "n_declared",
    "log_n_declared",
    "log_prompt_tokens",
    "log_rl_mean",
    "log_rl_q",
    "log_request_cost",
    "log_sum_baseline",
)
# Offline, the client's declaration is simulated: a share of apps declare their type, a share their size
# (agents never know their number of calls in advance).
P_DECLARE_TYPE = 0.7
P_DECLARE_SIZE = 0.5


def sum_baseline(num_declared: int, prompt_tokens: float, rl_mean: float) -> float:
    """The plain sum of per-request predictions known at the first request: n · c(p₁, r̂₁)."""
    return max(num_declared, 1) * request_cost(prompt_tokens, rl_mean)


def app_features(
    app_type: str, num_declared: int, prompt_tokens: float, rl_mean: float, rl_q: float
) -> list[float]:
    onehot = [float(app_type == t) for t in ("", *APP_TYPES)]
    return [
        *onehot,
        float(num_declared > 0),
        math.log1p(num_declared),
        math.log1p(prompt_tokens),
        math.log1p(rl_mean),
        math.log1p(rl_q),
        math.log1p(request_cost(prompt_tokens, rl_mean)),
        math.log1p(sum_baseline(num_declared, prompt_tokens, rl_mean)),
    ]


# ---- the model (numpy forward; torch only to train) ----------------------------------------------------


@dataclass
class AppCostModel:
    """x → standardize → [Linear → ReLU]* → Linear → log1p(cost), un-standardized."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W (out, in), b (out,))
    y_mean: float
    y_std: float
    y_min: float  # log1p(cost) range seen in training
    y_max: float
    info: dict

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        h = (np.atleast_2d(x) - self.mean) / self.std  # (B, F)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        # An MLP extrapolates without limit; an app outside the training range gets the nearest trained cost.
        return np.clip(h[:, 0] * self.y_std + self.y_mean, self.y_min, self.y_max)

    def predict(self, features: Sequence[float]) -> float:
        return float(np.expm1(self.predict_log(np.asarray(features, dtype=np.float64))[0]))

    def save(self, path: str | Path) -> None:
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "feature_names": list(FEATURE_NAMES),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
            "y_min": self.y_min,
            "y_max": self.y_max,
            "layers": [{"weight": w.round(6).tolist(), "bias": b.round(6).tolist()} for w, b in self.layers],
            "info": self.info,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> AppCostModel:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} model")
        if doc["feature_names"] != list(FEATURE_NAMES):
            raise ValueError(f"{path} was trained on other features: {doc['feature_names']}")
        layers = [(np.asarray(x["weight"]), np.asarray(x["bias"])) for x in doc["layers"]]
        return cls(
            np.asarray(doc["mean"]),
            np.asarray(doc["std"]),
            layers,
            doc["y_mean"],
            doc["y_std"],
            doc["y_min"],
            doc["y_max"],
            doc["info"],
        )


@dataclass(frozen=True)
class TrainParams:
    hidden: int = 32
    num_layers: int = 2
    epochs: int = 1500
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def fit(x: np.ndarray, y_log: np.ndarray, params: TrainParams = TrainParams()) -> AppCostModel:
    """Full-batch Adam on the squared error of log1p(cost), standardized: the loss weighs a 2× miss on a small
    app as much as on a large one, which is what an ordering key needs."""
    import torch  # training only: serving is numpy

    torch.manual_seed(params.seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    y_mean, y_std = float(y_log.mean()), float(y_log.std() + 1e-6)
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.tensor((y_log - y_mean) / y_std, dtype=torch.float32)
    dims = [x.shape[1], *[params.hidden] * params.num_layers, 1]
    modules: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        modules.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            modules.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*modules)
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    for _ in range(params.epochs):
        optimizer.zero_grad()
        loss = torch.mean((net(xt)[:, 0] - yt) ** 2)
        loss.backward()
        optimizer.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears]
    info = {"final_train_mse": float(loss.detach())}
    return AppCostModel(mean, std, layers, y_mean, y_std, float(y_log.min()), float(y_log.max()), info)


# ---- data → features -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppRows:
    x: np.ndarray  # (N, F)
    cost: np.ndarray  # (N,) true KV token-time
    baseline: np.ndarray  # (N,) the sum of per-request predictions at the first request
    app_types: list[str]  # the true shape (for per-shape metrics)


def app_rows(apps: list[App], tags: BinnedLengthTags, seed: int, jitter: float = 0.0) -> AppRows:
    """`jitter`: σ of a log-normal factor on the training rows' length tags. Offline tags are a function of the
    prompt length (no text), so without it the network sees rl_mean, rl_q and p move together and extrapolates
    wildly when the server's text-based tags move apart; with it, it relies on the tags only as far as they
    carry information. Never applied to test rows."""
    rng = random.Random(seed)
    xs, costs, baselines = [], [], []
    for app in apps:
        declared_type = app.app_type if rng.random() < P_DECLARE_TYPE else ""
        num_declared = app.num_requests if app.app_type != "agent" and rng.random() < P_DECLARE_SIZE else 0
        rl_mean, rl_q = tags.tag(app.first_prompt_tokens)
        if jitter > 0:
            factor = math.exp(rng.gauss(0.0, jitter))
            rl_mean, rl_q = rl_mean * factor, rl_q * factor
        xs.append(app_features(declared_type, num_declared, app.first_prompt_tokens, rl_mean, rl_q))
        costs.append(app.cost)
        baselines.append(sum_baseline(num_declared, app.first_prompt_tokens, rl_mean))
    return AppRows(np.asarray(xs), np.asarray(costs), np.asarray(baselines), [a.app_type for a in apps])


def metrics(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Errors of a cost prediction: median |log ratio| as a factor, share within 2×, Spearman ρ (the order of
    apps is what Justitia's tags use), and Σ|Ĉ − C| / ΣC (the cost-weighted error)."""
    log_ratio = np.log(np.maximum(predicted, 1.0) / np.maximum(actual, 1.0))
    rank_p, rank_a = np.argsort(np.argsort(predicted)), np.argsort(np.argsort(actual))
    spearman = float(np.corrcoef(rank_p, rank_a)[0, 1]) if len(actual) > 2 else math.nan
    return {
        "n": int(len(actual)),
        "median_error_factor": float(np.exp(np.median(np.abs(log_ratio)))),
        "within_2x": float(np.mean(np.abs(log_ratio) <= math.log(2))),
        "spearman": spearman,
        "weighted_abs_error": float(np.abs(predicted - actual).sum() / actual.sum()),
    }


def evaluate(model: AppCostModel, rows: AppRows) -> dict[str, dict[str, dict[str, float]]]:
    predicted = np.expm1(model.predict_log(rows.x))
    report = {}
    for group in ("all", "agent", "map-reduce", "self-consistency", "chat"):
        mask = np.asarray([group in ("all", t) for t in rows.app_types])
        report[group] = {
            "mlp": metrics(predicted[mask], rows.cost[mask]),
            "sum_baseline": metrics(rows.baseline[mask], rows.cost[mask]),
        }
    return report


# ---- serving -------------------------------------------------------------------------------------------


class AppCostTagger:
    """Predicts Ĉ_a at an app's first request and repeats it for the app's later requests (an LRU of app ids), so
    whichever request reaches the engine first opens the app with the same estimate. Without a model it returns
    0, which tells the engine to use the sum of per-request predictions."""

    def __init__(self, model: AppCostModel | None, max_apps: int = 100_000) -> None:
        self.model = model
        self.max_apps = max_apps
        self._apps: OrderedDict[str, float] = OrderedDict()

    def tag(
        self, app_id: str, app_type: str, num_declared: int, prompt_tokens: int, rl_mean: float, rl_q: float
    ) -> float:
        if self.model is None:
            return 0.0
        if app_id and (cost := self._apps.get(app_id)) is not None:
            self._apps.move_to_end(app_id)
            return cost
        cost = self.model.predict(app_features(app_type, num_declared, prompt_tokens, rl_mean, rl_q))
        if app_id:
            self._apps[app_id] = cost
            if len(self._apps) > self.max_apps:
                self._apps.popitem(last=False)
        return cost


def load_app_cost_tagger(path: str | Path | None) -> AppCostTagger:
    """ "default" → the shipped model; "none"/"" → off; a file that does not load → off, with a warning."""
    if str(path) == "default":
        path = DEFAULT_MODEL_PATH
    if not path or str(path).lower() == "none":
        return AppCostTagger(None)
    try:
        model = AppCostModel.load(path)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning(
            "app-cost model %s not loaded (%s): apps get the sum of request predictions", path, exc
        )
        return AppCostTagger(None)
    logger.info("app-cost model %s (%s)", path, model.info.get("trained", "?"))
    return AppCostTagger(model)


# ---- command line --------------------------------------------------------------------------------------


def train_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    train_apps = build_apps(args.data, test=False, num_synthetic=args.num_synthetic, seed=args.seed)
    test_apps = build_apps(args.data, test=True, num_synthetic=args.num_synthetic // 3, seed=args.seed + 1)
    tags = BinnedLengthTags([r for app in train_apps for r in app.requests])
    train = app_rows(train_apps, tags, args.seed, jitter=args.tag_jitter)
    test = app_rows(test_apps, tags, args.seed + 1)
    model = fit(train.x, np.log1p(train.cost), TrainParams(epochs=args.epochs, seed=args.seed))
    model.info.update(
        {
            "trained": time.strftime("%Y-%m-%d"),
            "num_train_apps": len(train_apps),
            "train_seconds": round(time.time() - started, 1),
            "command": " ".join(["python -m predictor.app_cost", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, {args.threads} thread(s)",
            "length_tags": "BinnedLengthTags (prompt-length deciles, median / q0.9) fitted on the training apps",
        }
    )
    report = {"info": model.info, "num_test_apps": len(test_apps), "test": evaluate(model, test)}
    model.save(args.output)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(markdown_table(report["test"]))
    return 0


def markdown_table(test: dict) -> str:
    lines = [
        "| apps | n | model | median error factor | within 2× | Spearman ρ | Σ|Ĉ−C| / ΣC |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, by_model in test.items():
        for name, m in by_model.items():
            lines.append(
                f"| {group} | {m['n']} | {name} | {m['median_error_factor']:.2f} | {m['within_2x']:.3f} | "
                f"{m['spearman']:.3f} | {m['weighted_abs_error']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.app_cost", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="build apps from the shared data, train, evaluate on held-out apps")
    train.add_argument("--data", type=Path, default=DATA_DIR, help="the shared data directory")
    train.add_argument("-o", "--output", type=Path, default=DEFAULT_MODEL_PATH)
    train.add_argument("--report", default="", help="write the held-out metrics here as JSON")
    train.add_argument("--num-synthetic", type=int, default=6000, help="synthetic training apps")
    train.add_argument("--epochs", type=int, default=TrainParams.epochs)
    train.add_argument("--tag-jitter", type=float, default=0.5, help="σ of log-normal noise on training tags")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return train_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
