"""The real default model (SmolLM2-135M-Instruct, fp32): our runner's greedy output equals HF generate.

Prepares the model into the cache on first use (~30 s); later runs load it in ~1 s.
"""

from __future__ import annotations

import pytest
import torch

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, ModelConfig
from engine.model_store import resolve_model
from engine.protocol import SamplingParams
from engine.runner import ModelRunner

pytestmark = pytest.mark.e2e

NUM_NEW = 64
BLOCK_SIZE = 16
PROMPTS = [
    "What is the capital of France? Answer in one sentence, then tell me one fact about it.",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a ten-year-old.",
]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("default")


def test_greedy_matches_hf_generate(model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in PROMPTS
    ]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            # An explicit attention mask: otherwise generate masks every pad-id (= <|im_end|>) in the chat prompt.
            input_ids = torch.tensor([ids])
            out = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NUM_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            expected.append(out[0, len(ids) :].tolist())
    del hf

    runner = ModelRunner(
        ModelConfig(model=str(model_dir)),
        DeviceConfig(device="cpu", kv_cache_memory=64 * 2**20),
        BLOCK_SIZE,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_NEW)
    # Blocks handed out back to front, interleaved between requests, so tables are non-contiguous.
    free = list(range(runner.num_kv_blocks))[::-1]
    tables: list[list[int]] = [[] for _ in prompts]
    tokens = [list(p) for p in prompts]
    start = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    while any(len(o) < NUM_NEW for o in outputs):
        scheduled = []
        for i in range(len(prompts)):
            if len(outputs[i]) >= NUM_NEW:
                continue
            end = len(tokens[i])
            while len(tables[i]) * BLOCK_SIZE < end:
                tables[i].append(free.pop())
            scheduled.append(
                ScheduledRequest(
                    f"r{i}", tokens[i][start[i] :], start[i], list(tables[i]), greedy, True, len(outputs[i])
                )
            )
        sampled = runner.execute(SchedulerOutput(scheduled=scheduled)).sampled
        for r in scheduled:
            i = int(r.request_id[1:])
            start[i] = r.context_len
            tokens[i].append(sampled[r.request_id])
            outputs[i].append(sampled[r.request_id])
    for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert got == want, f"prompt {i}: {tokenizer.decode(got)!r} != {tokenizer.decode(want)!r}"
    assert runner.eos_token_ids == (2,)
    assert "Paris" in tokenizer.decode(outputs[0])
