"""The predictor in the server: tag each request at arrival, and (optionally) log what it really generated.

`LengthTagger.tag` turns what the server knows at arrival into a `Prediction` (median → AddRequest.rl_mean,
calibrated upper quantile → AddRequest.rl_q, bucket) plus the `FeatureRow` it was computed from. When a log
path is set, `record` appends that row with the actual output length and finish reason, one JSON line per
finished request: the feature vector, never the prompt text. `kairos predictor refit` retrains from that log.

A missing or unreadable model file is not fatal: the server logs it and tags with `ConstantPredictor`'s
documented constants (predictor/model.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from predictor.features import FeatureRow, FeatureSpec, RequestInfo, extract
from predictor.model import ConstantPredictor, LengthPredictor, Prediction

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "smollm2.json.gz"


class _Predictor(Protocol):
    def predict(self, request: RequestInfo) -> Prediction: ...


@dataclass(frozen=True)
class Tagged:
    prediction: Prediction
    features: FeatureRow | None  # None under the constant fallback (nothing worth logging)


def request_text(messages: Sequence[Any]) -> str:
    """The text being answered: the last user message (any message if none is from the user)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content or ""
    return messages[-1].content or "" if messages else ""


class LengthTagger:
    def __init__(
        self,
        predictor: _Predictor,
        model_name: str = "",
        log_path: str | Path | None = None,
        log_spec: FeatureSpec | None = None,
    ) -> None:
        self.predictor = predictor
        self.model_name = model_name
        self.spec = predictor.spec if isinstance(predictor, LengthPredictor) else log_spec
        self._log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    @property
    def is_constant(self) -> bool:
        return not isinstance(self.predictor, LengthPredictor)

    @property
    def is_logging(self) -> bool:
        return self._log is not None

    def tag(self, text: str, num_prompt_tokens: int, num_messages: int = 1, max_tokens: int = 0) -> Tagged:
        info = RequestInfo(text, num_prompt_tokens, num_messages, max_tokens, self.model_name)
        if isinstance(self.predictor, LengthPredictor):
            row = extract(info, self.predictor.spec)
            return Tagged(self.predictor.predict_row(row), row)
        if self._log is not None and self.spec is not None:
            return Tagged(self.predictor.predict(info), extract(info, self.spec))
        return Tagged(self.predictor.predict(info), None)

    def record(self, tagged: Tagged, output_tokens: int, finish_reason: str) -> None:
        """Append one finished request to the log (a no-op without a log path)."""
        if self._log is None or tagged.features is None or self.spec is None:
            return
        line = json.dumps(
            {
                "feature_version": self.spec.version,
                "hash_dim": self.spec.hash_dim,
                "dense": list(tagged.features.dense),
                "hashed": list(tagged.features.hashed),
                "output_tokens": output_tokens,
                "finish_reason": finish_reason,
                "predicted_median": round(tagged.prediction.median, 1),
                "predicted_upper": round(tagged.prediction.upper, 1),
            }
        )
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def load_tagger(
    path: str | Path | None, model_name: str = "", log_path: str | Path | None = None
) -> LengthTagger:
    """path "default" → the shipped SmolLM2 model; None / "" / "none" → the constant fallback on purpose; a file
    that does not load → the fallback, and a warning that says so."""
    if str(path) == "default":
        path = DEFAULT_MODEL_PATH
    if path and str(path).lower() != "none":
        try:
            predictor = LengthPredictor.load(path)
            logger.info(
                "length predictor %s: q%.2f, trained on %s rows",
                path,
                predictor.quantile,
                predictor.info.get("num_train", "?"),
            )
            return LengthTagger(predictor, model_name, log_path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning(
                "length predictor %s not loaded (%s): tagging every request with the constants median %d, "
                "upper %d",
                path,
                exc,
                ConstantPredictor.median,
                ConstantPredictor.upper,
            )
    else:
        logger.info(
            "length predictor off: constant median %d, upper %d",
            ConstantPredictor.median,
            ConstantPredictor.upper,
        )
    return LengthTagger(ConstantPredictor(), model_name, log_path, FeatureSpec())


class LengthLogObserver:
    """A request observer (server/generation.py's RequestObserver) that forwards to the server's own one and, when
    the request finishes, logs its actual length next to the features it was predicted from."""

    def __init__(self, inner: Any, tagger: LengthTagger, tagged: Tagged) -> None:
        self.inner = inner
        self.tagger = tagger
        self.tagged = tagged

    def on_first_token(self, gen: Any, now: float) -> None:
        if self.inner is not None:
            self.inner.on_first_token(gen, now)

    def on_token_gap(self, gen: Any, gap_s: float) -> None:
        if self.inner is not None:
            self.inner.on_token_gap(gen, gap_s)

    def on_finish(self, gen: Any, now: float) -> None:
        if self.inner is not None:
            self.inner.on_finish(gen, now)
        self.tagger.record(self.tagged, gen.output.num_tokens, gen.finish_reason)
