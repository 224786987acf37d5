"""Shared fixtures: tiny random-weight HF checkpoints (2 layers, hidden 64) that make model tests fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model_store import save_tiny_random


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, 2 layers, hidden 64, 4 heads / 2 KV heads, vocab 320, untied embeddings; no tokenizer."""
    return save_tiny_random(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 (q/k/v biases) of the same shape, tied embeddings."""
    return save_tiny_random(
        tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", seed=1, tie_word_embeddings=True
    )
