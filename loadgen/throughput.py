"""Throughput client: ShareGPT prompts -> an OpenAI-compatible /v1/chat/completions, streamed, timed.

HTTP only (httpx + asyncio + orjson + numpy); it imports nothing of Kairos, so the same client measures every peer.
Timing follows `vllm bench serve` (reference/serving-anchors.md §2.3): TTFT at the first `data:` chunk with non-empty
`choices`, ITL between successive such chunks, E2E at the last chunk, TPOT = (e2e - ttft) / (output_tokens - 1), output
tokens from the usage chunk. The JSON uses `vllm bench serve`'s field names.

    python -m loadgen.throughput --base-url http://127.0.0.1:8000 --model default --label kairos --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import orjson

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAREGPT_FILE = "sharegpt_first_turn.jsonl"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    prompt_tokens: int  # SmolLM2 tokens of the raw text (the file's field), chat template not included


def select_prompts(
    data_dir: Path = DEFAULT_DATA_DIR,
    num_prompts: int = 128,
    min_prompt_tokens: int = 16,
    max_prompt_tokens: int = 512,
    seed: int = 0,
) -> list[Prompt]:
    """A seeded sample of distinct ShareGPT first-turn prompts with min <= prompt_tokens <= max.

    Duplicate texts ("hi" x38) are dropped first so that a prefix cache can't turn a repeat into a free prefill.
    """
    path = Path(data_dir)
    path = path / SHAREGPT_FILE if path.is_dir() else path
    seen: set[str] = set()
    eligible: list[Prompt] = []
    with path.open("rb") as f:
        for line in f:
            row = orjson.loads(line)
            if not (min_prompt_tokens <= row["prompt_tokens"] <= max_prompt_tokens) or row["prompt"] in seen:
                continue
            seen.add(row["prompt"])
            eligible.append(Prompt(row["id"], row["prompt"], row["prompt_tokens"]))
    if num_prompts > len(eligible):
        raise ValueError(f"asked for {num_prompts} prompts, only {len(eligible)} eligible in {path}")
    # A permutation prefix, so that a smaller --num-prompts is a subset of a larger one with the same seed.
    order = np.random.default_rng(seed).permutation(len(eligible))
    return [eligible[i] for i in order[:num_prompts]]


@dataclass
class RequestResult:
    prompt_tokens: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # s
    e2e: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, gaps between chunks with choices
    start: float = 0.0  # s since the benchmark start
    error: str = ""
    usage_seen: bool = False


def build_body(args: argparse.Namespace, prompt: Prompt, max_tokens: int) -> dict:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": prompt.text}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "ignore_eos": not args.no_ignore_eos,
    }
    if args.max_tokens_field in ("max_completion_tokens", "both"):
        body["max_completion_tokens"] = max_tokens
    if args.max_tokens_field in ("max_tokens", "both"):
        body["max_tokens"] = max_tokens
    return body


async def send_one(
    client: httpx.AsyncClient, url: str, body: dict, prompt: Prompt, t0: float
) -> RequestResult:
    result = RequestResult(prompt_tokens=prompt.prompt_tokens)
    num_chunks = 0
    st = time.perf_counter()
    result.start = st - t0
    last = st
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line or line.startswith(":"):
                    continue  # blank separators and SSE comments (keep-alives)
                data = line.removeprefix("data:").strip()
                if data.startswith("[DONE]"):
                    break
                now = time.perf_counter()
                chunk = orjson.loads(data)
                if err := chunk.get("error"):
                    result.error = f"stream error: {err}"
                    return result
                if chunk.get("choices"):
                    if num_chunks == 0:
                        result.ttft = now - st
                    else:
                        result.itl.append(now - last)
                    num_chunks += 1
                if usage := chunk.get("usage"):
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
                    result.usage_seen = True
                last = now
        result.e2e = last - st
        # No usage chunk: one token per chunk is the best guess (vllm bench serve would retokenize the text).
        if not result.usage_seen:
            result.output_tokens = num_chunks
        result.success = num_chunks > 0
        if not result.success:
            result.error = "no chunk with choices"
    except (httpx.HTTPError, orjson.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def arrival_delays(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Inter-arrival gaps in s: all zero for rate=inf, else Gamma(burstiness) with mean 1/rate (1.0 = Poisson)."""
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    return list(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num))


