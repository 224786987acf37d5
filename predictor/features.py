"""Features of a request known when it arrives: prompt size, text statistics, hashed word n-grams, request fields.

A request becomes a `FeatureRow`: a short dense vector (`DENSE_NAMES`) plus a bag of hashed text features
(indices into `hash_dim` buckets, counts folded to 1). `to_dense`/`to_csr` lay them out as one matrix:

    [ dense (len(DENSE_NAMES)) | hashed (hash_dim) ]

Hashing is crc32 (stable across processes; Python's hash() is salted). Only the first `max_words` and last
`tail_words` words are hashed, and character fractions are taken over the first `STATS_CHARS` characters, so an
8 k-token prompt costs about what a 500-token one does. The row holds no text, which is why the online log
stores rows, not prompts.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np

FEATURE_VERSION = 2

_WORD_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']", re.IGNORECASE)
_LIST_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
# str.count of each marker: a regex alternation over an 8 k-token prompt costs ~0.3 ms, these ~0.02 ms
CODE_MARKERS = (
    "```",
    "def ",
    "class ",
    "import ",
    "return",
    "=>",
    "()",
    ";\n",
    "{\n",
    "}\n",
    "</",
    "#include",
)
_URL_RE = re.compile(r"https?://")
_DIGIT_RE = re.compile(r"\d")
_UPPER_RE = re.compile(r"[A-Z]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
_PUNCT_RE = re.compile(r"[^\w\s]")
STATS_CHARS = 2048  # character fractions are estimated on the text's start
WORD_CHARS = 24  # words are cut from at most this many characters per word wanted (head and tail)

DENSE_NAMES = (
    "log_prompt_tokens",
    "log_chars",
    "log_words",
    "log_lines",
    "chars_per_token",
    "num_question_marks",
    "ends_with_question",
    "num_list_items",
    "num_code_markers",
    "has_code_fence",
    "num_urls",
    "frac_digits",
    "frac_upper",
    "frac_non_ascii",
    "frac_punct",
    "num_messages",
    "log_max_tokens",
    "model_hash",
)


@dataclass(frozen=True)
class FeatureSpec:
    hash_dim: int = 4096
    max_words: int = 256  # words hashed from the start of the text
    tail_words: int = 32  # and from the end (instructions often close a pasted text)
    prefix_words: int = 4  # position-tagged first words ("write a", "explain", "translate")
    version: int = FEATURE_VERSION

    @property
    def num_features(self) -> int:
        return len(DENSE_NAMES) + self.hash_dim

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestInfo:
    """What the server knows at arrival. `text` is the message being answered (the last user turn) or the prompt."""

    text: str
    num_prompt_tokens: int
    num_messages: int = 1
    max_tokens: int = 0  # 0 = not given
    model: str = ""


@dataclass(frozen=True)
class FeatureRow:
    dense: tuple[float, ...]
    hashed: tuple[int, ...]  # sorted unique indices in [0, hash_dim)


def _bucket(key: str, dim: int) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % dim


def _words(text: str, spec: FeatureSpec) -> list[str]:
    """The first max_words and last tail_words words (with a <cut> marker between them when some are left out)."""
    head_chars, tail_chars = WORD_CHARS * spec.max_words, WORD_CHARS * spec.tail_words
    if len(text) > head_chars + tail_chars:  # never tokenise the middle of a long prompt
        head = _WORD_RE.findall(text[:head_chars])[: spec.max_words]
        tail = _WORD_RE.findall(text[-tail_chars:])[-spec.tail_words :] if spec.tail_words else []
        return [w.lower() for w in head] + ["<cut>"] + [w.lower() for w in tail]
    words = [w.lower() for w in _WORD_RE.findall(text)]
    if len(words) > spec.max_words + spec.tail_words:
        words = words[: spec.max_words] + ["<cut>"] + (words[-spec.tail_words :] if spec.tail_words else [])
    return words


def hashed_ngrams(text: str, spec: FeatureSpec) -> tuple[int, ...]:
    words = _words(text, spec)
    dim = spec.hash_dim
    out = {_bucket("u:" + w, dim) for w in words}
    out.update(_bucket(f"b:{a} {b}", dim) for a, b in zip(words, words[1:], strict=False))
    out.update(_bucket(f"p{i}:{w}", dim) for i, w in enumerate(words[: spec.prefix_words]))
    if words:
        out.add(_bucket("last:" + words[-1], dim))
    return tuple(sorted(out))


def dense_features(info: RequestInfo) -> tuple[float, ...]:
    text = info.text
    num_chars = len(text)
    sample = text[:STATS_CHARS]
    n = max(len(sample), 1)
    stripped = text.rstrip()
    return (
        math.log1p(info.num_prompt_tokens),
        math.log1p(num_chars),
        math.log1p(len(text.split())),
        math.log1p(text.count("\n")),
        num_chars / max(info.num_prompt_tokens, 1),
        float(text.count("?")),
        float(stripped.endswith("?")),
        float(len(_LIST_RE.findall(text))),
        float(sum(text.count(marker) for marker in CODE_MARKERS)),
        float("```" in text),
        float(len(_URL_RE.findall(text))),
        len(_DIGIT_RE.findall(sample)) / n,
        len(_UPPER_RE.findall(sample)) / n,
        len(_NON_ASCII_RE.findall(sample)) / n,
        len(_PUNCT_RE.findall(sample)) / n,
        float(info.num_messages),
        math.log1p(info.max_tokens),
        float(zlib.crc32(info.model.encode()) % 1000),
    )


def extract(info: RequestInfo, spec: FeatureSpec) -> FeatureRow:
    return FeatureRow(dense_features(info), hashed_ngrams(info.text, spec))


def to_dense(row: FeatureRow, spec: FeatureSpec) -> np.ndarray:
    """One row as a [1, num_features] float64 array (what Booster.predict takes fastest for a single row)."""
    x = np.zeros((1, spec.num_features), dtype=np.float64)
    num_dense = len(DENSE_NAMES)
    x[0, :num_dense] = row.dense
    if row.hashed:
        x[0, np.asarray(row.hashed) + num_dense] = 1.0
    return x


def to_csr(rows: list[FeatureRow], spec: FeatureSpec):
    """Many rows as a scipy CSR matrix [len(rows), num_features] (training, evaluation)."""
    from scipy.sparse import csr_matrix

    num_dense = len(DENSE_NAMES)
    indptr, indices, data = [0], [], []
    for row in rows:
        indices.extend(range(num_dense))
        data.extend(row.dense)
        indices.extend(h + num_dense for h in row.hashed)
        data.extend([1.0] * len(row.hashed))
        indptr.append(len(indices))
    return csr_matrix(
        (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
        shape=(len(rows), spec.num_features),
    )


def feature_names(spec: FeatureSpec) -> list[str]:
    return list(DENSE_NAMES) + [f"h{i}" for i in range(spec.hash_dim)]
