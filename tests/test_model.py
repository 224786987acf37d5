"""Our forward pass against Hugging Face transformers: logits, ragged varlen steps, greedy generation.

Tiny random Llama and Qwen2 (q/k/v bias) checkpoints, fp32, with the default decode attention
(the C kernel on CPU); tests/test_reference_kernels.py checks every backend against the reference.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, ModelConfig
from engine.protocol import SamplingParams
from engine.runner import ModelRunner, build_forward_batch

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)
BLOCK_SIZE = 4  # small, so requests span many non-contiguous blocks


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_runner(model_dir: Path, num_blocks: int = 512, decode_backend: str = "auto") -> ModelRunner:
    bytes_per_block = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4  # layers x (k, v) x tokens x KV heads x head_dim x fp32
    config = DeviceConfig(device="cpu", kv_cache_memory=num_blocks * bytes_per_block)
    runner = ModelRunner(ModelConfig(model=str(model_dir)), config, BLOCK_SIZE, decode_backend)
    assert runner.num_kv_blocks == num_blocks
    return runner


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:  # [len, V]
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0]


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 320) for _ in range(n)]


class BlockPool:
    """A shuffled free list, so block tables are non-contiguous and out of order."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        while len(table) * BLOCK_SIZE < num_tokens:
            table.append(self.free.pop())
        return table


def all_logits(runner: ModelRunner, scheduled: list[ScheduledRequest]) -> list[torch.Tensor]:
    """Run one step through the model and return every row's logits, split per request (in input order)."""
    prefills = [r for r in scheduled if r.num_tokens > 1]
    decodes = [r for r in scheduled if r.num_tokens == 1]
    batch = build_forward_batch(prefills, decodes, runner.block_size, runner.device)
    batch.logits_indices = torch.arange(len(batch.token_ids))
    with torch.inference_mode():
        logits = runner.model(batch, runner.kv_cache)
    rows = iter(logits.split([r.num_tokens for r in prefills + decodes]))
    by_id = {r.request_id: next(rows) for r in prefills + decodes}
    return [by_id[r.request_id] for r in scheduled]


def test_prefill_logits_match_hf(model_dir: Path, hf_model) -> None:
    runner = make_runner(model_dir)
    prompt = random_prompt(random.Random(0), 37)
    table = BlockPool(runner.num_kv_blocks, seed=0).grow([], len(prompt))
    (ours,) = all_logits(runner, [ScheduledRequest("a", prompt, 0, table, GREEDY, True)])
    ref = hf_logits(hf_model, prompt)
    assert ref.abs().max() > 1.0  # the tiny model's logits are not all ~0, so the comparison means something
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decode_backend", ["auto", "eager"])
def test_ragged_step_with_cached_prefix_and_decodes(model_dir: Path, hf_model, decode_backend: str) -> None:
    """One step mixing: a chunk after a cached prefix, a fresh prompt, a one-token chunk, and decodes."""
    runner = make_runner(model_dir, decode_backend=decode_backend)
    rng, pool = random.Random(1), BlockPool(runner.num_kv_blocks, seed=1)
    seqs = {
        name: random_prompt(rng, n)
        for name, n in [("chunk", 33), ("fresh", 11), ("one", 9), ("d1", 41), ("d2", 8), ("d3", 1)]
    }
    tables = {name: pool.grow([], len(s)) for name, s in seqs.items()}
    # Step 1: fill the caches (a prefix for "chunk" and "one", all but the last token for the decodes).
    cached = {"chunk": 20, "one": 8, "d1": 40, "d2": 7}
    all_logits(
        runner, [ScheduledRequest(n, seqs[n][:c], 0, tables[n], GREEDY, False) for n, c in cached.items()]
    )
    step = [
        ScheduledRequest("chunk", seqs["chunk"][20:], 20, tables["chunk"], GREEDY, True),
        ScheduledRequest("d1", seqs["d1"][40:], 40, tables["d1"], GREEDY, True),
        ScheduledRequest("fresh", seqs["fresh"], 0, tables["fresh"], GREEDY, True),
        ScheduledRequest("d2", seqs["d2"][7:], 7, tables["d2"], GREEDY, True),
        ScheduledRequest("one", seqs["one"][8:], 8, tables["one"], GREEDY, True),
        ScheduledRequest("d3", seqs["d3"], 0, tables["d3"], GREEDY, True),
    ]
    for r, ours in zip(step, all_logits(runner, step), strict=True):
        ref = hf_logits(hf_model, seqs[r.request_id])[r.start_position :]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=lambda m, r=r: f"{r.request_id}: {m}")


