"""A synthetic length dataset with a known rule, for the predictor tests.

Length ≈ (400 if the prompt asks for an "essay" else 40) + 2 × its word count, times lognormal noise (σ 0.3):
a keyword and the prompt length carry all the signal.
"""

from __future__ import annotations

import random

from predictor.dataset import Dataset, group_key
from predictor.features import FeatureSpec, RequestInfo, extract

WORDS = "the a of cat dog river blue write about small quick tell me please short story".split()


def synth_prompt(rng: random.Random, essay: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 60))]
    words.insert(rng.randint(0, len(words)), "essay" if essay else "line")
    return " ".join(words)


def true_length(prompt: str) -> float:
    return (400.0 if "essay" in prompt.split() else 40.0) + 2.0 * len(prompt.split())


def synth_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = synth_prompt(rng, essay=rng.random() < 0.5)
        length = max(1, round(true_length(prompt) * rng.lognormvariate(0.0, 0.3)))
        rows.append(
            {
                "id": f"s{seed}-{i}",
                "prompt": prompt,
                "prompt_tokens": len(prompt.split()),
                "response_tokens": length,
            }
        )
    return rows


def synth_dataset(n: int, seed: int, spec: FeatureSpec) -> Dataset:
    data = Dataset()
    for row in synth_rows(n, seed):
        data.rows.append(extract(RequestInfo(row["prompt"], row["prompt_tokens"]), spec))
        data.targets.append(float(row["response_tokens"]))
        data.keys.append(group_key(row["prompt"]) + row["id"])
    return data
