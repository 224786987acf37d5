"""Ground truth for the length predictor: what the served model really generates for real prompts.

Runs our own engine offline (`build_engine_core`, one big batch) on a seeded random sample of ShareGPT first turns
and AlpacaEval instructions, with the model's chat template, its default sampling (temperature 1, top_p 1: the
generation_config has no sampling fields, so the OpenAI/vLLM defaults apply), a fixed seed per prompt and
max_tokens 1024. Each finished request is appended to the JSONL at once (ids and counts only, no text), and a
rerun skips ids already there, so a cut-off run keeps what it did.

A run cut off early has finished its short requests and not its long ones, so its rows are biased short.
`--finalize RAW` keeps only the longest prefix of the seeded sample order in which every prompt finished (or was
skipped as too long): a uniform random sample again, whatever the cut-off. `--max-order N` queues only the first N
prompts, so a last pass drains instead of being cut off.

Restarting is safe only if the engine draws the same tokens for the same seed. When the engine changed in between
(another sampler, other kernels), an unfinished prompt gets a fresh trajectory, i.e. a second chance to stop early,
while the earlier run kept only its short finishers: that biases the rows short. Then delete the earlier run's
rows and let the new engine redraw those prompts too (docs/results/predictor.md: it happened once).

    python -m predictor.groundtruth --out /tmp/smollm2_lengths.raw.jsonl --max-num-seqs 128
    python -m predictor.groundtruth --finalize /tmp/smollm2_lengths.raw.jsonl --out predictor/data/smollm2_lengths.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import time
from pathlib import Path

from predictor.prompts import DEFAULT_DATA_DIR, Prompt, load_alpaca, load_sharegpt

logger = logging.getLogger(__name__)


def prompt_seed(prompt: Prompt, base_seed: int) -> int:
    digest = hashlib.sha1(f"{base_seed}:{prompt.source}:{prompt.id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**31 - 1)


def sample_prompts(data_dir: Path, num_sharegpt: int, num_alpaca: int, seed: int) -> list[Prompt]:
    """A seeded random sample of each source, interleaved by a seeded shuffle (never shortest-first), so a run
    cut off early still has the chosen mix."""
    rng = random.Random(seed)
    sharegpt = load_sharegpt(data_dir)
    alpaca = load_alpaca(data_dir)
    chosen = rng.sample(sharegpt, min(num_sharegpt, len(sharegpt))) + rng.sample(
        alpaca, min(num_alpaca, len(alpaca))
    )
    rng.shuffle(chosen)
    return chosen


def done_ids(out: Path) -> set[tuple[str, str]]:
    if not out.exists():
        return set()
    with open(out, encoding="utf-8") as f:
        return {(row["source"], row["id"]) for row in map(json.loads, filter(str.strip, f))}


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_prior_data(args: argparse.Namespace) -> None:
    """ShareGPT rows (ChatGPT lengths) whose prompt text is not in the ground-truth sample: training data for a
    `--prior` model that never saw the prompts it will describe (predictor/train.py)."""
    from predictor.dataset import group_key
    from predictor.prompts import SHAREGPT_FILE

    sample = sample_prompts(Path(args.data_dir), args.num_sharegpt, args.num_alpaca, args.seed)
    taken = {group_key(p.text) for p in sample}
    num_kept = 0
    with open(Path(args.data_dir) / SHAREGPT_FILE, encoding="utf-8") as f, open(args.out, "w") as out:
        for line in f:
            if group_key(json.loads(line)["prompt"]) not in taken:
                out.write(line)
                num_kept += 1
    logger.info("%d ShareGPT rows outside the sample written to %s", num_kept, args.out)


def finalize(args: argparse.Namespace) -> None:
    from engine.model_store import resolve_model
    from server.schema import Message
    from server.tokenizer import Tokenizer

    done: dict[tuple[str, str], dict] = {}
    for row in read_rows(Path(args.finalize)):
        done.setdefault((row["source"], row["id"]), row)  # a restarted run may have written a row twice
    tokenizer = Tokenizer.load(resolve_model(args.model))
    sample = sample_prompts(Path(args.data_dir), args.num_sharegpt, args.num_alpaca, args.seed)
    kept, num_skipped = [], 0
    for order, prompt in enumerate(sample):
        if (row := done.get((prompt.source, prompt.id))) is not None:
            kept.append({**row, "order": order})
        elif len(tokenizer.encode_chat([Message(role="user", content=prompt.text)])) > args.max_prompt_tokens:
            num_skipped += 1
        else:
            break  # the first prompt that did not finish ends the unbiased prefix
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    lengths = sorted(row["output_tokens"] for row in kept)
    num_length = sum(row["finish_reason"] == "length" for row in kept)
    logger.info(
        "%d of %d finished rows form the complete prefix (%d sampled prompts in it skipped as too long); "
        "%d finished beyond it dropped; output tokens median %d, mean %.0f; %d hit max_tokens",
        len(kept),
        len(done),
        num_skipped,
        len(done) - len(kept),
        lengths[len(lengths) // 2] if lengths else 0,
        sum(lengths) / max(len(lengths), 1),
        num_length,
    )


def run(args: argparse.Namespace) -> None:
    from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_size
    from engine.core import build_engine_core
    from engine.model_store import resolve_model
    from engine.protocol import AddRequest, SamplingParams
    from server.schema import Message
    from server.tokenizer import Tokenizer

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    already = done_ids(out)
    sample = sample_prompts(Path(args.data_dir), args.num_sharegpt, args.num_alpaca, args.seed)
    prompts = [
        (order, p)
        for order, p in enumerate(sample)
        if (p.source, p.id) not in already and order < args.max_order
    ]
    logger.info("%d prompts to run (%d already in %s)", len(prompts), len(already), out)
    tokenizer = Tokenizer.load(resolve_model(args.model))
    config = EngineConfig(
        model=ModelConfig(model=args.model),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
        ),
        device=DeviceConfig(
            device="cpu", kv_cache_memory=parse_size(args.kv_cache_memory), num_threads=args.threads
        ),
    )
    core = build_engine_core(config)
    meta: dict[str, dict] = {}
    num_skipped = 0
    for order, prompt in prompts:
        ids = tokenizer.encode_chat([Message(role="user", content=prompt.text)])
        if len(ids) > args.max_prompt_tokens:
            num_skipped += 1
            continue
        seed = prompt_seed(prompt, args.seed)
        request_id = f"gt-{order}"
        meta[request_id] = {
            "id": prompt.id,
            "source": prompt.source,
            "order": order,
            "prompt_tokens": len(ids),
            "seed": seed,
        }
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=seed
        )
        core.add_request(AddRequest(request_id, ids, sampling, arrival_time=time.time()))
    logger.info(
        "queued %d, skipped %d prompts over %d tokens", len(meta), num_skipped, args.max_prompt_tokens
    )

    num_tokens: dict[str, int] = {}
    num_done = num_gen = 0
    start = last_log = time.time()
    with open(out, "a", encoding="utf-8") as f:
        while core.has_work():
            for delta in core.step():
                num_tokens[delta.request_id] = num_tokens.get(delta.request_id, 0) + len(delta.token_ids)
                num_gen += len(delta.token_ids)
                if delta.finish_reason is None:
                    continue
                row = {
                    **meta[delta.request_id],
                    "output_tokens": num_tokens.pop(delta.request_id, 0),
                    "finish_reason": delta.finish_reason.openai_name,
                    "max_tokens": args.max_tokens,
                    "temperature": args.temperature,
                    "top_p": args.top_p,
                    "model": args.model,
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                num_done += 1
            if (now := time.time()) - last_log >= args.log_every:
                last_log = now
                rate = num_done / (now - start)
                eta = (len(meta) - num_done) / rate if rate > 0 else float("inf")
                logger.info(
                    "%d/%d done, %d tokens (%.1f tok/s), %.2f req/s, ETA %.0f min, KV %.0f%%",
                    num_done,
                    len(meta),
                    num_gen,
                    num_gen / (now - start),
                    rate,
                    eta / 60,
                    100 * core.stats().kv_usage,
                )
    logger.info("finished %d requests in %.1f min", num_done, (time.time() - start) / 60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--num-sharegpt", type=int, default=1900)
    parser.add_argument("--num-alpaca", type=int, default=616)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=1536)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--kv-cache-memory", default="5GiB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=float, default=30.0)
    parser.add_argument(
        "--max-order",
        type=int,
        default=10**9,
        help="queue only the first N prompts of the sample order: a last pass that drains, so the prefix is whole",
    )
    parser.add_argument(
        "--finalize", metavar="RAW", help="write RAW's complete-prefix rows to --out, then exit"
    )
    parser.add_argument(
        "--prior-data", action="store_true", help="write ShareGPT rows outside the sample to --out, then exit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prior_data:
        write_prior_data(args)
    elif args.finalize:
        finalize(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
