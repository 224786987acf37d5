#!/usr/bin/env bash
# Every number in docs/results/predictor.md: the JSON files under docs/results/predictor/.
#
#   scripts/predictor_results.sh sharegpt   # ChatGPT lengths: 3 conversation-disjoint 75/25 holdouts (~5 min)
#   scripts/predictor_results.sh smollm2    # the served model's own lengths: grouped holdout + the shipped model
#   scripts/predictor_results.sh bench      # per-request latency of the shipped model (run on an idle machine)
#
# ShareGPT holdout = the data guide's own rule (sha1 of base_id, here salted with a seed): whole conversations are
# held out, as in the withheld part of the file, and the model is trained on the rest with the default options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=docs/results/predictor
DATA=../shared/data
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

sharegpt() {
  for seed in 0 1 2; do
    $PY - "$seed" "$DATA/sharegpt_first_turn.jsonl" "$tmp" <<'EOF'
import hashlib, json, sys
seed, path, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
with open(path) as f, open(f"{tmp}/train.jsonl", "w") as tr, open(f"{tmp}/test.jsonl", "w") as te:
    for line in f:
        base = json.loads(line)["base_id"]
        (te if int(hashlib.sha1(f"{seed}:{base}".encode()).hexdigest(), 16) % 4 == 0 else tr).write(line)
EOF
    $PY -m predictor.train --data "$tmp/train.jsonl" --prompt-field prompt --target-field response_tokens \
      -o "$tmp/model.json"
    $PY -m predictor.evaluate --model "$tmp/model.json" --data "$tmp/test.jsonl" --prompt-field prompt \
      --target-field response_tokens --json "$OUT/sharegpt_holdout$seed.json"
  done
}

smollm2() {
  # The prior: ChatGPT lengths of the ShareGPT prompts that are NOT in the ground-truth sample (so it never saw
  # the prompts it describes); its predicted log-median is a feature of the SmolLM2 model and ships inside it.
  $PY -m predictor.groundtruth --prior-data --out "$tmp/prior_data.jsonl"
  $PY -m predictor.train --data "$tmp/prior_data.jsonl" --prompt-field prompt --target-field response_tokens \
    -o "$tmp/prior.json"
  # grouped 20 % test splits (prompt-text groups, 4 seeds: ~440 test rows each) for the numbers, then the
  # shipped model on every row
  for seed in 0 1 2 3; do
    $PY -m predictor.train --data predictor/data/smollm2_lengths.jsonl --target-field output_tokens \
      --prior "$tmp/prior.json" --test-fraction 0.2 --split-seed "$seed" -o "$tmp/smollm2_split.json"
    $PY -m predictor.evaluate --model "$tmp/smollm2_split.json" --data predictor/data/smollm2_lengths.jsonl \
      --target-field output_tokens --split test --json "$OUT/smollm2_test$seed.json"
  done
  $PY -m predictor.train --data predictor/data/smollm2_lengths.jsonl --target-field output_tokens \
    --prior "$tmp/prior.json" -o predictor/models/smollm2.json.gz
}

bench() {
  $PY -m predictor.bench --model predictor/models/smollm2.json.gz --data "$DATA/sharegpt_first_turn.jsonl" \
    --num 2000 --json "$OUT/latency.json"
}

for what in "${@:-sharegpt smollm2 bench}"; do
  for step in $what; do "$step"; done
done
