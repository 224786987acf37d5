"""engine/sampler.py: greedy, temperature, top_k / top_p / min_p masks, seeds, and mixed parameters in one batch."""

from __future__ import annotations

import torch

from engine.protocol import SamplingParams
from engine.sampler import apply_min_p, apply_top_k_top_p, sample

VOCAB = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax() -> None:
    x = logits(6)
    params = [SamplingParams(temperature=0.0)] * 6
    assert torch.equal(sample(x, params, [None] * 6), x.argmax(-1))


def test_top_k_one_is_greedy() -> None:
    x = logits(8)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    for trial in range(3):
        assert torch.equal(sample(x, params, [None] * 8, seeded(trial)), x.argmax(-1))


def test_seeded_sampling_is_reproducible_and_independent_of_companions() -> None:
    x = logits(5)
    params = [SamplingParams(temperature=1.0, seed=7)] + [SamplingParams(temperature=1.0)] * 4
    draws = []
    for companions in (1, 2):
        gen = seeded(7)
        rows = []
        for _ in range(20):  # one draw per step, as the runner does
            noise_rows = 1 + 2 * companions  # different batch sizes and shared-generator draws around the row
            batch = torch.cat([x[:1], logits(noise_rows - 1, seed=companions)])
            p = params[:1] + [SamplingParams(temperature=0.9, seed=None)] * (noise_rows - 1)
            gens = [gen] + [None] * (noise_rows - 1)
            rows.append(int(sample(batch, p, gens, seeded(100 + companions))[0]))
        draws.append(rows)
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it really samples


def test_unseeded_rows_differ_across_draws() -> None:
    x = (logits(1) / 3).expand(64, VOCAB)  # std-1 logits: a broad distribution
    tokens = sample(x, [SamplingParams(temperature=1.0)] * 64, [None] * 64, seeded(0))
    assert len(set(tokens.tolist())) > 3


def test_sampling_follows_the_distribution() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).expand(4000, 4)
    tokens = sample(x, [SamplingParams(temperature=1.0)] * 4000, [None] * 4000, seeded(1))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(x[0], -1), atol=0.03, rtol=0)


def test_top_k_keeps_exactly_k() -> None:
    x = logits(3)
    out = apply_top_k_top_p(x, [3, 0, 10], [1.0, 1.0, 1.0])
    kept = torch.isfinite(out).sum(-1).tolist()
    assert kept == [3, VOCAB, 10]
    assert torch.equal(out[0].topk(3).indices.sort().values, x[0].topk(3).indices.sort().values)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    kept = lambda p: torch.isfinite(apply_top_k_top_p(x, [0], [p])).tolist()[0]  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the top token always survives
    assert kept(1.0) == [True, True, True, True]


def test_top_k_then_top_p() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top_k=2 renormalises to [4/7, 3/7]; top_p=0.5 then keeps only the first.
    out = apply_top_k_top_p(probs.log(), [2], [0.5])
    assert torch.isfinite(out).tolist()[0] == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08], [0.25, 0.25, 0.25, 0.25]])
    out = apply_min_p(probs.log(), torch.tensor([0.2, 0.9]))
    assert torch.isfinite(out).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_mixed_params_in_one_batch() -> None:
    x = logits(5)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=0.999),
        SamplingParams(temperature=1.0, seed=3),
    ]
    gens = [None, None, None, None, seeded(3)]
    tokens = sample(x, params, gens, seeded(0))
    argmax = x.argmax(-1)
    assert (
        tokens[:4].tolist() == argmax[:4].tolist()
    )  # greedy, top_k=1, tiny top_p and min_p all pick the top
    alone = sample(x[4:], params[4:], [seeded(3)])
    assert int(tokens[4]) == int(alone[0])


def test_top_k_top_p_fast_path_equals_full_sort() -> None:
    """The candidate shortcut (top 256 logits) must mask exactly what a full sort masks, flat rows included."""
    from engine.sampler import _top_k_top_p_sorted

    gen = torch.Generator().manual_seed(3)
    vocab = 2000
    scales = [0.01, 0.3, 1.0, 3.0, 10.0, 0.05, 5.0, 1.0]  # near-uniform rows need more than 256 candidates
    x = torch.randn(len(scales), vocab, generator=gen) * torch.tensor(scales)[:, None]
    top_k = [0, 0, 40, 0, 300, 1000, 1, 0]
    top_p = [0.9, 0.95, 0.8, 1.0, 0.5, 0.99, 0.9, 0.3]
    fast = apply_top_k_top_p(x, top_k, top_p)
    ks = torch.tensor([k if k > 0 else vocab for k in top_k])
    slow = _top_k_top_p_sorted(x, ks, torch.tensor(top_p))
    assert torch.equal(torch.isfinite(fast), torch.isfinite(slow))
    assert torch.isfinite(fast[3]).all()  # neither filter on: untouched
    kept = torch.isfinite(fast).sum(-1)
    assert kept[0] > 256 and kept[6] == 1
