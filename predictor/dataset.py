"""Training and evaluation data: JSONL rows → (feature rows, target lengths, group keys), and the grouped split.

The split is a pure function of a row's group key, so train, calibration and test never share a prompt: the key is
a hash of the normalized prompt text (ShareGPT repeats "hi" 38 times; all 38 land on one side). With a group
field (ShareGPT's `base_id`: the chunks of one conversation) rows sharing either the text or the field value form
one group (connected components), whose key is its smallest text hash. Rows from the online log carry feature
rows, not text; their key hashes the feature row instead.

    u = sha1(seed:key) mapped to [0, 1):   [0, test) test | [test, test + calib) calibration | rest train
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.features import FeatureRow, FeatureSpec, RequestInfo, extract
from predictor.prompts import DEFAULT_DATA_DIR, attach_prompts, read_jsonl

_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class SplitSpec:
    test_fraction: float = 0.0
    calib_fraction: float = 0.2
    seed: int = 0

    def unit(self, key: str) -> float:
        digest = hashlib.sha1(f"{self.seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    def fold(self, key: str, num_folds: int) -> int:
        return min(int(self.unit(key) * num_folds), num_folds - 1)

    def part(self, key: str) -> str:
        u = self.unit(key)
        if u < self.test_fraction:
            return "test"
        return "calib" if u < self.test_fraction + self.calib_fraction else "train"


def group_key(text: str) -> str:
    return hashlib.sha1(_SPACE_RE.sub(" ", text).strip().lower().encode()).hexdigest()


def row_group_key(row: FeatureRow) -> str:
    return hashlib.sha1(repr((row.dense[:5], row.hashed)).encode()).hexdigest()


@dataclass
class Dataset:
    rows: list[FeatureRow] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def y(self) -> np.ndarray:
        return np.asarray(self.targets, dtype=np.float64)

    def extend(self, other: Dataset) -> None:
        self.rows += other.rows
        self.targets += other.targets
        self.keys += other.keys

    def subset(self, split: SplitSpec, part: str) -> Dataset:
        keep = [i for i, k in enumerate(self.keys) if split.part(k) == part]
        return Dataset(
            [self.rows[i] for i in keep], [self.targets[i] for i in keep], [self.keys[i] for i in keep]
        )


@dataclass(frozen=True)
class Fields:
    """Which JSONL fields hold what. Missing optional fields fall back: tokens ≈ chars / 4, max_tokens 0."""

    prompt: str = "prompt"
    target: str = "response_tokens"
    tokens: str = "prompt_tokens"
    max_tokens: str = "max_tokens"
    model: str = ""  # a field naming the model; "" = every row has the model name given to the loader
    group: str = ""  # a field whose equal values must stay on one side of the split (e.g. base_id)


def load_jsonl(
    path: str | Path,
    fields: Fields,
    spec: FeatureSpec,
    model_name: str = "",
    prompts_dir: Path = DEFAULT_DATA_DIR,
) -> Dataset:
    """Rows with a prompt (or `source` + `id` resolvable under prompts_dir) and a target length."""
    rows = attach_prompts(read_jsonl(Path(path)), fields.prompt, prompts_dir)
    data = Dataset()
    groups: list[str] = []
    for row in rows:
        if row.get(fields.target) is None:
            continue
        text = row[fields.prompt]
        info = RequestInfo(
            text=text,
            num_prompt_tokens=int(row.get(fields.tokens) or max(1, len(text) // 4)),
            num_messages=1,
            max_tokens=int(row.get(fields.max_tokens) or 0),
            model=str(row.get(fields.model, model_name)) if fields.model else model_name,
        )
        data.rows.append(extract(info, spec))
        data.targets.append(float(row[fields.target]))
        data.keys.append(group_key(text))
        groups.append(str(row.get(fields.group, "")) if fields.group else "")
    if fields.group:
        data.keys = merge_groups(data.keys, groups)
    return data


def merge_groups(text_keys: list[str], group_values: list[str]) -> list[str]:
    """Connected components of rows linked by equal text key or equal (non-empty) group value."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for key, value in zip(text_keys, group_values, strict=True):
        if value:
            a, b = find("t" + key), find("g" + value)
            if a != b:
                parent[a] = b
    smallest: dict[str, str] = {}
    for key in text_keys:
        root = find("t" + key)
        smallest[root] = min(smallest.get(root, key), key)
    return [smallest[find("t" + key)] for key in text_keys]


def load_log(path: str | Path, spec: FeatureSpec) -> Dataset:
    """The server's online log (`predictor/online.py`): feature rows and actual lengths; no text."""
    data = Dataset()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("hash_dim") != spec.hash_dim or rec.get("feature_version") != spec.version:
                continue  # logged under another feature layout: unusable for this spec
            if rec.get("finish_reason") not in ("stop", "length"):
                continue  # aborted / failed requests say nothing about the natural length
            row = FeatureRow(tuple(rec["dense"]), tuple(rec["hashed"]))
            data.rows.append(row)
            data.targets.append(float(rec["output_tokens"]))
            data.keys.append(row_group_key(row))
    return data
