"""Batched sampling with per-request parameters: one call per step for every row that needs a token.

Order as in vLLM: temperature -> top_k -> top_p -> min_p -> sample. Sampling is argmax(probs / E) with E ~ Exp(1)
(equivalent to a categorical draw). A seeded request draws its E row from its own torch.Generator, so its tokens
depend only on its seed and its own logits, never on batch companions; unseeded rows share one generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.protocol import SamplingParams


def sample(
    logits: torch.Tensor,  # [R, V]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],  # per row; None = use shared_generator
    shared_generator: torch.Generator | None = None,
) -> torch.Tensor:  # [R] int64
    greedy_tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:  # fast path: the whole batch is greedy
        return greedy_tokens
    sub = [params[i] for i in rows]
    device = logits.device
    x = logits[rows].float() / torch.tensor([p.temperature for p in sub], device=device)[:, None]
    x = apply_top_k_top_p(x, [p.top_k for p in sub], [p.top_p for p in sub])
    if any(p.min_p > 0 for p in sub):
        x = apply_min_p(x, torch.tensor([p.min_p for p in sub], device=device))
    probs = x.softmax(dim=-1)
    noise = torch.empty_like(probs)
    unseeded = []
    for j, i in enumerate(rows):
        if generators[i] is None:
            unseeded.append(j)
        else:
            noise[j].exponential_(generator=generators[i])
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(
            generator=shared_generator
        )
    tokens = greedy_tokens.clone()
    tokens[rows] = (probs / noise).argmax(dim=-1)
    return tokens


def apply_top_k_top_p(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Mask logits x [n, V] outside each row's top_k (0 = off) and top_p nucleus (1.0 = off) with -inf."""
    vocab = x.shape[1]
    use_k = any(0 < k < vocab for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if use_k and not use_p:  # topk of the largest k is much cheaper than a full sort
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=x.device)
        values = x.topk(int(ks.max()), dim=-1).values  # [n, kmax], descending
        threshold = values.gather(1, (ks - 1).clamp(max=values.shape[1] - 1)[:, None])
        threshold[ks == vocab] = float("-inf")
        return x.masked_fill(x < threshold, float("-inf"))
    if not use_p:
        return x
    sorted_x, order = x.sort(dim=-1)  # ascending
    if use_k:
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=x.device)
        threshold = sorted_x.gather(1, (vocab - ks)[:, None])
        sorted_x = sorted_x.masked_fill(sorted_x < threshold, float("-inf"))
    ps = torch.tensor(top_p, device=x.device, dtype=torch.float32)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1.0 - ps)[:, None]  # the low tail whose mass stays under 1 - p
    drop[:, -1] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p [n] times the row's top probability."""
    probs = x.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return x.masked_fill(probs < threshold, float("-inf"))
