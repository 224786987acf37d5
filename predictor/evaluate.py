"""Evaluate a LengthPredictor on JSONL, next to the constant-median baseline (the training data's median and
upper quantile for every request).

    python -m predictor.evaluate --model predictor/models/sharegpt.json \
        --data ../shared/data/sharegpt_first_turn.jsonl --prompt-field prompt --target-field response_tokens \
        [--split test] [--json OUT]

--split test (or calib, train) keeps the rows the model's own grouped split put there (the split is stored in the
model file), i.e. prompts it never trained on; the default `all` evaluates every row (a file it never saw).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from predictor.dataset import SplitSpec, load_jsonl
from predictor.metrics import length_metrics
from predictor.model import LengthPredictor
from predictor.train import add_data_args, fields_of

logger = logging.getLogger(__name__)

COLUMNS = (
    "n",
    "mae",
    "spearman",
    "kendall_tau",
    "bucket_accuracy_64",
    "bin_accuracy",
    "coverage",
    "reservation_ratio",
    "over_reservation",
)


def evaluate(args: argparse.Namespace) -> dict:
    predictor = LengthPredictor.load(args.model)
    fields = fields_of(args)
    if args.split != "all" and not fields.group:  # the model's own split needs its own groups
        fields = dataclasses.replace(fields, group=predictor.info.get("fields", {}).get("group", ""))
    data = load_jsonl(args.data, fields, predictor.spec, args.model_name, Path(args.prompts_dir))
    if args.split != "all":
        if not predictor.info.get("split"):
            raise SystemExit(f"{args.model} stores no split; use --split all")
        data = data.subset(SplitSpec(**predictor.info["split"]), args.split)
    if len(data) == 0:
        raise SystemExit("no rows to evaluate")
    median, upper = predictor.predict_many(data.rows)
    result = length_metrics(data.y, median, upper)
    n = len(data)
    base = predictor.baseline
    result["baseline"] = length_metrics(data.y, np.full(n, base["median"]), np.full(n, base["upper"]))
    result["quantile"] = predictor.quantile
    result["split"] = args.split
    result["model"] = str(args.model)
    result["data"] = str(args.data)
    return result


def table(result: dict) -> str:
    lines = ["| metric | predictor | constant baseline |", "|---|---|---|"]
    for key in COLUMNS:
        a, b = result[key], result["baseline"][key]
        fmt = "{:d}" if key == "n" else "{:.3f}"
        lines.append(f"| {key} | {fmt.format(a)} | {fmt.format(b)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    add_data_args(parser)
    parser.add_argument("--split", choices=("all", "test", "calib", "train"), default="all")
    parser.add_argument("--json", help="write the metrics here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = evaluate(args)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