def generate(runner: ModelRunner, prompts: list[list[int]], num_new: int, chunk: int = 7) -> list[list[int]]:
    """A toy scheduler: request i starts at step i; prompts are prefilled in chunks while others decode."""
    pool = BlockPool(runner.num_kv_blocks, seed=2)
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    tables: list[list[int]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    step = 0
    while any(len(o) < num_new for o in outputs):
        scheduled = []
        for i in range(min(step + 1, len(prompts))):
            if len(outputs[i]) >= num_new:
                continue
            end = min(computed[i] + chunk, len(tokens[i]))
            scheduled.append(
                ScheduledRequest(
                    f"r{i}",
                    tokens[i][computed[i] : end],
                    computed[i],
                    pool.grow(tables[i], end),
                    GREEDY,
                    needs_sample=end == len(tokens[i]),
                    num_generated=len(outputs[i]),
                )
            )
        result = runner.execute(SchedulerOutput(scheduled=scheduled))
        for r in scheduled:
            i = int(r.request_id[1:])
            computed[i] = r.context_len
            if r.needs_sample:
                tokens[i].append(result.sampled[r.request_id])
                outputs[i].append(result.sampled[r.request_id])
            else:
                assert r.request_id not in result.sampled
        step += 1
    return outputs


def hf_greedy(hf_model, prompt: list[int], num_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=num_new,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_hf(model_dir: Path, hf_model) -> None:
    runner = make_runner(model_dir)
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (5, 17, 1, 30)]
    ours = generate(runner, prompts, num_new=64)
    for prompt, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(hf_model, prompt, 64)


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=1 << 20)


def run_one(
    runner: ModelRunner,
    prompt: list[int],
    num_new: int,
    *,
    request_id: str = "s",
    companions: int = 0,
    preempt_at: int = -1,
    first_block: int = 0,
) -> list[int]:
    """Sample num_new tokens for one seeded request, optionally beside unseeded companions (sharing its steps),
    and optionally preempted (recompute) after preempt_at tokens: its blocks are dropped and it is re-prefilled."""
    tokens, out = list(prompt), []
    table: list[int] = []
    next_block = first_block
    computed = 0
    preempted: list[str] = []
    rng = random.Random(9)
    while len(out) < num_new:
        while len(table) * BLOCK_SIZE < len(tokens):
            table.append(next_block)
            next_block += 1
        scheduled = [
            ScheduledRequest(request_id, tokens[computed:], computed, list(table), SEEDED, True, len(out))
        ]
        for c in range(companions):  # fresh unseeded prompts in blocks far away, every step
            blocks = [400 + 4 * c + i for i in range(4)]
            scheduled.append(
                ScheduledRequest(f"c{c}", random_prompt(rng, 9), 0, blocks, SamplingParams(), True)
            )
        sampled = runner.execute(
            SchedulerOutput(
                scheduled,
                finished_request_ids=[f"c{c}" for c in range(companions)],
                preempted_request_ids=preempted,
            )
        ).sampled
        preempted = []
        tokens.append(sampled[request_id])
        out.append(sampled[request_id])
        computed = len(tokens) - 1
        if len(out) == preempt_at:  # recompute preemption: the KV is gone, the generator is not
            table, computed, preempted = [], 0, [request_id]
            next_block += 50
    return out


def test_seeded_sampling_is_reproducible_through_the_runner(tiny_llama_dir: Path) -> None:
    runner = make_runner(tiny_llama_dir)
    prompt = random_prompt(random.Random(5), 12)
    alone = run_one(runner, prompt, 24)
    runner.execute(SchedulerOutput([], finished_request_ids=["s"]))
    assert len(set(alone)) > 3  # really sampled, not greedy
    with_companions = run_one(runner, prompt, 24, companions=3)
    runner.execute(SchedulerOutput([], finished_request_ids=["s"]))
    assert with_companions == alone
    preempted = run_one(runner, prompt, 24, preempt_at=10, first_block=100)
    assert preempted == alone


def test_finished_request_drops_its_generator(tiny_llama_dir: Path) -> None:
    runner = make_runner(tiny_llama_dir)
    prompt = random_prompt(random.Random(6), 7)
    first = run_one(runner, prompt, 8)
    continued = run_one(runner, prompt, 8)  # same id, not finished: the generator goes on
    runner.execute(SchedulerOutput([], finished_request_ids=["s"]))
    restarted = run_one(runner, prompt, 8)
    assert restarted == first and continued != first


