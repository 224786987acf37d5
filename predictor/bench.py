"""Per-request latency of the predictor as the server pays it: features + kNN + both boosters (LengthTagger.tag).

    python -m predictor.bench --model predictor/models/smollm2.json.gz --data ../shared/data/sharegpt_first_turn.jsonl \
        [--num 2000] [--json OUT]

Real prompts, one at a time, in file order, after a warm-up; reports p50/p90/p99/max in ms. Run it on an idle
machine: on a shared 2-core box the tail measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from predictor.online import load_tagger
from predictor.prompts import attach_prompts, read_jsonl


def bench(model: str, data: str, num: int, prompt_field: str, tokens_field: str, warmup: int = 50) -> dict:
    tagger = load_tagger(model)
    rows = attach_prompts(read_jsonl(Path(data))[: num + warmup], prompt_field)
    requests = [(r[prompt_field], int(r.get(tokens_field) or len(r[prompt_field]) // 4 or 1)) for r in rows]
    for text, num_tokens in requests[:warmup]:
        tagger.tag(text, num_tokens, 1, 1024)
    times = []
    for text, num_tokens in requests[warmup:]:
        start = time.perf_counter()
        tagger.tag(text, num_tokens, 1, 1024)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {
        "model": model,
        "data": data,
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", required=True)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--tokens-field", default="prompt_tokens")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = bench(args.model, args.data, args.num, args.prompt_field, args.tokens_field)
    print(
        f"{result['n']} requests: p50 {result['p50_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, "
        f"p99 {result['p99_ms']:.3f} ms, max {result['max_ms']:.3f} ms"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
