"""Paged decode attention for CPU: a small C kernel built with the system gcc at first use, called through ctypes.

Spec: kernels.reference.paged_decode_attention (same arguments, fp32). One OpenMP task per (request, KV head):
pass 1 scores the G query heads of the group against each cached key (read straight from its block, no gather),
pass 2 accumulates softmax(scores) @ V. Inductor's code for the same math is ~3x slower (latency-bound reductions
and per-element index checks; measured in engine/model.py's docstring). No compiler -> `available()` is False and
the caller falls back to torch. The .so is cached per source + CPU flags under $KAIROS_CACHE_DIR/kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The rows of one block are 16 small strided reads and the next block is anywhere: the hardware prefetcher
   cannot guess it, so ask for the whole next block (HEAD_DIM floats of each of its rows) one block ahead. */
static inline void prefetch_block(const float* p, int64_t row, int64_t block_size) {
    for (int64_t t = 0; t < block_size; t++, p += row)
        for (int d = 0; d < HEAD_DIM; d += 16) __builtin_prefetch(p + d, 0, 3);
}

/* q [B, H, D]; k_cache, v_cache [N, BS, KVH, D]; block_tables [B, MAXB] int64; context_lens [B] int64;
   out [B, H, D]. HEAD_DIM and GROUP (= H / KVH) are compile-time constants so the d-loops fully vectorise. */
void paged_decode_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* block_tables,
                      const int64_t* context_lens, float* out, int64_t num_reqs, int64_t num_kv_heads,
                      int64_t block_size, int64_t max_blocks, float scale, int num_threads) {
    const int64_t row = num_kv_heads * HEAD_DIM;  /* floats per cached token */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t task = 0; task < num_reqs * num_kv_heads; task++) {
        const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t ctx = context_lens[b];
        const int64_t num_blocks = (ctx + block_size - 1) / block_size;
        const int64_t* table = block_tables + b * max_blocks;
        float qg[GROUP][HEAD_DIM], acc[GROUP][HEAD_DIM], m[GROUP], l[GROUP];
        for (int g = 0; g < GROUP; g++) {
            for (int d = 0; d < HEAD_DIM; d++) qg[g][d] = q[((b * num_kv_heads + h) * GROUP + g) * HEAD_DIM + d] * scale;
            for (int d = 0; d < HEAD_DIM; d++) acc[g][d] = 0.f;
            m[g] = -INFINITY;
            l[g] = 0.f;
        }
        float* scores = (float*)malloc(sizeof(float) * (num_blocks * block_size) * GROUP);  /* [t][GROUP] */
        /* pass 1: scores, block by block (no per-token division) */
        for (int64_t j = 0; j < num_blocks; j++) {
            const float* k = k_cache + table[j] * block_size * row + h * HEAD_DIM;
            if (j + 1 < num_blocks) prefetch_block(k_cache + table[j + 1] * block_size * row + h * HEAD_DIM, row, block_size);
            const int64_t n = ctx - j * block_size < block_size ? ctx - j * block_size : block_size;
            float* s = scores + j * block_size * GROUP;
            for (int64_t t = 0; t < n; t++, k += row) {
                for (int g = 0; g < GROUP; g++) {
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int d = 0; d < HEAD_DIM; d++) dot += qg[g][d] * k[d];
                    s[t * GROUP + g] = dot;
                    m[g] = dot > m[g] ? dot : m[g];
                }
            }
        }
        for (int64_t t = 0; t < ctx; t++)
            for (int g = 0; g < GROUP; g++) {
                const float e = expf(scores[t * GROUP + g] - m[g]);
                scores[t * GROUP + g] = e;
                l[g] += e;
            }
        /* pass 2: acc = P @ V */
        prefetch_block(v_cache + table[0] * block_size * row + h * HEAD_DIM, row, block_size);
        for (int64_t j = 0; j < num_blocks; j++) {
            const float* v = v_cache + table[j] * block_size * row + h * HEAD_DIM;
            if (j + 1 < num_blocks) prefetch_block(v_cache + table[j + 1] * block_size * row + h * HEAD_DIM, row, block_size);
            const int64_t n = ctx - j * block_size < block_size ? ctx - j * block_size : block_size;
            const float* p = scores + j * block_size * GROUP;
            for (int64_t t = 0; t < n; t++, v += row)
                for (int g = 0; g < GROUP; g++) {
                    const float pg = p[t * GROUP + g];
                    #pragma omp simd
                    for (int d = 0; d < HEAD_DIM; d++) acc[g][d] += pg * v[d];
                }
        }
        float* o = out + (b * num_kv_heads + h) * GROUP * HEAD_DIM;
        for (int g = 0; g < GROUP; g++) {
            const float inv = 1.f / l[g];
            for (int d = 0; d < HEAD_DIM; d++) o[g * HEAD_DIM + d] = acc[g][d] * inv;
        }
        free(scores);
    }
}
"""

_libs: dict[tuple[int, int], ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(head_dim: int, group: int) -> ctypes.CDLL | None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler: CPU paged attention falls back to torch")
        return None
    key = hashlib.sha256(f"{_SOURCE}{head_dim}{group}{_cpu_flags()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KAIROS_CACHE_DIR") or Path.home() / ".cache" / "kairos") / "kernels"
    so = cache / f"paged_decode_d{head_dim}_g{group}_{key}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(_SOURCE)
            cmd = [
                compiler,
                "-O3",
                "-march=native",
                "-ffast-math",
                "-fno-finite-math-only",
                "-fopenmp",
                "-shared",
                "-fPIC",
                f"-DHEAD_DIM={head_dim}",
                f"-DGROUP={group}",
                str(src),
                "-o",
                str(out),
            ]
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                logger.warning(
                    "CPU paged attention did not compile, falling back to torch: %s", e.stderr[-500:]
                )
                return None
            os.replace(out, so)  # atomic: concurrent builders (replicas) never load a half-written file
        logger.info("built %s", so.name)
    lib = ctypes.CDLL(str(so))
    lib.paged_decode_f32.restype = None
    lib.paged_decode_f32.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    )
    return lib


def available(head_dim: int, group: int) -> bool:
    """Compiles on first call for this (head_dim, group); False where no compiler works."""
    if (head_dim, group) not in _libs:
        _libs[(head_dim, group)] = _build(head_dim, group)
    return _libs[(head_dim, group)] is not None


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D] fp32
    k_cache: torch.Tensor,  # [N, block_size, KVH, D] fp32
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    num_reqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if not available(head_dim, group):
        raise RuntimeError("CPU paged attention kernel is not available")
    q, block_tables, context_lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    for t in (q, k_cache, v_cache):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    assert block_tables.dtype == torch.int64 and context_lens.dtype == torch.int64
    out = torch.empty_like(q)
    _libs[(head_dim, group)].paged_decode_f32(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        num_reqs,
        num_kv_heads,
        block_size,
        block_tables.shape[1],
        scale,
        torch.get_num_threads(),
    )
    return out
