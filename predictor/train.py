"""Train a LengthPredictor from JSONL.

    python -m predictor.train --data ../shared/data/sharegpt_first_turn.jsonl --prompt-field prompt \
        --target-field response_tokens -o predictor/models/sharegpt.json [--test-fraction 0.2]

Rows need the prompt text (or `source` + `id`, resolved under --prompts-dir: the ground-truth file stores ids only)
and the target length. The grouped split (dataset.SplitSpec) holds out --test-fraction for `evaluate --split test`
and --calib-fraction for the conformal calibration; the rest trains. --log adds the server's online log
(`--predictor-log`) to the data, which is how `kairos predictor refit` follows live traffic.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from predictor.buckets import BucketSpec
from predictor.dataset import Dataset, Fields, SplitSpec, load_jsonl, load_log
from predictor.features import FeatureSpec
from predictor.model import LengthPredictor, TrainParams, fit
from predictor.prompts import DEFAULT_DATA_DIR

logger = logging.getLogger(__name__)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--target-field", default="response_tokens")
    parser.add_argument("--tokens-field", default="prompt_tokens", help="prompt token count (else chars / 4)")
    parser.add_argument("--max-tokens-field", default="max_tokens")
    parser.add_argument("--model-name", default="", help="model-name feature for every row")
    parser.add_argument(
        "--group-field", default="", help="rows with equal values share a split side (base_id)"
    )
    parser.add_argument(
        "--prompts-dir", default=str(DEFAULT_DATA_DIR), help="resolves rows that store ids only"
    )


def fields_of(args: argparse.Namespace) -> Fields:
    return Fields(
        args.prompt_field, args.target_field, args.tokens_field, args.max_tokens_field, group=args.group_field
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", action="append", required=True, help="JSONL file (repeatable)")
    parser.add_argument("--log", action="append", default=[], help="online log of the server (repeatable)")
    parser.add_argument("-o", "--output", required=True)
    add_data_args(parser)
    parser.add_argument("--quantile", type=float, default=0.9)
    parser.add_argument(
        "--upper-blend",
        type=float,
        default=TrainParams.upper_blend,
        help="weight of the median model in the upper score (0 = the quantile model alone)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--calib-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--hash-dim", type=int, default=FeatureSpec.hash_dim)
    parser.add_argument("--buckets", default="linear:64", help="linear:W or pow2:MIN")
    parser.add_argument("--learning-rate", type=float, default=TrainParams.learning_rate)
    parser.add_argument("--num-leaves", type=int, default=TrainParams.num_leaves)
    parser.add_argument("--min-data-in-leaf", type=int, default=TrainParams.min_data_in_leaf)
    parser.add_argument("--feature-fraction", type=float, default=TrainParams.feature_fraction)
    parser.add_argument(
        "--upper-base",
        choices=("quantile", "mean"),
        default=TrainParams.upper_base,
        help="the upper score blends the median model with the q-quantile model or an L2 log-mean model",
    )
    parser.add_argument(
        "--censored",
        choices=("auto", "on", "off"),
        default=TrainParams.censored,
        help="the censored mixture model (P(hit max_tokens) + a log-normal body; predictor/model.py); auto = on "
        "when at least 20%% of the training rows ran to max_tokens",
    )
    parser.add_argument(
        "--knn-k", type=int, default=TrainParams.knn_k, help="nearest prompts as features; 0 = off"
    )
    parser.add_argument(
        "--prior",
        help="a model trained on another responder's lengths (e.g. ShareGPT's ChatGPT answers, on prompts not in "
        "--data): its predicted log-median becomes a feature, and it is stored inside the new model",
    )
    parser.add_argument("--threads", type=int, default=TrainParams.num_threads)
    return parser


def train(args: argparse.Namespace) -> LengthPredictor:
    prior = LengthPredictor.load(args.prior) if args.prior else None
    spec = prior.spec if prior is not None else FeatureSpec(hash_dim=args.hash_dim)
    split = SplitSpec(args.test_fraction, args.calib_fraction, args.split_seed)
    data = Dataset()
    for path in args.data:
        data.extend(load_jsonl(path, fields_of(args), spec, args.model_name, Path(args.prompts_dir)))
    for path in args.log:
        data.extend(load_log(path, spec))
    params = TrainParams(
        quantile=args.quantile,
        upper_blend=args.upper_blend,
        upper_base=args.upper_base,
        censored=args.censored,
        learning_rate=args.learning_rate,
        num_leaves=args.num_leaves,
        min_data_in_leaf=args.min_data_in_leaf,
        feature_fraction=args.feature_fraction,
        knn_k=args.knn_k,
        num_threads=args.threads,
    )
    predictor = fit(
        data.subset(split, "train"),
        data.subset(split, "calib"),
        spec,
        params,
        BucketSpec.parse(args.buckets),
        split,
        prior,
    )
    predictor.info["data"] = [str(p) for p in args.data] + [str(p) for p in args.log]
    predictor.info["prior"] = args.prior
    predictor.info["fields"] = {
        "prompt": args.prompt_field,
        "target": args.target_field,
        "group": args.group_field,
    }
    predictor.save(args.output)
    logger.info("wrote %s", args.output)
    return predictor


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
