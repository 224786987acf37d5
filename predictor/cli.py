"""`kairos predictor ...`: train, evaluate, refit from the server's online log, and the latency benchmark.

    kairos predictor refit --log /var/log/kairos/lengths.jsonl -o predictor/models/refit.json
        [--base predictor/data/smollm2_lengths.jsonl] [train.py options]

refit = train on the base data (ground truth of the served model) plus every logged request; the logged rows
carry feature vectors, not text (their split group is a hash of the vector). Pass `--prior` again if the model
being replaced had one (docs/results/predictor.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BASE = Path(__file__).resolve().parent / "data" / "smollm2_lengths.jsonl"


def refit(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kairos predictor refit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log", action="append", required=True, help="the server's --predictor-log (repeatable)"
    )
    parser.add_argument("--base", action="append", default=None, help=f"base data (default {DEFAULT_BASE})")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--target-field", default="output_tokens")
    args, rest = parser.parse_known_args(argv)
    from predictor.train import main as train_main

    train_argv = ["-o", args.output, "--target-field", args.target_field]
    for path in args.base or [str(DEFAULT_BASE)]:
        train_argv += ["--data", path]
    for path in args.log:
        train_argv += ["--log", path]
    train_main(train_argv + list(rest))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "predictor.train", "evaluate": "predictor.evaluate", "bench": "predictor.bench"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*commands, "refit"):
        print("usage: kairos predictor {train,evaluate,refit,bench} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "refit":
        return refit(rest)
    import importlib

    importlib.import_module(commands[command]).main(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
