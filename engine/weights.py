"""Load a local Hugging Face Llama-family directory (Llama, Mistral, Qwen2, SmolLM) into plain tensors.

Reads config.json (+ generation_config.json) and every *.safetensors shard directly, never instantiating the HF
model. q/k/v are fused into one `[(H + 2*KVH) * D, hidden]` matrix (rows q, then k, then v; biases likewise) and
gate/up into one `[2 * I, hidden]` matrix, so a layer runs three big matmuls plus o_proj.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.model_store import SYNTHETIC_MARKER

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelArch:
    """The shape and constants of the model, from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict  # {"rope_type": "default" | "linear" | "llama3", ...}
    eos_token_ids: tuple[int, ...]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]
    qkv_bias: torch.Tensor | None  # [(H + 2*KVH) * D] (Qwen2) or None
    o_proj: torch.Tensor  # [hidden, H * D]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * I, hidden]: gate rows, then up rows
    down: torch.Tensor  # [hidden, I]


@dataclass
class ModelWeights:
    arch: ModelArch
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed when tied

    @property
    def num_bytes(self) -> int:
        seen: dict[int, int] = {}
        tensors = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())


def read_arch(model_dir: Path) -> ModelArch:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{model_dir}: architecture {archs[0]} is not supported (only {sorted(SUPPORTED_ARCHS)})"
        )
    if cfg.get("mlp_bias"):
        raise ValueError(f"{model_dir}: mlp_bias is not supported")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", archs[0] == "MistralForCausalLM"):
        logger.warning("%s: sliding-window attention is ignored (full attention is used)", model_dir)
    num_heads = cfg["num_attention_heads"]
    # transformers 5 moved rope_theta into rope_parameters; older configs keep rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return ModelArch(
        architecture=archs[0],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope,
        eos_token_ids=_eos_token_ids(Path(model_dir), cfg),
    )


def _eos_token_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    """Union of config.json's and generation_config.json's eos_token_id (each an int, a list, or absent)."""
    ids: list[int] = []
    sources = [cfg]
    if (gen := model_dir / "generation_config.json").is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        eos = src.get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos] if eos is not None else []:
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)


def rope_inv_freq(arch: ModelArch) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] fp32, attention_scaling), as transformers' ROPE_INIT_FUNCTIONS compute them."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    params = arch.rope_scaling
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = (
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
        )
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3)")


def load_weights(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelWeights:
    """dtype is the matmul dtype (every projection, the embedding and lm_head); norms and biases stay fp32."""
    model_dir = Path(model_dir)
    arch = read_arch(model_dir)
    if (marker := model_dir / SYNTHETIC_MARKER).is_file():
        return random_weights(arch, dtype, device, seed=json.loads(marker.read_text()).get("seed", 0))
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for shard in shards:
        raw.update(load_file(shard))

    def take(name: str) -> torch.Tensor:
        # Matrices in the matmul dtype; norms and biases (tiny) stay fp32, like the activations they act on.
        return raw.pop(name).to(device=device, dtype=dtype if name.endswith("proj.weight") else torch.float32)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in raw else None

    def matrix(name: str) -> torch.Tensor:
        return raw.pop(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        q_bias, k_bias, v_bias = (maybe(f"{p}self_attn.{n}_proj.bias") for n in "qkv")
        qkv = torch.cat([take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"])
        biases = (q_bias, k_bias, v_bias)
        layers.append(
            LayerWeights(
                input_norm=take(f"{p}input_layernorm.weight"),
                qkv=qkv,
                qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
                o_proj=take(f"{p}self_attn.o_proj.weight"),
                o_bias=maybe(f"{p}self_attn.o_proj.bias"),
                post_norm=take(f"{p}post_attention_layernorm.weight"),
                gate_up=torch.cat([take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")]),
                down=take(f"{p}mlp.down_proj.weight"),
            )
        )
    embed = matrix("model.embed_tokens.weight")
    lm_head = matrix("lm_head.weight") if "lm_head.weight" in raw else None
    if lm_head is None or arch.tie_word_embeddings:
        lm_head = embed
    weights = ModelWeights(
        arch=arch, embed=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head
    )
    if leftover := [k for k in raw if not k.endswith("rotary_emb.inv_freq")]:
        logger.warning("%s: %d unused tensors, e.g. %s", model_dir, len(leftover), leftover[:3])
    logger.info(
        "loaded %s: %d layers, %.1f MB %s", model_dir.name, arch.num_layers, weights.num_bytes / 1e6, dtype
    )
    return weights


def random_weights(arch: ModelArch, dtype: torch.dtype, device: str, seed: int = 0) -> ModelWeights:
    """Seeded random weights at arch's shape: N(0, 1/fan_in) matrices keep the residual stream's scale through
    the layers, norms are 1. For speed runs (`synthetic:<shape>` models); the tokens they produce mean nothing.

    Models under 2 GB (fp32) are drawn on the CPU and moved, so the same seed gives the same weights on every
    device and a GPU run can be checked token for token against the CPU path; larger ones are drawn on the device
    (an 8B model in seconds instead of a minute of host RNG), so they match only on the same kind of device."""
    h, d = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * d
    per_layer = qkv_rows * h + h * arch.num_heads * d + 3 * h * arch.intermediate_size
    num_params = arch.num_layers * per_layer + 2 * arch.vocab_size * h
    draw_on = "cpu" if 4 * num_params < 2 * 10**9 else device
    gen = torch.Generator(device=draw_on).manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        w = torch.empty(rows, cols, dtype=dtype, device=draw_on)
        return w.normal_(0.0, cols**-0.5, generator=gen).to(device)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float32, device=device)

    layers = [
        LayerWeights(
            input_norm=ones(h),
            qkv=matrix(qkv_rows, h),
            qkv_bias=None,
            o_proj=matrix(h, arch.num_heads * d),
            o_bias=None,
            post_norm=ones(h),
            gate_up=matrix(2 * arch.intermediate_size, h),
            down=matrix(h, arch.intermediate_size),
        )
        for _ in range(arch.num_layers)
    ]
    embed = matrix(arch.vocab_size, h)
    lm_head = embed if arch.tie_word_embeddings else matrix(arch.vocab_size, h)
    weights = ModelWeights(arch=arch, embed=embed, layers=layers, norm=ones(h), lm_head=lm_head)
    logger.info(
        "SYNTHETIC random weights: %d layers, %.1f GB %s on %s",
        arch.num_layers,
        weights.num_bytes / 1e9,
        dtype,
        device,
    )
    return weights
