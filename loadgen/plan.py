"""What a load run sends: `PlannedRequest` (one call, its timing rule and its tags) and `Workload` (the list).

A workload builder returns a `Workload`; the client replays it; the report joins results back by `index`.
Plans hold no I/O and no randomness of their own, so the same seed gives the same plan byte for byte.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TENANT = "default"
DEFAULT_SLO_CLASS = "interactive"


@dataclass(frozen=True)
class PlannedRequest:
    """One request. Timing: `after is None` → sent `offset_s` after the run starts (open loop); otherwise sent
    `offset_s` after request `after` has finished (closed loop: the next call of an agent session).

    `prompt` is text (a chat message, or a /v1/completions prompt) or a tuple of token ids (/v1/completions).
    `num_prompt_tokens` is the planned count: exact for ids, the dataset's count for text; the server's usage
    chunk overrides it in the report.
    """

    index: int
    offset_s: float
    prompt: str | tuple[int, ...]
    num_prompt_tokens: int
    max_tokens: int
    ignore_eos: bool = False
    tenant: str = DEFAULT_TENANT
    app_id: str = ""
    slo_class: str = DEFAULT_SLO_CLASS
    after: int | None = None

    @property
    def demanded_tokens(self) -> int:
        """Tokens this request asks the server for: its prompt (to prefill) plus max_tokens (to decode)."""
        return self.num_prompt_tokens + self.max_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.prompt, tuple):
            d["prompt"] = list(self.prompt)
        return d


@dataclass(frozen=True)
class Workload:
    """A named plan plus `info`: where it came from and how it was scaled (recorded in the output JSON)."""

    name: str
    requests: tuple[PlannedRequest, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, r in enumerate(self.requests):
            if r.index != i:
                raise ValueError(f"request {i} has index {r.index}")
            if r.after is not None and not 0 <= r.after < i:
                raise ValueError(f"request {i} waits for {r.after}, which is not an earlier request")
            if r.offset_s < 0 or r.max_tokens < 1 or r.num_prompt_tokens < 1:
                raise ValueError(f"request {i}: negative offset, or an empty prompt or output")

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.requests)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "info": self.info, "requests": [r.to_dict() for r in self.requests]}
