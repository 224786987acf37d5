"""`--model synthetic:<shape>`: random weights at a real shape, built in memory and labelled synthetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, ModelConfig
from engine.model_store import SYNTHETIC_MARKER, resolve_model
from engine.protocol import SamplingParams
from engine.runner import ModelRunner
from engine.weights import read_arch

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)


def test_llama_3_8b_shape_is_the_real_one(tmp_path: Path) -> None:
    """The 8B config parses to Llama-3-8B's arch; its parameter count is the published 8.03 B (no allocation)."""
    model_dir = resolve_model("synthetic:llama-3-8b", cache_dir=tmp_path)
    assert (model_dir / SYNTHETIC_MARKER).is_file() and not list(model_dir.glob("*.safetensors"))
    arch = read_arch(model_dir)
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (32, 32, 8, 128)
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim * h
    per_layer = qkv + h * arch.num_heads * arch.head_dim + 3 * h * i + 2 * h
    params = arch.num_layers * per_layer + 2 * v * h + h
    assert params == 8_030_261_248


def test_unknown_synthetic_shape_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        resolve_model("synthetic:llama-9-1t", cache_dir=tmp_path)


def _runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRunner:
    monkeypatch.setenv("KAIROS_CACHE_DIR", str(tmp_path))
    config = DeviceConfig(device="cpu", kv_cache_memory=64 * 2 * 2 * 16 * 2 * 16 * 4)
    return ModelRunner(ModelConfig(model="synthetic:tiny"), config, block_size=16)


def _greedy(runner: ModelRunner, prompt: list[int], steps: int) -> list[int]:
    blocks = list(range(8))[::-1]  # non-contiguous order
    out = runner.execute(SchedulerOutput([ScheduledRequest("r", prompt, 0, blocks, GREEDY, True)]))
    tokens = [out.sampled["r"]]
    for _ in range(steps - 1):
        position = len(prompt) + len(tokens) - 1
        step = ScheduledRequest("r", [tokens[-1]], position, blocks, GREEDY, True)
        tokens.append(runner.execute(SchedulerOutput([step])).sampled["r"])
    return tokens


def test_tiny_synthetic_model_serves_and_is_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny shape runs prefill + decode through the real runner on CPU, is labelled synthetic, and is the
    same model every time (seeded), so benchmark runs compare like with like."""
    first = _runner(tmp_path, monkeypatch)
    assert first.model_name == "synthetic:tiny"
    assert first.model.weights.layers[0].qkv.shape == ((8 + 2 * 2) * 16, 128)
    prompt = [5, 17, 300, 2, 44, 9, 123]
    tokens = _greedy(first, prompt, 6)
    assert all(0 <= t < 512 for t in tokens)
    second = _runner(tmp_path, monkeypatch)
    assert torch.equal(first.model.weights.embed, second.model.weights.embed)
    assert _greedy(second, prompt, 6) == tokens