def test_bf16_matmuls_stay_close_to_fp32(tiny_llama_dir: Path) -> None:
    """--dtype bfloat16: bf16 weights, GEMMs and KV cache, fp32 activations; logits within bf16 rounding of fp32."""
    bytes_per_block = 2 * 2 * BLOCK_SIZE * 2 * 16 * 2  # bf16 KV: 2 bytes per element
    config = DeviceConfig(device="cpu", kv_cache_memory=64 * bytes_per_block)
    runner = ModelRunner(ModelConfig(model=str(tiny_llama_dir), dtype="bfloat16"), config, BLOCK_SIZE)
    assert runner.model.weights.layers[0].qkv.dtype == torch.bfloat16
    assert runner.kv_cache.storage.dtype == torch.bfloat16 and runner.num_kv_blocks == 64
    prompt = random_prompt(random.Random(7), 29)
    table = BlockPool(runner.num_kv_blocks, seed=7).grow([], len(prompt))
    (ours,) = all_logits(runner, [ScheduledRequest("a", prompt, 0, table, GREEDY, True)])
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(), prompt)
    err = (ours - ref).abs().max() / ref.abs().max()
    assert 1e-5 < err < 3e-2  # bf16 really ran (not bit-exact), yet close
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # Decode steps read the bf16 cache (the C kernel's bf16 path on CPU).
    table = BlockPool(runner.num_kv_blocks, seed=8).grow([], len(prompt))
    all_logits(runner, [ScheduledRequest("b", prompt[:-1], 0, table, GREEDY, False)])
    (step,) = all_logits(runner, [ScheduledRequest("b", prompt[-1:], len(prompt) - 1, table, GREEDY, True)])
    assert (step[0] - ref[-1]).abs().max() / ref.abs().max() < 3e-2


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
)
def test_rope_inv_freq_matches_transformers(tmp_path: Path, rope: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.weights import read_arch, rope_inv_freq

    config = LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=16384, rope_parameters=rope
    )
    config.save_pretrained(tmp_path)
    ours, our_scaling = rope_inv_freq(read_arch(tmp_path))
    if rope["rope_type"] == "default":
        theirs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
        scaling = 1.0
    else:
        theirs, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    torch.testing.assert_close(ours, theirs)
    assert our_scaling == scaling


def test_read_arch_accepts_transformers4_rope_keys(tmp_path: Path) -> None:
    """Older configs keep rope_theta at the top level and scaling under rope_scaling (with "type")."""
    import json

    from engine.weights import read_arch

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_theta": 5e5,
                "eos_token_id": [7, 9],
                "rope_scaling": {"type": "linear", "factor": 2.0},
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11]}))
    arch = read_arch(tmp_path)
    assert arch.rope_theta == 5e5 and arch.rope_scaling["rope_type"] == "linear"
    assert arch.num_kv_heads == 2 and arch.head_dim == 4
    assert arch.eos_token_ids == (7, 9, 11)


def test_seeded_request_continues_on_a_fresh_runner(tiny_llama_dir: Path) -> None:
    """A runner that never saw the request (restart, another replica) replays num_generated draws."""
    prompt = random_prompt(random.Random(8), 10)
    full = run_one(make_runner(tiny_llama_dir), prompt, 12)
    fresh = make_runner(tiny_llama_dir)
    tokens = prompt + full[:11]
    table = list(range((len(tokens) + BLOCK_SIZE - 1) // BLOCK_SIZE))
    step = ScheduledRequest("s", tokens, 0, table, SEEDED, True, num_generated=11)
    assert fresh.execute(SchedulerOutput([step])).sampled["s"] == full[11]


def test_too_few_blocks_is_an_error(tiny_llama_dir: Path) -> None:
    runner = make_runner(tiny_llama_dir)
    short = ScheduledRequest("x", [5] * 9, 0, [0, 1], GREEDY, True)  # 9 tokens need 3 blocks of 4
    with pytest.raises(ValueError, match="cannot hold"):
        runner.execute(SchedulerOutput([short]))


def test_onednn_linear_pads_rows_to_a_few_buckets() -> None:
    """Each GEMM shape is a JIT-compiled, cached oneDNN primitive: the row count is padded to a bucket so a
    serving engine sees a fixed few shapes (unpadded, the soak's engine process grew ~40 MiB a minute)."""
    from engine.model import onednn_linear, pick_matmul, row_bucket

    buckets = [row_bucket(m) for m in range(1, 2049)]
    assert len(set(buckets)) == 72
    assert all(m <= b <= max(m, m + m / 8) for m, b in zip(range(1, 2049), buckets, strict=True))
    assert buckets[:16] == list(range(1, 17)) and row_bucket(17) == 18 and row_bucket(1025) == 1152
    if pick_matmul(torch.device("cpu")) is not onednn_linear:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    for m in (1, 16, 17, 33, 100, 1025):
        x = torch.randn(m, 64)
        out = onednn_linear(x, weight, bias)
        assert out.shape == (m, 96) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
