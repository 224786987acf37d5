"""The naive baseline: the throughput client's prompts through HF transformers `generate`, static batches.

Same prompt selection as loadgen/throughput.py, chat template applied, batches of 32 in selection order, left padding,
greedy, exactly --max-tokens new tokens each (min_new_tokens = max_new_tokens, i.e. EOS ignored), fp32 on CPU.
No server, no streaming: it reports wall time and output tokens/s only.

    python -m loadgen.hf_reference --model ~/.cache/kairos/smollm2-135m-instruct --json hf.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from loadgen.throughput import DEFAULT_DATA_DIR, select_prompts

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "kairos" / "smollm2-135m-instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="HF dir (config.json + safetensors)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--min-prompt-tokens", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--label", default="hf-reference")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = select_prompts(
        args.data, args.num_prompts, args.min_prompt_tokens, args.max_prompt_tokens, args.seed
    )
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t_load
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]

    batches = []
    total_in = total_out = 0
    t0 = time.perf_counter()
    for start in range(0, len(texts), args.batch_size):
        enc = tokenizer(
            texts[start : start + args.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        tb = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - tb
        num_in = int(enc["attention_mask"].sum())
        # min_new_tokens == max_new_tokens: every row gets exactly max_tokens new tokens
        num_out = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        total_in += num_in
        total_out += num_out
        batches.append(
            {
                "size": out.shape[0],
                "padded_len": enc["input_ids"].shape[1],
                "input_tokens": num_in,
                "output_tokens": num_out,
                "seconds": elapsed,
            }
        )
        print(
            f"batch {len(batches)}: {out.shape[0]} x (pad to {enc['input_ids'].shape[1]}) -> {num_out} tok in "
            f"{elapsed:.1f} s ({num_out / elapsed:.1f} tok/s)",
            flush=True,
        )
    duration = time.perf_counter() - t0

    summary = {
        "label": args.label,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": "hf-generate-static",
        "model_id": str(args.model),
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model_load_s": load_s,
        "duration": duration,
        "completed": len(prompts),
        "failed": 0,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(prompts) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "batches": batches,
        "argv": sys.argv,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    print(
        f"{args.label}: {len(prompts)} prompts, {total_out} output tokens in {duration:.1f} s -> "
        f"{summary['output_throughput']:.1f} output tok/s, {summary['total_token_throughput']:.1f} total tok/s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


if __name__ == "__main__":
    main()
