"""Real prompts from ../shared/data, addressed by (source, id), so datasets can store ids instead of text.

Sources: `sharegpt` (first user turns of `sharegpt_first_turn.jsonl`, id = the row id) and `alpaca` (the 616
AlpacaEval instructions of `alpaca_eval_outputs.jsonl`, deduplicated over its 10 responders, id = prompt_id).
`attach_prompts` fills a `prompt` field into rows that carry only `source` + `id` (the ground-truth file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SHAREGPT_FILE = "sharegpt_first_turn.jsonl"
ALPACA_FILE = "alpaca_eval_outputs.jsonl"


@dataclass(frozen=True)
class Prompt:
    source: str  # "sharegpt" | "alpaca"
    id: str
    text: str


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_sharegpt(data_dir: Path = DEFAULT_DATA_DIR) -> list[Prompt]:
    return [
        Prompt("sharegpt", row["id"], row["prompt"]) for row in read_jsonl(Path(data_dir) / SHAREGPT_FILE)
    ]


def load_alpaca(data_dir: Path = DEFAULT_DATA_DIR) -> list[Prompt]:
    """One Prompt per AlpacaEval instruction (the file repeats each for 10 models)."""
    seen: dict[str, Prompt] = {}
    for row in read_jsonl(Path(data_dir) / ALPACA_FILE):
        key = str(row["prompt_id"])
        if key not in seen:
            seen[key] = Prompt("alpaca", key, row["instruction"])
    return list(seen.values())


def prompt_index(data_dir: Path = DEFAULT_DATA_DIR) -> dict[tuple[str, str], str]:
    """(source, id) -> prompt text."""
    return {(p.source, p.id): p.text for p in load_sharegpt(data_dir) + load_alpaca(data_dir)}


def attach_prompts(rows: list[dict], field: str = "prompt", data_dir: Path = DEFAULT_DATA_DIR) -> list[dict]:
    """Rows without `field` but with `source` and `id` get the prompt text; rows already carrying it are kept."""
    if all(field in row for row in rows):
        return rows
    index = prompt_index(data_dir)
    out = []
    for row in rows:
        if field not in row:
            key = (row["source"], str(row["id"]))
            if key not in index:
                raise KeyError(f"prompt {key} not found under {data_dir}")
            row = {**row, field: index[key]}
        out.append(row)
    return out
