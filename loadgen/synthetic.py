"""Synthetic prompts of a given token count, and fitting recorded token counts into the model's context.

Traces (Azure, Mooncake, agents, ServeGen) carry token counts, not text. loadgen cannot tokenize with the
server's tokenizer, so a prompt of n tokens is either
- n token ids (for /v1/completions, which Kairos and vLLM accept as `prompt: [int, ...]`): exact; ids are drawn
  from [min(1000, vocab_size // 4), vocab_size) so special tokens (low ids in most vocabularies) are avoided; or
- n words from `WORDS` joined by spaces (for chat): every word is one SmolLM2 token with or without a leading
  space, so n words = n tokens for SmolLM2 (checked: 10, 100 and 1000 random words → 10, 100, 1000 tokens), and
  about n for other BPE vocabularies. The chat template adds its own tokens (30 for SmolLM2's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# fmt: off
WORDS = (
    "time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state",
    "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company",
    "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room",
    "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word",
    "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game",
    "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea",
    "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health",
    "person", "art", "war", "history", "party", "result", "change", "reason", "research", "girl", "moment", "air",
    "teacher", "force", "education", "foot", "boy", "age", "policy", "music", "market", "sense", "nation", "plan",
    "college", "interest", "death", "experience", "effect", "class", "control", "care", "field", "development",
    "role", "rate", "heart", "drug", "show", "leader", "light", "voice", "wife", "mind", "price", "report",
    "decision", "son", "view", "relationship", "town", "road", "arm", "difference", "value", "building", "action",
    "model", "season", "tax", "director", "position", "player", "record", "paper", "space", "ground", "form",
    "event", "official", "matter", "center", "site", "project", "activity", "star", "table", "need", "court",
    "oil", "cost", "industry", "figure", "street", "image", "phone", "data", "picture", "practice", "piece",
    "land", "product", "doctor", "wall", "patient", "worker", "news", "test", "movie", "north", "love", "support",
    "technology", "step", "baby", "computer", "type", "attention", "film", "tree", "source", "organization",
    "hair", "window", "evidence", "population", "truth", "song", "letter", "bank", "fire", "thought", "stone",
)
# fmt: on
PROMPT_FORMATS = ("ids", "text")
CHAT_MARGIN_TOKENS = 64  # room left in the context for a chat template (SmolLM2's adds 30 tokens)
MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces


class PromptMaker:
    """Seeded prompt material. Prompts are built as lists of units (token ids, or indices into WORDS) and
    rendered at the end, so prefixes can be shared unit for unit: same units → same tokens → prefix-cache hits."""

    def __init__(self, prompt_format: str, vocab_size: int, rng: np.random.Generator):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {PROMPT_FORMATS}")
        self.prompt_format = prompt_format
        if prompt_format == "text":
            self.low, self.high = 0, len(WORDS)
        else:
            self.low, self.high = min(1000, vocab_size // 4), vocab_size
        if self.high - self.low < 2:
            raise ValueError(f"vocab size {vocab_size} is too small for synthetic prompts")
        self.rng = rng
        self._blocks: dict[tuple[int, int], list[int]] = {}

    def fresh(self, num_tokens: int) -> list[int]:
        return self.rng.integers(self.low, self.high, size=num_tokens).tolist()

    def block(self, key: int, num_tokens: int) -> list[int]:
        """The content of block `key` (e.g. a Mooncake hash id): drawn once, then the same every time."""
        if (key, num_tokens) not in self._blocks:
            self._blocks[key, num_tokens] = self.fresh(num_tokens)
        return self._blocks[key, num_tokens]

    def render(self, units: list[int]) -> str | tuple[int, ...]:
        if self.prompt_format == "ids":
            return tuple(units)
        return " ".join(WORDS[u] for u in units)


@dataclass(frozen=True)
class LengthFit:
    """How recorded token counts are fit into the model's context: scaled by a factor (which keeps the shape of
    the distribution), then clipped to the budgets. Budgets: (max_model_len − CHAT_MARGIN_TOKENS) split ¾ input,
    ¼ output; a given `max_tokens` lowers the output budget further."""

    max_model_len: int
    max_input_tokens: int
    max_output_tokens: int
    input_scale: float
    output_scale: float

    def input(self, num_tokens: float) -> int:
        return min(self.max_input_tokens, max(1, round(num_tokens * self.input_scale)))

    def output(self, num_tokens: float) -> int:
        return min(self.max_output_tokens, max(1, round(num_tokens * self.output_scale)))

    def num_clipped(self, inputs: list[float], outputs: list[float]) -> dict[str, int]:
        return {
            "num_input_clipped": sum(x * self.input_scale > self.max_input_tokens for x in inputs),
            "num_output_clipped": sum(x * self.output_scale > self.max_output_tokens for x in outputs),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def budgets(max_model_len: int) -> tuple[int, int]:
    """(max input tokens, max output tokens) for a context of `max_model_len` tokens."""
    usable = max_model_len - CHAT_MARGIN_TOKENS
    if usable < 8:
        raise ValueError(f"max_model_len {max_model_len} leaves no room for prompts")
    max_input = usable * 3 // 4
    return max_input, usable - max_input


def fit_lengths(
    input_ref: float,
    output_ref: float,
    max_model_len: int,
    input_scale: float = 0.0,
    output_scale: float = 0.0,
    max_tokens: int | None = None,
) -> LengthFit:
    """A scale of 0 means automatic: min(1, budget / ref), ref being a high quantile of the recorded lengths
    (p95 for the traces: their p99s are far out, e.g. agent outputs p95 665, p99 10536), so most requests
    fit unclipped and the rest are clipped. `max_tokens` clips outputs after scaling (the scale stays)."""
    max_input, max_output = budgets(max_model_len)
    return LengthFit(
        max_model_len=max_model_len,
        max_input_tokens=max_input,
        max_output_tokens=min(max_output, max_tokens) if max_tokens else max_output,
        input_scale=input_scale or min(1.0, max_input / max(input_ref, 1.0)),
        output_scale=output_scale or min(1.0, max_output / max(output_ref, 1.0)),
    )
