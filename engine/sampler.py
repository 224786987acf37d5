"""Batched sampling with per-request parameters: one call per step for every row that needs a token.

Order as in vLLM: temperature -> top_k -> top_p -> min_p -> sample. A draw is inverse-CDF sampling with one uniform
per row: a seeded request takes its uniform from its own torch.Generator, so its tokens depend only on its seed and
its own logits, never on batch companions; unseeded rows share one generator. (Gumbel/exponential noise over the
vocabulary costs ~100 ms per step at B=128 on CPU, one uniform per row ~0.1 ms.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.protocol import SamplingParams

NUCLEUS_CANDIDATES = (
    256  # top_p looks at the top 256 logits first; a row whose nucleus is wider is fully sorted
)


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
    cdf = x.softmax(dim=-1).cumsum(dim=-1)  # [n, V]
    uniform = torch.empty(len(rows), device=device)
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    for j, i in enumerate(rows):
        if generators[i] is not None:
            uniform[j] = torch.rand(1, generator=generators[i], device=device)
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), generator=shared_generator, device=device)
    # Scaled by the row's total so rounding in the cumsum never pushes the draw past the last kept token;
    # a masked token adds nothing to the cdf, so it is never the first entry above the draw.
    target = (uniform * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    tokens = greedy_tokens.clone()
    tokens[rows] = drawn
    return tokens


def apply_top_k_top_p(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Mask logits x [n, V] outside each row's top_k (0 = off) and top_p nucleus (1.0 = off) with -inf.

    The nucleus keeps a token when the probability of the tokens ranked above it is below p (so the token that
    crosses p stays, and the top token always does)."""
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    use_k = any(k < vocab for k in ks)
    if not any(p < 1.0 for p in top_p):
        if not use_k:
            return x
        k_max = max(k for k in ks if k < vocab)
        threshold = x.topk(k_max, dim=-1).values.gather(
            1, torch.tensor(ks, device=x.device).clamp(max=k_max)[:, None] - 1
        )
        threshold[torch.tensor(ks, device=x.device) == vocab] = float("-inf")
        return x.masked_fill(x < threshold, float("-inf"))
    k_t = torch.tensor(ks, device=x.device)
    p_t = torch.tensor(top_p, device=x.device, dtype=torch.float32)
    num_candidates = min(vocab, max([NUCLEUS_CANDIDATES] + [k for k in ks if k < vocab]))
    values, indices = x.topk(num_candidates, dim=-1)  # [n, C], descending
    values = values.masked_fill(
        torch.arange(num_candidates, device=x.device)[None, :] >= k_t[:, None], float("-inf")
    )
    # Normaliser: the top-k set where top_k is on, the whole row otherwise.
    log_total = torch.where(k_t < vocab, values.logsumexp(dim=-1), x.logsumexp(dim=-1))
    probs = (values - log_total[:, None]).exp()
    mass_above = probs.cumsum(dim=-1) - probs  # exclusive
    no_p = p_t >= 1.0
    keep = (mass_above < p_t[:, None]) | no_p[:, None]
    # The top token always stays, also when p underflows to 0 in float32 (top_p=1e-45 is a valid request).
    keep[:, 0] = True
    out = torch.full_like(x, float("-inf")).scatter_(1, indices, values.masked_fill(~keep, float("-inf")))
    if (untouched := no_p & (k_t == vocab)).any():  # neither filter on for these rows
        out[untouched] = x[untouched]
    # Rows whose nucleus may reach past the candidates (a flat distribution): exact, by a full sort.
    if (wide := (probs.sum(dim=-1) < p_t) & (k_t > num_candidates) & ~no_p).any():
        rows = wide.nonzero().squeeze(1)
        out[rows] = _top_k_top_p_sorted(x[rows], k_t[rows], p_t[rows])
    return out


def _top_k_top_p_sorted(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    sorted_x = sorted_x.masked_fill(
        torch.arange(x.shape[1], device=x.device)[None, :] >= k[:, None], float("-inf")
    )
    probs = sorted_x.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p[:, None]
    drop[:, 0] = False  # the top token always stays
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p [n] times the row's top probability."""
    probs = x.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return x.masked_fill(probs < threshold, float("-inf"))
