"""kernels/reference.py against a naive per-request computation on odd, ragged shapes and permuted blocks,
and the serving paths of engine/model.py against kernels/reference.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import ForwardBatch, decode_attention, decode_attention_eager, prefill_attention
from kernels import cpu_paged_attention
from kernels.reference import paged_decode_attention, paged_prefill_attention, store_kv

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 24, 5, 64


def _paged(contexts: list[int], seed: int = 0):
    """Random per-request K/V [ctx, KVH, D] written into a pool through shuffled block tables."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen
    )  # junk everywhere else
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    max_blocks = max(-(-c // BLOCK_SIZE) for c in contexts) + 1  # one spare column of padding
    tables = torch.full((len(contexts), max_blocks), NUM_BLOCKS - 1, dtype=torch.int32)
    ks, vs = [], []
    for r, ctx in enumerate(contexts):
        blocks = [free.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        tables[r, : len(blocks)] = torch.tensor(blocks)
        k = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(ctx, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        slots = torch.tensor([blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx)])
        store_kv(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, tables, ks, vs


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] = the last n positions of k, v [ctx, KVH, D]; bottom-right-aligned causal mask."""
    n, ctx = q.shape[0], k.shape[0]
    mask = torch.ones(n, ctx, dtype=torch.bool).tril(diagonal=ctx - n)
    group = NUM_HEADS // NUM_KV_HEADS
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=mask,
    )
    return out.transpose(0, 1)


def test_store_kv_writes_rows_at_slots() -> None:
    k_cache = torch.zeros(4, 3, 2, 5)
    v_cache = torch.zeros(4, 3, 2, 5)
    k, v = torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    store_kv(k, v, k_cache, v_cache, torch.tensor([7, 2]))  # slot 7 = block 2, offset 1
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[0, 2], v[1])
    assert (k_cache != 0).any(dim=(2, 3)).sum() == 2  # nothing else written


def test_decode_matches_naive() -> None:
    contexts = [1, 7, 23, 5, 11, 40]
    k_cache, v_cache, tables, ks, vs = _paged(contexts)
    q = torch.randn(len(contexts), NUM_HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    out = paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(contexts), scale)
    for r in range(len(contexts)):
        torch.testing.assert_close(out[r : r + 1], _naive(q[r : r + 1], ks[r], vs[r]), atol=1e-5, rtol=1e-5)


def test_prefill_with_cached_prefix_matches_naive() -> None:
    contexts = [9, 23, 1, 17, 30]
    num_queries = [9, 4, 1, 1, 13]  # whole prompt, a chunk after a prefix, one token, a decode, a long chunk
    k_cache, v_cache, tables, ks, vs = _paged(contexts, seed=1)
    qsl = torch.tensor([0, *torch.tensor(num_queries).cumsum(0).tolist()])
    q = torch.randn(int(qsl[-1]), NUM_HEADS, HEAD_DIM)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, qsl, torch.tensor(contexts), HEAD_DIM**-0.5)
    for r in range(len(contexts)):
        s, e = int(qsl[r]), int(qsl[r + 1])
        torch.testing.assert_close(out[s:e], _naive(q[s:e], ks[r], vs[r]), atol=1e-5, rtol=1e-5)


def test_prefill_single_token_equals_decode() -> None:
    contexts = [3, 12, 26]
    k_cache, v_cache, tables, _, _ = _paged(contexts, seed=2)
    q = torch.randn(3, NUM_HEADS, HEAD_DIM)
    lens = torch.tensor(contexts)
    decode = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
    prefill = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor([0, 1, 2, 3]), lens, 0.3)
    torch.testing.assert_close(decode, prefill)


@pytest.mark.parametrize("contexts", [[1, 7, 23, 5, 11, 40], [1], [64, 3]])
def test_decode_backends_match_reference(contexts: list[int]) -> None:
    """engine/model.py's eager fallback, the compile-able form (run eagerly) and the C kernel."""
    k_cache, v_cache, tables, _, _ = _paged(contexts, seed=3)
    tables, lens = tables.long(), torch.tensor(contexts)
    q = torch.randn(len(contexts), NUM_HEADS, HEAD_DIM)
    ref = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, tables, lens, 0.2), ref)
    torch.testing.assert_close(decode_attention_eager(q, k_cache, v_cache, tables, lens, 0.2), ref)
    if cpu_paged_attention.available(HEAD_DIM, NUM_HEADS // NUM_KV_HEADS):
        torch.testing.assert_close(
            cpu_paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2), ref
        )


def test_cpu_kernel_reads_only_the_table() -> None:
    """Blocks outside a request's table may hold NaN (freed, never written): they must not leak in."""
    contexts = [13, 2]
    k_cache, v_cache, tables, _, _ = _paged(contexts, seed=5)
    if not cpu_paged_attention.available(HEAD_DIM, NUM_HEADS // NUM_KV_HEADS):
        pytest.skip("no C compiler")
    used = set(tables[0, :3].tolist()) | set(tables[1, :1].tolist())
    for b in range(NUM_BLOCKS):
        if b not in used:
            k_cache[b] = float("nan")
            v_cache[b] = float("nan")
    k_cache[tables[0, 2], 3:] = float("nan")  # slots past context_len inside the last block
    q = torch.randn(2, NUM_HEADS, HEAD_DIM)
    out = cpu_paged_attention.paged_decode_attention(
        q, k_cache, v_cache, tables.long(), torch.tensor(contexts), 0.2
    )
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_compiled_decode_matches_reference() -> None:
    """The torch.compile path (inductor; ~10 s to compile), on two shapes so automatic dynamic kicks in."""
    compiled = torch.compile(decode_attention)
    for contexts in ([1, 7, 23, 5, 11, 40], [9, 30, 2]):
        k_cache, v_cache, tables, _, _ = _paged(contexts, seed=6)
        tables, lens = tables.long(), torch.tensor(contexts)
        q = torch.randn(len(contexts), NUM_HEADS, HEAD_DIM)
        ref = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
        torch.testing.assert_close(compiled(q, k_cache, v_cache, tables, lens, 0.2), ref)


def test_model_prefill_path_matches_reference() -> None:
    """prefill_attention: whole prompts use the chunk's own K/V, chunks after a prefix read the cache."""
    contexts, num_queries = [9, 23, 17, 30], [9, 4, 2, 13]
    k_cache, v_cache, tables, ks, vs = _paged(contexts, seed=4)
    qsl = [0, *torch.tensor(num_queries).cumsum(0).tolist()]
    q = torch.randn(qsl[-1], NUM_HEADS, HEAD_DIM)
    k = torch.cat([ks[r][-n:] for r, n in enumerate(num_queries)])  # this step's own K/V rows
    v = torch.cat([vs[r][-n:] for r, n in enumerate(num_queries)])
    batch = ForwardBatch(
        token_ids=torch.zeros(qsl[-1], dtype=torch.long),
        positions=torch.zeros(qsl[-1], dtype=torch.long),
        slot_mapping=torch.zeros(qsl[-1], dtype=torch.long),
        logits_indices=torch.zeros(0, dtype=torch.long),
        prefill_query_start_loc=qsl,
        prefill_context_lens=contexts,
        prefill_block_tables=[t.long() for t in tables],
        decode_block_tables=torch.zeros(0, 0, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
    )
    ref = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor(qsl), torch.tensor(contexts), 0.2)
    torch.testing.assert_close(prefill_attention(q, k, v, k_cache, v_cache, batch, 0.2), ref)


@pytest.mark.parametrize("block_size", [16, 32])
def test_cpu_kernel_vector_path_matches_reference(block_size: int) -> None:
    """head_dim 64 and full 16-token runs take the kernel's vector path (SmolLM2's shape: 9 heads / 3 KV heads)."""
    num_kv_heads, group, head_dim = 3, 3, 64
    if not cpu_paged_attention.available(head_dim, group):
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(7)
    contexts = [1, 16, 17, 40, 64, 100, 15]
    k_cache = torch.randn(64, block_size, num_kv_heads, head_dim, generator=gen) * 2
    v_cache = torch.randn(64, block_size, num_kv_heads, head_dim, generator=gen)
    tables = torch.randperm(64, generator=gen)[: 7 * 7].view(7, 7)  # 100 tokens need 7 blocks of 16
    q = torch.randn(len(contexts), num_kv_heads * group, head_dim, generator=gen)
    lens = torch.tensor(contexts)
    ref = paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    out = cpu_paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_cpu_kernel_bf16_cache_matches_reference() -> None:
    """A bf16 cache (--dtype bfloat16): the kernel upcasts each element, so it equals the reference on the same
    bf16 values up to fp32 rounding; the eager fallback agrees too."""
    num_kv_heads, group, head_dim = 3, 3, 64
    if not cpu_paged_attention.available(head_dim, group, torch.bfloat16):
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(8)
    contexts = [1, 16, 17, 40, 64, 100, 15]
    k_cache = torch.randn(64, 16, num_kv_heads, head_dim, generator=gen).bfloat16()
    v_cache = torch.randn(64, 16, num_kv_heads, head_dim, generator=gen).bfloat16()
    tables = torch.randperm(64, generator=gen)[: 7 * 7].view(7, 7)
    q = torch.randn(len(contexts), num_kv_heads * group, head_dim, generator=gen)
    lens = torch.tensor(contexts)
    ref = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    out = cpu_paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(decode_attention_eager(q, k_cache, v_cache, tables, lens, 0.125), ref)


def test_loading_the_cpu_kernel_keeps_subnormals() -> None:
    """The kernel is built with -ffast-math; linking crtfastmath.o would set flush-to-zero for the whole engine
    process on load (found when hypothesis refused to draw floats after an engine test). -mno-daz-ftz keeps it
    inside the kernel."""
    smallest = 5e-324
    if not cpu_paged_attention.available(64, 3):  # SmolLM2's shape, as the engine builds it
        pytest.skip("no C compiler")
    assert smallest * 1.0 == smallest and smallest / 2 == 0.0 and smallest * 2 == 1e-323
    x = torch.tensor([1e-40], dtype=torch.float32)
    assert (x * 1.0).item() != 0.0