async def run_benchmark(args: argparse.Namespace, prompts: list[Prompt]) -> tuple[list[RequestResult], float]:
    url = args.base_url.rstrip("/") + args.endpoint
    # httpx caps a client at 100 connections by default, which would queue part of a 128-request burst client-side.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=None, write=30.0, pool=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        for _ in range(args.warmup):
            warm = await send_one(
                client, url, build_body(args, prompts[0], min(16, args.max_tokens)), prompts[0], 0
            )
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(prompt: Prompt, t0: float) -> RequestResult:
            body = build_body(args, prompt, args.max_tokens)
            if semaphore is None:
                return await send_one(client, url, body, prompt, t0)
            async with semaphore:
                return await send_one(client, url, body, prompt, t0)

        tasks = []
        t0 = time.perf_counter()
        for prompt, delay in zip(
            prompts, arrival_delays(len(prompts), args.request_rate, args.burstiness, args.seed), strict=True
        ):
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(prompt, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return list(results), duration


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    out.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def _tpot(r: RequestResult) -> float:
    """s per output token after the first; 0 for a one-token answer."""
    return (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def summarize(args: argparse.Namespace, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.success]
    tpots = [_tpot(r) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = [
        r for r in ok if r.ttft * 1000 <= args.goodput_ttft_ms and _tpot(r) * 1000 <= args.goodput_tpot_ms
    ]
    summary = {
        "label": args.label,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": "openai-chat",
        "base_url": args.base_url,
        "model_id": args.model,
        "num_prompts": len(results),
        "max_tokens": args.max_tokens,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "seed": args.seed,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "usage_reported": all(r.usage_seen for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "goodput_slo": {"ttft_ms": args.goodput_ttft_ms, "tpot_ms": args.goodput_tpot_ms},
        "goodput_completed": len(good),
        "request_goodput": len(good) / duration,
    }
    summary.update(_stats("ttft", [r.ttft for r in ok]))
    summary.update(_stats("tpot", tpots))
    summary.update(_stats("itl", itls))
    summary.update(_stats("e2el", [r.e2e for r in ok]))
    summary.update(
        {
            "input_lens": [r.prompt_tokens for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results],
            "e2els": [r.e2e for r in results],
            "starts": [r.start for r in results],
            "errors": [r.error for r in results],
            "client": {"python": platform.python_version(), "argv": sys.argv},
        }
    )
    if args.save_detailed:
        summary["itls"] = [r.itl for r in results]
    return summary


def format_table(s: dict) -> str:
    lines = [f"{' Serving Benchmark Result (' + s['label'] + ') ':=^60}"]

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<45}{value:>15.2f}" if isinstance(value, float) else f"{name:<45}{value!s:>15}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Request rate (req/s):", s["request_rate"])
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    row(
        f"Goodput (TTFT<={s['goodput_slo']['ttft_ms']:.0f}ms, TPOT<={s['goodput_slo']['tpot_ms']:.0f}ms):",
        f"{s['goodput_completed']}/{s['num_prompts']}",
    )
    for metric, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{title:-^60}")
        row(f"Mean {metric.upper()} (ms):", s[f"mean_{metric}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {metric.upper()} (ms):", s[f"p{p}_{metric}_ms"])
    lines.append("=" * 60)
    if errors := [e for e in s["errors"] if e]:
        lines.append(f"first error ({len(errors)} in all): {errors[0]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--model", default="default", help="the `model` field sent to the server")
    p.add_argument("--label", default="server", help="name of this run in the table and JSON")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA_DIR, help=f"dir holding {SHAREGPT_FILE}, or the file"
    )
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--min-prompt-tokens", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument(
        "--max-tokens-field", choices=("max_completion_tokens", "max_tokens", "both"), default="both"
    )
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-at-once", action="store_true", help="send every request at t=0 (the default)")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s with Gamma arrivals; inf = all at once"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of the arrivals; 1.0 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=0, help="0 = unlimited")
    p.add_argument("--warmup", type=int, default=1, help="short requests sent (one at a time) before timing")
    p.add_argument("--goodput-ttft-ms", type=float, default=2000.0)
    p.add_argument("--goodput-tpot-ms", type=float, default=100.0)
    p.add_argument("--api-key", default="")
    p.add_argument("--json", type=Path, help="write the summary (vllm bench serve field names) here")
    p.add_argument("--save-detailed", action="store_true", help="also store every request's ITLs in the JSON")
    args = p.parse_args(argv)
    if args.all_at_once:
        args.request_rate = math.inf
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    prompts = select_prompts(
        args.data, args.num_prompts, args.min_prompt_tokens, args.max_prompt_tokens, args.seed
    )
    results, duration = asyncio.run(run_benchmark(args, prompts))
    summary = summarize(args, results, duration)
    print(format_table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["failed"] == 0 else 1)
