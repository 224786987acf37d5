"""Triton kernels for the GPU path: KV store by slot, paged decode attention (GQA, split-K), paged extend attention.

Spec: kernels/reference.py (store_kv, paged_decode_attention, paged_prefill_attention); the layouts are drawn there.
Each kernel has a launcher that checks shapes, strides and dtypes and raises ValueError, so a wrong call fails on
the host with a message instead of reading out of bounds on the device. Launchers read only shapes, never tensor
values, so they run inside a CUDA graph capture (engine/cuda_graphs.py).

Precision: softmax and accumulators are fp32; q and the output are fp32, fp16 or bf16; the cache is fp32, fp16 or
bf16. Dot products run in the cache dtype (fp16/bf16 tensor cores on GPU, exact IEEE fp32 for an fp32 cache, so
the fp32 path matches the CPU path). Tested on CPU under TRITON_INTERPRET=1 in fp32 and fp16 only: the triton
3.9 interpreter does bf16 arithmetic wrong (reference/cpu-feasibility.md §1); bf16 is exercised on a GPU.
tl.dot tiles are at least 16 wide in every dimension (GPU compilation needs M, N, K >= 16; the interpreter would
not catch a smaller one), so the GQA group and head_dim are padded up to 16.

Rows the engine pads (CUDA-graph batch padding): a slot < 0 is not stored, a context length of 0 gives zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
LOG2E = 1.4426950408889634


# ---- KV store --------------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token: copy its [KVH, D] K and V rows to row `slot` of the [N * block_size] cache view."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: slot * row stride passes 2**31 on a large pool
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & ((heads * 0 + slot) >= 0)  # broadcast: padding row
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = slot * stride_cache_slot + heads * stride_cache_head + dims
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, KVH, D] into k_cache, v_cache [N, block_size, KVH, D] at slot_mapping [T] (slots < 0 skipped).

    k and v may be strided views (the model's fused qkv split): only their last dimension must be contiguous.
    """
    _check_cache(k_cache, v_cache)
    _, _, num_kv_heads, head_dim = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [T, {num_kv_heads}, {head_dim}] like the cache, got {tuple(x.shape)}"
            )
        if x.dtype not in _FLOAT_DTYPES or x.stride(2) != 1:
            raise ValueError(
                f"{name}: need fp32/fp16/bf16 with a contiguous last dim, got {x.dtype} {x.stride()}"
            )
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens, v has {v.shape[0]}")
    _check_index("slot_mapping", slot_mapping, (k.shape[0],))
    _check_devices(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


# ---- paged decode attention ------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [N, block_size, KVH, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, H, D] when NUM_SPLITS == 1
    part_out_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] fp32: each split's own attention output
    part_lse_ptr,  # [B, H, NUM_SPLITS] fp32 log2-sum-exp2 of each split's scores
    scale_log2,  # softmax scale * log2(e): the kernel works in base 2 (exp2 is one instruction)
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_table,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per KV block (any size; each token's block is looked up)
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    DOT_DTYPE: tl.constexpr,
):
    """Program (request b, KV head h, split s): all GROUP query heads of h against tokens of split s of b's context,
    online softmax over BLOCK_N-token tiles. Reading K/V once per KV head (not per query head) is the GQA saving."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b).to(tl.int32)
    # Split s covers [start, end); the chunk is a whole number of tiles so only the last tile of a split is ragged.
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # query heads of this KV head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    q = (q * scale_log2).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_table
    for tile in range(start, end, BLOCK_N):
        toks = tile + tl.arange(0, BLOCK_N)
        t_mask = toks < end
        block_ids = tl.load(table + toks // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
        rows = (
            block_ids * stride_cache_block
            + (toks % PAGE_SIZE) * stride_cache_tok
            + kv_head * stride_cache_head
        )
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        # Upcast right after the load, then to the dot dtype: a no-op on GPU for fp16/bf16, and it keeps the
        # interpreter off bf16 arithmetic.
        k = k.to(tl.float32).to(DOT_DTYPE)
        v = v.to(tl.float32).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the first token of every tile is valid
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # context_len 0 (a padded row): zeros, not NaN
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        # An empty split (short request) leaves m = -inf, l = 0: lse = -inf weighs it 0 in the reduction.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        row = (b * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        part = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # this split's own softmax-weighted mean
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], part, mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,  # [B, H, NUM_SPLITS, BLOCK_D]
    part_lse_ptr,  # [B, H, NUM_SPLITS]
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (request b, head h): merge the splits. Split s holds o_s (softmax over its own tokens) and
    lse_s = log2 of its softmax mass, so out = sum_s 2^lse_s o_s / sum_s 2^lse_s (shifted by the max for range)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (b * NUM_HEADS + h).to(tl.int64) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty (context_len 0): zeros
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]; an empty split (lse = -inf) weighs 0
    total = tl.sum(w, axis=0)
    part = tl.load(
        part_out_ptr + (row + sp)[:, None] * BLOCK_D + d[None, :], mask=(sp < NUM_SPLITS)[:, None], other=0.0
    )
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_num_splits(num_requests: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Split-K factor for decode: enough programs to fill the GPU when the batch alone does not (batch 1, 8 KV
    heads = 8 programs on 132 SMs), and never splits shorter than 256 tokens (the reduction costs a launch).
    Shapes only, so a CUDA graph captured for (B, max_context) keeps a fixed grid."""
    programs = max(1, num_requests * num_kv_heads)
    want = max(1, (2 * num_sms) // programs)
    return int(max(1, min(want, max_context // 256, 16)))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64
    context_lens: torch.Tensor,  # [B] int32/int64
    scale: float,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:  # [B, H, D], q's dtype
    """One query token per request over its paged context (reference.paged_decode_attention).

    num_splits None: pick_num_splits from the shapes (max context = the table's width in tokens)."""
    num_reqs, num_heads, head_dim, num_kv_heads, page_size = _check_attention(q, k_cache, v_cache)
    _check_index("block_tables", block_tables, (num_reqs, None))
    _check_index("context_lens", context_lens, (num_reqs,))
    _check_devices(q, k_cache, v_cache, block_tables, context_lens)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    out = torch.empty_like(q)
    if num_reqs == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else 132
        num_splits = pick_num_splits(num_reqs, num_kv_heads, block_tables.shape[1] * page_size, num_sms)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits > 1:
        part_out = torch.empty(num_reqs, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_DTYPE=_dot_dtype(k_cache.dtype),
        num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_reqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )
    return out


# ---- paged extend (prefill) attention --------------------------------------------------------------------------


@triton.jit
def _extend_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [N, block_size, KVH, D], already holding this step's K/V
    v_cache_ptr,
    block_tables_ptr,  # [R, max_blocks]
    query_start_loc_ptr,  # [R + 1]
    context_lens_ptr,  # [R]
    out_ptr,  # [T, H, D]
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    DOT_DTYPE: tl.constexpr,
):
    """Program (request r, query head h, query tile m): rows [m * BLOCK_M, ...) of r's n new tokens, which sit at
    positions ctx - n + i and see every key at a position <= their own (cached prefix, then causal in the chunk)."""
    r = tl.program_id(0)
    head = tl.program_id(1)
    tile_m = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + r).to(tl.int32)
    num_queries = tl.load(query_start_loc_ptr + r + 1).to(tl.int32) - q_start
    if tile_m * BLOCK_M >= num_queries:  # the grid is sized for the longest chunk
        return
    ctx = tl.load(context_lens_ptr + r).to(tl.int32)
    kv_head = head // GROUP

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_queries
    q_pos = ctx - num_queries + rows  # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    q = (q * scale_log2).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + r.to(tl.int64) * stride_table
    # Keys past this tile's last query position are masked for every row: stop there (causal skip).
    end = tl.minimum(ctx, ctx - num_queries + (tile_m + 1) * BLOCK_M)
    for tile in range(0, end, BLOCK_N):
        keys = tile + tl.arange(0, BLOCK_N)
        k_mask = keys < end
        block_ids = tl.load(table + keys // PAGE_SIZE, mask=k_mask, other=0).to(tl.int64)
        kv_rows = (
            block_ids * stride_cache_block
            + (keys % PAGE_SIZE) * stride_cache_tok
            + kv_head * stride_cache_head
        )
        kv_mask = k_mask[:, None] & d_mask[None, :]
        k = (
            tl.load(k_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            .to(tl.float32)
            .to(DOT_DTYPE)
        )
        v = (
            tl.load(v_cache_ptr + kv_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
            .to(tl.float32)
            .to(DOT_DTYPE)
        )
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        visible = k_mask[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        # m_new is finite: key 0 is in the first tile and visible to every row.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + tokens[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def paged_extend_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [R, max_blocks]
    query_start_loc: torch.Tensor,  # [R + 1]
    context_lens: torch.Tensor,  # [R]
    scale: float,
    max_query_len: int,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:  # [T, H, D]
    """Varlen prefill over paged KV with a cached prefix (reference.paged_prefill_attention); this step's K/V must
    already be in the cache (store_kv first). max_query_len (a host int the caller knows) sizes the grid, so no
    device value is read back."""
    num_tokens, num_heads, head_dim, num_kv_heads, page_size = _check_attention(q, k_cache, v_cache)
    num_reqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    _check_index("context_lens", context_lens, (num_reqs,))
    _check_index("query_start_loc", query_start_loc, (num_reqs + 1,))
    _check_index("block_tables", block_tables, (num_reqs, None))
    _check_devices(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    out = torch.empty_like(q)
    if num_reqs == 0 or num_tokens == 0 or max_query_len <= 0:
        return out
    _extend_kernel[(num_reqs, num_heads, triton.cdiv(max_query_len, block_m))](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        context_lens,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        DOT_DTYPE=_dot_dtype(k_cache.dtype),
        num_warps=num_warps,
    )
    return out


# ---- checks ----------------------------------------------------------------------------------------------------


def _dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[cache_dtype]


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)}"
        )
    if (
        v_cache.shape != k_cache.shape
        or v_cache.stride() != k_cache.stride()
        or v_cache.dtype != k_cache.dtype
    ):
        raise ValueError("v_cache must have k_cache's shape, strides and dtype")
    if k_cache.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"cache dtype must be fp32, fp16 or bf16, got {k_cache.dtype}")
    if not k_cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous (a slot is a row of the [N * block_size] view)")


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    _check_cache(k_cache, v_cache)
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [tokens, heads, {head_dim}], got {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES or q.stride(2) != 1:
        raise ValueError(f"q: need fp32/fp16/bf16 with a contiguous last dim, got {q.dtype} {q.stride()}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {num_kv_heads} KV heads")
    return q.shape[0], q.shape[1], head_dim, num_kv_heads, page_size


def _check_index(name: str, x: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """An int32/int64 index tensor of the given shape (None: any size) with a contiguous last dim."""
    ok = x.dim() == len(shape) and all(s is None or x.shape[i] == s for i, s in enumerate(shape))
    if not ok:
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be [{want}], got {tuple(x.shape)}")
    if x.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")


def _check_devices(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
