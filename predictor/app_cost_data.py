"""Applications for the app-cost model (predictor/app_cost.py): real agent sessions and synthetic task-parallel apps.

An `App` is what the server knows at the app's first request (declared type and size, the first prompt's length,
that request's length tags) and what the app really cost (Σ p·d + d²/2 over its requests). Sources, all from
../shared/data (data/GUIDE.md):

  agent             agent_sessions_lmcache.csv: every recorded session, real per-call prompt and output tokens
  self-consistency  alpaca_eval_outputs.jsonl: one instruction sampled k times; each sample's length is one of the
                    ten real model outputs for that instruction (drawn with replacement)
  map-reduce        k map calls over chunks of a document (chunk of 256-1024 tokens + a 32-token instruction),
                    each answered with a real ShareGPT response length, then one reduce call whose prompt is the
                    maps' outputs; its answer is another ShareGPT length. The shape is synthetic, the lengths real.
  chat              one ShareGPT first turn (k = 1)

k ∈ {1, 4, 16, 64} for the task-parallel shapes. Rows are split into train / test *before* apps are built
(`sha1("app-cost:" + key) % 4 == 0` → test), so a test app never reuses a training prompt or session.
The per-request length tags are a prompt-length-binned quantile model fitted on the training requests
(`BinnedLengthTags`): the shipped LightGBM model needs prompt text, which the agent sessions do not have.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from engine.fairness import request_cost

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PARALLEL_WIDTHS = (1, 4, 16, 64)
INSTRUCTION_TOKENS = 32


@dataclass(frozen=True)
class App:
    app_type: str  # the true shape; whether the client declared it is decided when features are built
    num_requests: int
    first_prompt_tokens: int
    first_output_tokens: int
    requests: tuple[tuple[int, int], ...]  # (prompt tokens, output tokens) per request

    @property
    def cost(self) -> float:
        return sum(request_cost(p, d) for p, d in self.requests)


def is_test(key: str) -> bool:
    # Salted: the shared files are already the side of the data guide's own sha1(key) % 4 split that was shared.
    return int(hashlib.sha1(f"app-cost:{key}".encode()).hexdigest(), 16) % 4 == 0


def _app(app_type: str, requests: list[tuple[int, int]]) -> App:
    return App(app_type, len(requests), requests[0][0], requests[0][1], tuple(requests))


def agent_apps(data_dir: Path, test: bool) -> list[App]:
    sessions: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    with open(data_dir / "agent_sessions_lmcache.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["app"], row["session_id"])
            sessions[key].append((int(row["call_idx"]), int(row["input_tokens"]), int(row["output_tokens"])))
    return [
        _app("agent", [(max(p, 1), d) for _, p, d in sorted(calls)])
        for (app, session), calls in sorted(sessions.items())
        if is_test(f"{app}/{session}") == test
    ]


def alpaca_lengths(data_dir: Path, test: bool) -> list[tuple[int, list[int]]]:
    """(instruction tokens, the ten models' output lengths) per instruction on one side of the split."""
    by_prompt: dict[int, tuple[int, list[int]]] = {}
    with open(data_dir / "alpaca_eval_outputs.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if is_test(str(row["prompt_id"])) != test:
                continue
            entry = by_prompt.setdefault(row["prompt_id"], (int(row["instruction_tokens"]), []))
            entry[1].append(int(row["output_tokens"]))
    return list(by_prompt.values())


def sharegpt_lengths(data_dir: Path, test: bool) -> list[tuple[int, int]]:
    """(prompt tokens, response tokens) of ShareGPT first turns on one side of the split (grouped by base_id)."""
    rows = []
    with open(data_dir / "sharegpt_first_turn.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if is_test(row["base_id"]) == test and row["prompt_tokens"] > 0:
                rows.append((int(row["prompt_tokens"]), int(row["response_tokens"])))
    return rows


def synthetic_apps(data_dir: Path, test: bool, num_apps: int, seed: int) -> list[App]:
    rng = random.Random(seed)
    alpaca = alpaca_lengths(data_dir, test)
    sharegpt = sharegpt_lengths(data_dir, test)
    apps = []
    for i in range(num_apps):
        shape = ("self-consistency", "map-reduce", "chat")[i % 3]
        k = rng.choice(PARALLEL_WIDTHS)
        if shape == "self-consistency":
            prompt, outputs = rng.choice(alpaca)
            apps.append(_app(shape, [(prompt, rng.choice(outputs)) for _ in range(k)]))
        elif shape == "map-reduce":
            chunk = rng.choice((256, 512, 1024))
            maps = [(chunk + INSTRUCTION_TOKENS, rng.choice(sharegpt)[1]) for _ in range(k)]
            reduce_prompt = sum(d for _, d in maps) + INSTRUCTION_TOKENS
            apps.append(_app(shape, [*maps, (reduce_prompt, rng.choice(sharegpt)[1])]))
        else:
            apps.append(_app(shape, [rng.choice(sharegpt)]))
    return apps


def build_apps(data_dir: Path, test: bool, num_synthetic: int, seed: int) -> list[App]:
    return agent_apps(data_dir, test) + synthetic_apps(data_dir, test, num_synthetic, seed)


class BinnedLengthTags:
    """A per-request length predictor from the prompt length alone: the median and q-quantile of the output length
    within deciles of log prompt length, fitted on training requests. Stands in for rl_mean / rl_q when building
    app features offline; the same tags feed the MLP and the sum baseline, so the comparison is like for like."""

    def __init__(self, requests: list[tuple[int, int]], quantile: float = 0.9, num_bins: int = 10) -> None:
        prompts = sorted(p for p, _ in requests)
        self.edges = [prompts[len(prompts) * i // num_bins] for i in range(1, num_bins)]
        bins: dict[int, list[int]] = defaultdict(list)
        for p, d in requests:
            bins[bisect.bisect_right(self.edges, p)].append(d)
        self.median = {b: _quantile(ds, 0.5) for b, ds in bins.items()}
        self.upper = {b: _quantile(ds, quantile) for b, ds in bins.items()}

    def tag(self, prompt_tokens: int) -> tuple[float, float]:
        b = bisect.bisect_right(self.edges, prompt_tokens)
        return self.median.get(b, 256.0), self.upper.get(b, 1024.0)


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])
