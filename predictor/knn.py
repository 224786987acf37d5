"""Nearest training prompts as features: what did similar prompts generate?

Each training row is an idf-weighted, L2-normalised vector over its hashed n-grams (features.py); a request's
similarity to every training row is one sparse dot product through an inverted index (hash bucket → rows), so a
query touches only the postings of its own buckets (~100 µs for 8 k rows). Features, from the `k` most similar:

    knn_mean   similarity-weighted mean of their log1p(length)   (the global mean when nothing overlaps)
    knn_top1   the best similarity (1.0 = the same text, up to hashing)
    knn_top1_y log1p(length) of the best match
    knn_sim    the mean similarity of the k

ShareGPT is full of templated and repeated prompts ("Act as a …", "hi" ×38); these features carry them to new
requests that the trees alone would need many leaves to memorise. To keep train rows honest, `fit` computes their
features out of fold (model.py). Stored rows keep at most `max_terms` buckets (the highest idf) to bound the file.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from predictor.features import FeatureRow

KNN_NAMES = ("knn_mean", "knn_top1", "knn_top1_y", "knn_sim")


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unpack(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


@dataclass
class KnnIndex:
    idf: np.ndarray  # [hash_dim] float32
    indptr: np.ndarray  # [hash_dim + 1] int64: postings of bucket h are [indptr[h], indptr[h+1])
    rows: np.ndarray  # [nnz] int32 training-row ids
    weights: np.ndarray  # [nnz] float32 the row's normalised weight for that bucket
    targets: np.ndarray  # [num_rows] float32 log1p(length)
    k: int = 10

    @classmethod
    def build(
        cls, rows: list[FeatureRow], log_targets: np.ndarray, hash_dim: int, k: int = 10, max_terms: int = 64
    ) -> KnnIndex:
        df = np.zeros(hash_dim, dtype=np.float64)
        for row in rows:
            df[list(row.hashed)] += 1
        idf = (np.log((1 + len(rows)) / (1 + df)) + 1).astype(np.float32)
        buckets: list[list[tuple[int, float]]] = [[] for _ in range(hash_dim)]
        for i, row in enumerate(rows):
            if not row.hashed:
                continue
            h = np.asarray(row.hashed)
            w = idf[h].astype(np.float64)
            if len(h) > max_terms:
                keep = np.argsort(-w, kind="stable")[:max_terms]
                h, w = h[keep], w[keep]
            w /= np.linalg.norm(w)
            for bucket, weight in zip(h.tolist(), w.tolist(), strict=True):
                buckets[bucket].append((i, weight))
        indptr = np.zeros(hash_dim + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(b) for b in buckets])
        flat = [p for b in buckets for p in b]
        return cls(
            idf=idf,
            indptr=indptr,
            rows=np.array([p[0] for p in flat], dtype=np.int32),
            # float16 on disk: round now, so a loaded index predicts exactly what the fitted one did
            weights=np.array([p[1] for p in flat], dtype=np.float16).astype(np.float32),
            targets=np.asarray(log_targets, dtype=np.float32),
            k=k,
        )

    def features(self, row: FeatureRow) -> np.ndarray:
        """[len(KNN_NAMES)] float64."""
        num_rows = len(self.targets)
        if not row.hashed or num_rows == 0:
            return self._nothing()
        h = np.asarray(row.hashed)
        q = self.idf[h].astype(np.float64)
        q /= np.linalg.norm(q)
        starts, ends = self.indptr[h], self.indptr[h + 1]
        lengths = ends - starts
        if lengths.sum() == 0:
            return self._nothing()
        # positions of every posting of the query's buckets, and the query weight each one multiplies
        pos = np.repeat(ends - lengths.cumsum(), lengths) + np.arange(lengths.sum())
        sims = np.bincount(self.rows[pos], self.weights[pos] * np.repeat(q, lengths), minlength=num_rows)
        k = min(self.k, num_rows)
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top])]
        s, t = sims[top], self.targets[top]
        if s[0] <= 0:
            return self._nothing()
        w = np.maximum(s, 1e-6)
        return np.array([float((w * t).sum() / w.sum()), float(s[0]), float(t[0]), float(s.mean())])

    def features_many(self, rows: list[FeatureRow]) -> np.ndarray:
        return np.array([self.features(r) for r in rows]).reshape(len(rows), len(KNN_NAMES))

    def _nothing(self) -> np.ndarray:
        mean = float(self.targets.mean()) if len(self.targets) else 0.0
        return np.array([mean, 0.0, mean, 0.0])

    def to_dict(self) -> dict:
        return {
            "k": self.k,
            "idf": _pack(self.idf),
            "indptr": _pack(self.indptr),
            "rows": _pack(self.rows),
            "weights": _pack(self.weights.astype(np.float16)),
            "targets": _pack(self.targets),
        }

    @classmethod
    def from_dict(cls, doc: dict) -> KnnIndex:
        return cls(
            idf=_unpack(doc["idf"], "float32"),
            indptr=_unpack(doc["indptr"], "int64"),
            rows=_unpack(doc["rows"], "int32"),
            weights=_unpack(doc["weights"], "float16").astype(np.float32),
            targets=_unpack(doc["targets"], "float32"),
            k=doc["k"],
        )
