"""Pure-torch paged-attention reference: the spec every faster kernel (Triton, compiled torch) is tested against.

Layouts (one layer):
    k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]
    slot               block_id * block_size + offset; slot_mapping[i] is where token i's K/V goes
    block_tables       [num_requests, max_blocks] int; row r lists request r's blocks in order (padding unread)
    context_lens       [num_requests] int; KV length of each request *including* this step's tokens
    query_start_loc    [num_requests + 1] int; request r's query tokens are q[qsl[r]:qsl[r+1]]
GQA: query head h reads KV head h // (num_heads // num_kv_heads), as HF's repeat_kv does.
These are written for clarity (a Python loop per request); they are not the serving path.
"""

from __future__ import annotations

import torch


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, num_kv_heads, head_dim] into the caches at slot_mapping [T] (in place). A slot < 0 marks a
    padding row (a CUDA-graph batch padded to its captured size) and is not written."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:  # [context_len, num_kv_heads, head_dim]
    """One request's first context_len cached tokens, in order."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, KVH, D]
    return blocks.flatten(0, 1)[:context_len]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [n, H, D] at q_positions [n]; k, v [ctx, KVH, D] at positions 0..ctx-1. Causal: key j visible iff j <= pos."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,thd->hnt", q.float(), k) * scale  # [H, n, ctx]
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_positions[:, None]  # [n, ctx]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(dim=-1), v).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], one query token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """A request with context_len 0 (a padding row) gets zeros: softmax over no keys, summed over no values."""
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        ctx = int(context_lens[r])
        k = gather_kv(k_cache, block_tables[r], ctx)
        v = gather_kv(v_cache, block_tables[r], ctx)
        out[r] = _attend(q[r : r + 1], k, v, torch.tensor([ctx - 1], device=q.device), scale)[0]
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D], each request's query tokens are the last n of its context
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [R, max_blocks]
    query_start_loc: torch.Tensor,  # [R + 1]
    context_lens: torch.Tensor,  # [R]
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Varlen attention with a cached prefix: query i of a request with n queries and context c sits at position
    c - n + i and sees every key at positions <= its own (the prefix, then causal within the chunk)."""
    out = torch.empty_like(q)
    for r in range(len(context_lens)):
        start, end, ctx = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(context_lens[r])
        k = gather_kv(k_cache, block_tables[r], ctx)
        v = gather_kv(v_cache, block_tables[r], ctx)
        positions = torch.arange(ctx - (end - start), ctx, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, positions, scale)
    return out
