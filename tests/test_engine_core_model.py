"""The whole engine core on a real model: scheduler + block manager + ModelRunner (tiny random Llama and Qwen2),
against Hugging Face `generate`. Ten ragged prompts served concurrently, some sharing a prefix with earlier ones
(prefix-cache hits), in a KV pool too small for all of them (recompute preemptions); greedy output must equal
HF's token for token for 64 tokens, invariants hold after every step, and every block comes back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.protocol import AddRequest, FinishReason, SamplingParams
from engine.runner import ModelRunner

BLOCK_SIZE = 4
NUM_BLOCKS = 120  # the ten requests need ~240 blocks at once: preemption is certain
NUM_NEW = 64
BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers x (k, v) x tokens x KV heads x head_dim x fp32


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


def hf_greedy(hf_model, prompt: list[int], num_new: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=num_new,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def test_engine_core_matches_hf_with_prefix_hits_and_preemption(model_dir: Path) -> None:
    device = DeviceConfig(device="cpu", kv_cache_memory=NUM_BLOCKS * BYTES_PER_BLOCK)
    runner = ModelRunner(ModelConfig(model=str(model_dir)), device, BLOCK_SIZE)
    config = EngineConfig(scheduler=SchedulerConfig(block_size=BLOCK_SIZE, max_num_batched_tokens=64))
    core = EngineCore(build_scheduler(config, runner), runner, check_invariants=True)
    rng = random.Random(11)
    first_wave = [[rng.randrange(3, 320) for _ in range(n)] for n in (5, 17, 1, 30, 44, 9)]
    # Second wave: long shared prefixes of first-wave prompts plus a new tail, sent once those prefixes are cached.
    second_wave = [
        first_wave[3][:24] + [7, 8, 9],
        first_wave[4][:40] + [11],
        first_wave[4][:41],
        first_wave[1] + [5],
    ]
    greedy = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, FinishReason] = {}
    prompts = {f"a{i}": p for i, p in enumerate(first_wave)} | {f"b{i}": p for i, p in enumerate(second_wave)}
    for i, prompt in enumerate(first_wave):
        core.add_request(AddRequest(f"a{i}", prompt, greedy, arrival_time=float(i)))
    steps = 0
    while core.has_work():
        if steps == 8:
            for i, prompt in enumerate(second_wave):
                core.add_request(AddRequest(f"b{i}", prompt, greedy, arrival_time=100.0 + i))
        for delta in core.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finish_reason is not None:
                reasons[delta.request_id] = delta.finish_reason
        steps += 1
        assert steps < 5000

    stats = core.stats()
    assert stats.num_preemptions_total > 0, "the pool was meant to force a preemption"
    assert stats.prefix_cache_hits_total > 0, "the second wave was meant to hit the prefix cache"
    assert stats.num_free_blocks == NUM_BLOCKS
    assert set(reasons.values()) == {FinishReason.LENGTH}
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for request_id, prompt in prompts.items():
        assert outputs[request_id] == hf_greedy(hf_model, prompt, NUM_NEW), request_id
