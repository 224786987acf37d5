"""PagedLlama: our own forward pass for the Llama family over a paged KV cache (gpt-fast tone).

embed -> layers (RMSNorm, fused qkv, RoPE, store K/V by slot, paged attention, o_proj, RMSNorm, fused gate_up,
SiLU*up, down) -> final norm -> lm_head on the rows that need logits. One flat varlen batch per step (engine/batch.py):
prefill chunks first (attention per request over the cached prefix + causal chunk), then single-token decodes
(one batched paged-attention call per layer: a C kernel on CPU, Triton on CUDA, eager SDPA as the fallback).
On CUDA the "triton" backend also stores K/V and runs prefill attention with kernels/triton_attention.py.

Decode step, SmolLM2-135M, ctx 256, 1 thread, ms (2-vCPU Zen 5, 2026-11-23, neighbours busy; B=1 / 32 / 128):
    fp32  cpu-kernel  26 / 99 / 307     compiled  29 / 160 / 504     eager  28 / 145 / 521
    bf16  cpu-kernel  24 / 69 / 209     compiled  27 / 105 / 365     eager  26 / 120 / 448
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from engine.weights import LayerWeights, ModelWeights, rope_inv_freq
from kernels import cpu_paged_attention

logger = logging.getLogger(__name__)


DECODE_BACKENDS = ("auto", "cpu-kernel", "triton", "compiled", "eager")


def pick_decode_backend(
    requested: str, device: torch.device, kv_dtype: torch.dtype, head_dim: int, group: int
) -> str:
    """auto: the C kernel on CPU (kernels/cpu_paged_attention.py), Triton on CUDA (kernels/triton_attention.py;
    torch.compile where triton is missing), else eager SDPA. KAIROS_DECODE_ATTENTION overrides auto."""
    if requested == "auto":
        requested = os.environ.get("KAIROS_DECODE_ATTENTION", "auto")
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"decode attention backend {requested!r}: expected one of {DECODE_BACKENDS}")
    if requested == "auto":
        if device.type == "cpu" and cpu_paged_attention.available(head_dim, group, kv_dtype):
            return "cpu-kernel"
        if device.type == "cuda":
            return "triton" if _has_triton() else "compiled"
        return "eager"
    return requested


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ForwardBatch:
    """One step's flat inputs (T tokens). Tokens [0, num_prefill_tokens) are prefill chunks, the rest decodes."""

    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [R] int64: rows whose logits are returned, in this order
    # prefill chunks (any request with more than one query token); Python ints: attention loops over them
    prefill_query_start_loc: list[int]  # [P + 1], prefill_query_start_loc[-1] == num_prefill_tokens
    prefill_context_lens: list[int]  # [P]
    prefill_block_tables: list[torch.Tensor]  # P x [num_blocks_r] int64
    # decodes: one query token each
    decode_block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0 (masked off)
    decode_context_lens: torch.Tensor  # [B] int64

    @property
    def num_prefill_tokens(self) -> int:
        return self.prefill_query_start_loc[-1]

    @cached_property
    def prefill_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(query_start_loc [P + 1], context_lens [P], block_tables [P, max_blocks], max_query_len) on the batch's
        device, for the Triton extend kernel; built once per step (not per layer), copied from pinned memory."""
        device = self.token_ids.device
        qsl, lens = self.prefill_query_start_loc, self.prefill_context_lens

        def to_device(values: list[int]) -> torch.Tensor:
            host = torch.tensor(values, dtype=torch.int64)
            return (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)

        tables = torch.nn.utils.rnn.pad_sequence(self.prefill_block_tables, batch_first=True)
        max_query_len = max((qsl[i + 1] - qsl[i] for i in range(len(lens))), default=0)
        return to_device(qsl), to_device(lens), tables, max_query_len


class KVCache:
    """Per-layer K and V pools, each [num_blocks, block_size, num_kv_heads, head_dim], carved from one tensor."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.storage = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.k = [self.storage[i, 0] for i in range(num_layers)]
        self.v = [self.storage[i, 1] for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size  # K and V


# ---- attention -----------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """Batched paged decode attention over a padded [B, max_blocks * block_size] view with a length mask.

    Written as broadcast-multiply + sum (not matmul) so inductor fuses the block-table gather into the reductions
    and never materialises the gathered K/V; eager runs it too (slowly; see decode_attention_eager).
    """
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache[block_tables].flatten(1, 2).unsqueeze(3)  # [B, T, KVH, 1, D]
    v = v_cache[block_tables].flatten(1, 2).unsqueeze(3)
    scores = (q.view(num_reqs, 1, num_kv_heads, group, head_dim) * k).sum(-1) * scale  # [B, T, KVH, G]
    pad = torch.arange(k.shape[1], device=q.device)[None, :] >= context_lens[:, None]  # [B, T]
    scores = scores.masked_fill(pad[:, :, None, None], float("-inf"))
    probs = scores.softmax(dim=1)
    return (probs.unsqueeze(-1) * v).sum(1).view(num_reqs, num_heads, head_dim)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:  # [*ids.shape, bs, KVH, D]
    """cache[block_ids] via index_select on a 2-D view: ~7x faster than advanced indexing on CPU."""
    flat = cache.view(cache.shape[0], -1).index_select(0, block_ids.reshape(-1))
    return flat.view(*block_ids.shape, *cache.shape[1:])


def decode_attention_eager(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The portable path: gather the padded K/V once, then SDPA with a length mask; the G query heads of a KV
    head ride along as SDPA's query-length axis, so K/V are never repeated for GQA."""
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = gather_blocks(k_cache, block_tables).flatten(1, 2).transpose(1, 2).to(q.dtype)  # [B, KVH, T, D]
    v = gather_blocks(v_cache, block_tables).flatten(1, 2).transpose(1, 2).to(q.dtype)
    visible = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]  # [B, T]
    out = F.scaled_dot_product_attention(
        q.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim),
        k,
        v,
        attn_mask=visible[:, None, None, :],
        scale=scale,
    )  # [B, KVH, G, D]
    return out.reshape(num_reqs, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """q, k, v [P_tokens, heads, D] of the prefill chunks; a Python loop over requests (chunks are few and long)."""
    out = torch.empty_like(q)
    qsl = batch.prefill_query_start_loc
    block_size = k_cache.shape[1]
    for r, ctx in enumerate(batch.prefill_context_lens):
        start, end = qsl[r], qsl[r + 1]
        n = end - start
        if ctx == n:  # no cached prefix: the chunk's own K/V, plain causal
            kr, vr, mask, causal = k[start:end], v[start:end], None, True
        else:  # prefix in the cache (already holds this chunk too): query i sits at ctx - n + i
            blocks = batch.prefill_block_tables[r][: (ctx + block_size - 1) // block_size]
            kr = gather_blocks(k_cache, blocks).flatten(0, 1)[:ctx].to(q.dtype)
            vr = gather_blocks(v_cache, blocks).flatten(0, 1)[:ctx].to(q.dtype)
            q_pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n, ctx]
            causal = False
        # 4-D in: with 3-D inputs SDPA silently takes its slow math path instead of the CPU flash kernel.
        o = F.scaled_dot_product_attention(
            q[None, start:end].transpose(1, 2),
            kr[None].transpose(1, 2),
            vr[None].transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )  # [1, H, n, D]
        out[start:end] = o[0].transpose(0, 1)
    return out


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """prefill_attention as one varlen Triton launch over the paged cache (which already holds this step's K/V,
    so k and v are unused)."""
    from kernels import triton_attention

    qsl, context_lens, block_tables, max_query_len = batch.prefill_tensors
    return triton_attention.paged_extend_attention(
        q, k_cache, v_cache, block_tables, qsl, context_lens, scale, max_query_len
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """K/V rows into their slots. [N * block_size, KVH, D] views: row index == slot. index_copy_ is a row memcpy;
    index_put_ is not."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# ---- the model -----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as HF LlamaRMSNorm (normalise in fp32, cast back, then scale), so fp32 results match bit for bit.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def row_bucket(m: int) -> int:
    """The row count a oneDNN GEMM runs at: m itself up to 16, else m rounded up to 1/8 of its power of two
    (17..32 by 2, 33..64 by 4, ..., 1025..2048 by 128): at most 12.5 % padded rows, 72 shapes up to 2048."""
    if m <= 16:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN. fp32 F.linear on CPU goes to MKL, which runs 2.2-2.4x slower than oneDNN on the
    AMD Zen 5 we serve on (M >= 32: ~100 vs ~230 GFLOP/s per core); bf16 already goes to oneDNN.

    The rows are padded to `row_bucket(M)`. oneDNN builds (JIT-compiles) and caches a primitive per input shape,
    and a serving engine sees almost every M from 1 to max_num_batched_tokens: unpadded, the 30-minute soak's
    engine process grew ~40 MiB a minute (cached primitives plus glibc heap fragmented by their scratch buffers,
    docs/results/reliability.md); padded, the shapes are a fixed few and it stays flat. Rows are independent in a
    GEMM: a real row's result does not depend on the (zero) padding rows, and is the same whenever the same bucket
    runs."""
    m = x.shape[0] if x.dim() == 2 else -1
    if m < 0 or (b := row_bucket(m)) == m:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    padded = x.new_empty(b, x.shape[1])
    padded[:m] = x
    padded[m:].zero_()
    return torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")[:m]


def pick_matmul(device: torch.device) -> Callable[..., torch.Tensor]:
    """oneDNN on CPU where this torch has it (KAIROS_CPU_MATMUL=mkl forces F.linear), F.linear elsewhere."""
    if device.type != "cpu" or os.environ.get("KAIROS_CPU_MATMUL", "onednn") != "onednn":
        return F.linear
    try:
        probe = torch.ones(2, 3)
        if torch.allclose(onednn_linear(probe, probe, torch.ones(2)), F.linear(probe, probe, torch.ones(2))):
            return onednn_linear
    except (RuntimeError, AttributeError):
        pass
    logger.warning("oneDNN linear is not available in this torch build; fp32 matmuls use F.linear (MKL)")
    return F.linear


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PagedLlama:
    def __init__(self, weights: ModelWeights, decode_backend: str = "auto") -> None:
        self.weights = weights
        arch = self.arch = weights.arch
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim**-0.5
        inv_freq, self.rope_scaling = rope_inv_freq(arch)
        self.inv_freq = inv_freq.to(weights.embed.device)
        group = self.num_heads // self.num_kv_heads
        self.decode_backend = pick_decode_backend(
            decode_backend, self.device, self.kv_dtype, self.head_dim, group
        )
        self._matmul = pick_matmul(self.device)
        self._decode_attention: Callable[..., torch.Tensor] = decode_attention_eager
        self._prefill_attention: Callable[..., torch.Tensor] = prefill_attention
        self._store_kv: Callable[..., None] = store_kv
        if self.decode_backend == "triton":
            from kernels import triton_attention  # imports triton: only where it is used

            self._decode_attention = triton_attention.paged_decode_attention
            self._prefill_attention = prefill_attention_triton
            self._store_kv = triton_attention.store_kv
        elif self.decode_backend == "cpu-kernel":
            self._decode_attention = cpu_paged_attention.paged_decode_attention
        elif self.decode_backend == "compiled":
            # Default torch.compile (automatic dynamic), NOT dynamic=True: that also makes head_dim and KVH
            # symbolic and runs 2.5x slower (reference/cpu-feasibility.md §2).
            self._decode_attention = torch.compile(decode_attention)
        logger.info("decode attention: %s", self.decode_backend)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias. With bf16 weights (--dtype bfloat16) the matmul runs in bf16 and the fp32
        activations are cast around it, autocast-style: on CPUs with AVX512-BF16 that GEMM is ~4x faster."""
        if weight.dtype == x.dtype:
            return self._matmul(x, weight, bias)
        out = self._matmul(x.to(weight.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        """Activations, norms, softmax: fp32 always. The weights may be bf16: see linear()."""
        return torch.float32

    @property
    def kv_dtype(self) -> torch.dtype:
        """bf16 with bf16 weights (half the bytes for decode attention to read, twice the tokens), else fp32."""
        # The embedding has the matmul dtype too, and unlike layer 0 it survives a KunServe parameter drop.
        return torch.bfloat16 if self.weights.embed.dtype == torch.bfloat16 else torch.float32

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, num_layers: int = 0
    ) -> KVCache:
        """num_layers: 0 = every layer; a pipeline stage passes the length of its layer range."""
        return KVCache(
            num_layers or self.arch.num_layers,
            num_blocks,
            block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype or self.kv_dtype,
            self.device,
        )

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x [T, 1, D]
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2], exactly HF's product
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:  # [R, vocab] fp32 logits
        h = self.embed(batch)
        h = self.forward_layers(h, batch, kv, range(self.arch.num_layers))
        return self.logits(h, batch)

    __call__ = forward

    # The three phases, callable apart so that a KunServe pipeline (engine/pipeline.py) runs a layer range per
    # stage: stage 0 embeds, every stage runs its layers on its own KV, the last stage computes logits.

    def embed(self, batch: ForwardBatch) -> torch.Tensor:  # [T, hidden]
        return F.embedding(batch.token_ids, self.weights.embed).to(self.dtype)

    def forward_layers(
        self, h: torch.Tensor, batch: ForwardBatch, kv: KVCache, layers: range
    ) -> torch.Tensor:
        """Run `layers` (contiguous) over h [T, hidden]; kv holds exactly these layers, kv.k[0] is layers[0]."""
        cos, sin = self.rope(batch.positions)
        for j, i in enumerate(layers):
            h = self._layer(h, self.weights.layers[i], kv.k[j], kv.v[j], cos, sin, batch)
        return h

    def logits(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # [R, vocab] fp32
        h = rms_norm(h[batch.logits_indices], self.weights.norm, self.arch.rms_norm_eps)
        return self.linear(h, self.weights.lm_head).float()

    def _layer(
        self,
        h: torch.Tensor,
        layer: LayerWeights,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        num_tokens = h.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = rms_norm(h, layer.input_norm, self.arch.rms_norm_eps)
        qkv = self.linear(x, layer.qkv, layer.qkv_bias)  # [T, (H + 2 KVH) * D]
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q, k, v = q.view(num_tokens, nh, d), k.view(num_tokens, nkv, d), v.view(num_tokens, nkv, d)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self._store_kv(k, v, k_cache, v_cache, batch.slot_mapping)

        p = batch.num_prefill_tokens
        if p == num_tokens:
            attn = self._prefill_attention(q, k, v, k_cache, v_cache, batch, self.scale)
        elif p == 0:
            attn = self._decode_attention(
                q, k_cache, v_cache, batch.decode_block_tables, batch.decode_context_lens, self.scale
            )
        else:
            attn = torch.cat(
                [
                    self._prefill_attention(q[:p], k[:p], v[:p], k_cache, v_cache, batch, self.scale),
                    self._decode_attention(
                        q[p:],
                        k_cache,
                        v_cache,
                        batch.decode_block_tables,
                        batch.decode_context_lens,
                        self.scale,
                    ),
                ]
            )
        h = h + self.linear(attn.reshape(num_tokens, nh * d), layer.o_proj, layer.o_bias)
        x = rms_norm(h, layer.post_norm, self.arch.rms_norm_eps)
        gate, up = self.linear(x, layer.gate_up).chunk(2, dim=-1)
        return h + self.linear(F.silu(gate) * up, layer.down)
