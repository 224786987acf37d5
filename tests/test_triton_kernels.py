"""kernels/triton_attention.py against kernels/reference.py on small ragged shapes: shuffled, non-contiguous block
tables, block-boundary lengths, GQA ratios 1 and 3, a cached prefix for extend.

On CPU the kernels run under the Triton interpreter, in a child pytest process of this same file. Why a child:
triton picks interpreter vs compiler when `@triton.jit` decorates a function (knobs.runtime.interpret, read from
TRITON_INTERPRET), and that includes its own standard library (tl.max, tl.sum, tl.cdiv are @jit functions
decorated when triton is first imported). So TRITON_INTERPRET=1 must be set before the first `import triton` of
the process, and once set it would turn every later kernel of the process into an interpreted one. The child
gets it in its environment; this process never sets it. With CUDA the same tests run compiled on the GPU in this
process (fp32, fp16 and bf16 there; no bf16 arithmetic in the interpreter, which gets it wrong:
reference/cpu-feasibility.md §1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.batch import ScheduledRequest
from engine.cuda_graphs import DecodeBuffers
from engine.model import PagedLlama
from engine.model_store import resolve_model
from engine.protocol import SamplingParams
from engine.runner import build_forward_batch
from engine.weights import load_weights
from kernels import reference

pytest.importorskip("triton")
from kernels import triton_attention as kernels  # noqa: E402  (after the importorskip)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    BACKENDS = ["cpu"]
elif torch.cuda.is_available():
    BACKENDS = ["cuda"]
else:
    BACKENDS = [
        pytest.param("cpu", marks=pytest.mark.skip(reason="run by test_kernels_under_the_interpreter"))
    ]


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_kernels_under_the_interpreter() -> None:
    """Every test below, in a child process with TRITON_INTERPRET=1 (module docstring: why not in this one)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    t0 = time.perf_counter()
    child = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    summary = child.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert child.returncode == 0, (
        f"interpreted kernel tests failed:\n{child.stdout[-6000:]}\n{child.stderr[-2000:]}"
    )
    assert " passed" in summary[0] and "failed" not in summary[0], summary
    print(f"interpreter: {summary[0]} ({time.perf_counter() - t0:.1f}s with start-up)")


@pytest.fixture(params=BACKENDS)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def paged_kv(
    contexts: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches (junk outside the tables) and shuffled block tables [R, max_blocks + 1] int32 whose spare
    columns point at a real block: a kernel that reads past a request's context would pick up junk."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in contexts) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(-(-c // block_size) for c in contexts) + 1
    tables = torch.full((len(contexts), max_blocks), free[-1], dtype=torch.int32)
    for r, ctx in enumerate(contexts):
        blocks = [free.pop(0) for _ in range(-(-ctx // block_size))]
        tables[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return k_cache, v_cache, tables


def to(device: str, *xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.to(device) for x in xs]


# ---- KV store ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_reference(device: str, dtype: torch.dtype) -> None:
    """Strided k/v (a view of a fused qkv row, as the model passes them), -1 padding slots skipped, and a bf16
    cache too: the kernel only moves values. fp32 -> bf16 conversion is checked on GPU only: the interpreter
    rounds it differently from torch (1 ulp off on some values, triton 3.9), fp32 -> fp16 it rounds alike."""
    num_kv_heads, head_dim, block_size = 3, 24, 5
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, (4 + 2) * num_kv_heads * head_dim, generator=gen)
    if dtype == torch.bfloat16 and device == "cpu":
        qkv = qkv.to(dtype)
    k = qkv[:, 4 * num_kv_heads * head_dim : 5 * num_kv_heads * head_dim].view(7, num_kv_heads, head_dim)
    v = qkv[:, 5 * num_kv_heads * head_dim :].view(7, num_kv_heads, head_dim)
    slots = torch.tensor([13, 0, -1, 4, 29, -1, 5])  # block 2 offset 3, block 0 ... block 5 offset 4
    ref_k = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    ref_v = torch.randn(6, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    out_k, out_v = ref_k.clone().to(device), ref_v.clone().to(device)
    reference.store_kv(k, v, ref_k, ref_v, slots)
    kernels.store_kv(*to(device, k, v), out_k, out_v, slots.to(device))
    assert torch.equal(out_k.cpu(), ref_k) and torch.equal(out_v.cpu(), ref_v)


# ---- decode ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, contexts, num_splits",
    [
        (2, 2, [1, 16, 17, 5, 33], 1),  # GQA 1; lengths 1 and on both sides of the 16-token tile edge
        (6, 2, [1, 15, 16, 40], 1),  # GQA 3; 5-token pages: 15 and 40 end on a page edge
        (6, 2, [1, 33, 70, 2], 3),  # split-K: some splits of the short requests are empty
    ],
)
def test_decode_matches_reference(device: str, num_heads, num_kv_heads, contexts, num_splits) -> None:
    head_dim, block_size = 24, 5  # head_dim pads to 32 in the kernel, pages do not divide the 16-token tile
    for dtype in dtypes_for(device):
        k_cache, v_cache, tables = paged_kv(contexts, num_kv_heads, head_dim, block_size, dtype, seed=1)
        q = torch.randn(len(contexts), num_heads, head_dim, generator=torch.Generator().manual_seed(2))
        lens = torch.tensor(contexts, dtype=torch.int32)
        ref = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
        out = kernels.paged_decode_attention(
            *to(device, q, k_cache, v_cache, tables, lens), 0.3, num_splits=num_splits, block_n=16
        )
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol, msg=f"{dtype}")


def test_decode_half_q_and_zero_length_padding_row(device: str) -> None:
    """q/out in fp16 (a half model), int64 indices, and a context_len-0 padding row that comes out as zeros."""
    contexts = [9, 0, 21]
    k_cache, v_cache, tables = paged_kv([9, 1, 21], 1, 16, 4, torch.float16, seed=3)
    q = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(4)).half()
    lens = torch.tensor(contexts)
    out = kernels.paged_decode_attention(*to(device, q, k_cache, v_cache, tables.long(), lens), 0.25)
    assert out.dtype == torch.float16
    ref = reference.paged_decode_attention(q.float(), k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(out.cpu().float(), ref, atol=2e-2, rtol=2e-2)
    assert torch.equal(out[1].cpu(), torch.zeros(3, 16, dtype=torch.float16))


def test_pick_num_splits_fills_the_gpu_only_when_the_batch_does_not() -> None:
    from kernels.triton_attention import pick_num_splits

    assert pick_num_splits(1, 8, 4096, num_sms=132) == 16  # batch 1: 8 programs would idle 124 SMs
    assert pick_num_splits(1, 8, 300, num_sms=132) == 1  # too short to be worth a reduction launch
    assert pick_num_splits(64, 8, 4096, num_sms=132) == 1  # 512 programs already fill it


# ---- extend (prefill over a cached prefix) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, contexts, num_queries",
    [
        # whole prompt, chunk after a prefix, a single new token, a chunk crossing two query tiles
        (2, 2, [9, 23, 17, 35], [9, 4, 1, 20]),
        (6, 2, [16, 40, 1, 21], [16, 17, 1, 5]),  # GQA 3, page-edge contexts, a 1-token prompt
    ],
)
def test_extend_matches_reference(device: str, num_heads, num_kv_heads, contexts, num_queries) -> None:
    head_dim, block_size = 24, 5
    for dtype in dtypes_for(device):
        k_cache, v_cache, tables = paged_kv(contexts, num_kv_heads, head_dim, block_size, dtype, seed=5)
        qsl = torch.tensor([0, *torch.tensor(num_queries).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=torch.Generator().manual_seed(6))
        lens = torch.tensor(contexts, dtype=torch.int32)
        ref = reference.paged_prefill_attention(q, k_cache, v_cache, tables, qsl, lens, 0.2)
        out = kernels.paged_extend_attention(
            *to(device, q, k_cache, v_cache, tables, qsl, lens),
            0.2,
            max_query_len=max(num_queries),
            block_m=16,
            block_n=16,
        )
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol, msg=f"{dtype}")


def test_extend_after_store_equals_decode_for_one_token(device: str) -> None:
    """Store this step's K/V with the kernel, then extend: a 1-token request equals paged decode on it."""
    contexts = [7, 12]
    k_cache, v_cache, tables = paged_kv(contexts, 2, 16, 4, torch.float32, seed=7)
    gen = torch.Generator().manual_seed(8)
    k_new, v_new = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    slots = torch.tensor([int(tables[r, (c - 1) // 4]) * 4 + (c - 1) % 4 for r, c in enumerate(contexts)])
    q = torch.randn(2, 4, 16, generator=gen)
    k_cache, v_cache, tables, q = to(device, k_cache, v_cache, tables, q)
    kernels.store_kv(*to(device, k_new, v_new), k_cache, v_cache, slots.to(device))
    lens = torch.tensor(contexts, device=device)
    extend = kernels.paged_extend_attention(
        q, k_cache, v_cache, tables, torch.tensor([0, 1, 2], device=device), lens, 0.25, max_query_len=1
    )
    decode = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(extend, decode, atol=2e-6, rtol=1e-5)


# ---- launcher checks ----------------------------------------------------------------------------------------------


def test_launchers_reject_bad_inputs(device: str) -> None:
    k_cache, v_cache, tables = paged_kv([5, 9], 2, 16, 4, torch.float32, seed=9)
    q, lens = torch.randn(2, 4, 16), torch.tensor([5, 9])
    k_cache, v_cache, tables, q, lens = to(device, k_cache, v_cache, tables, q, lens)

    def decode(**changes):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens, scale=0.25)
        return kernels.paged_decode_attention(**{**args, **changes})

    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        decode(q=q[:, :3])
    with pytest.raises(ValueError, match=r"q must be \[tokens, heads, 16\]"):
        decode(q=torch.randn(2, 4, 8, device=device))
    with pytest.raises(ValueError, match="context_lens must be int32 or int64"):
        decode(context_lens=lens.float())
    with pytest.raises(ValueError, match=r"block_tables must be \[2, \*\]"):
        decode(block_tables=tables[:1])
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        decode(v_cache=v_cache.half())
    with pytest.raises(ValueError, match="contiguous"):
        decode(k_cache=k_cache.transpose(0, 1), v_cache=v_cache.transpose(0, 1))
    with pytest.raises(ValueError, match="contiguous last dim"):
        decode(q=q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="block_n"):
        decode(block_n=8)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[2\], got \(3,\)"):
        kernels.store_kv(q[:, :2], q[:, :2], k_cache, v_cache, torch.tensor([1, 2, 3], device=device))
    with pytest.raises(ValueError, match=r"query_start_loc must be \[3\]"):
        kernels.paged_extend_attention(
            q, k_cache, v_cache, tables, torch.tensor([0, 2], device=device), lens, 0.25, max_query_len=1
        )


# ---- the model on the Triton backend -----------------------------------------------------------------------------


def test_model_on_the_triton_backend_matches_the_cpu_path(device: str, tmp_path: Path) -> None:
    """PagedLlama with decode_backend="triton" (KV store, extend and decode kernels in every layer) against the
    default CPU path over three steps sharing one KV pool: two prompts; a chunk after a cached prefix mixed with a
    decode; then a decode-only step padded to a CUDA-graph size through the static DecodeBuffers, whose padding
    rows (slot -1, context 0) must change nothing for the real rows."""

    # synthetic:tiny (8 heads / 2 KV heads, llama3 RoPE): seeded random weights, the same on every device.
    model_dir = resolve_model("synthetic:tiny", cache_dir=tmp_path)
    block_size, greedy = 4, SamplingParams(temperature=0.0)
    reference_model = PagedLlama(load_weights(model_dir))
    model = PagedLlama(load_weights(model_dir, device=device), "triton")
    assert model.decode_backend == "triton"
    reference_kv = reference_model.allocate_kv_cache(32, block_size)
    kv = model.allocate_kv_cache(32, block_size)
    tables = {"a": [9, 3, 30, 14, 0, 22], "b": [17, 5, 26]}
    prompt_a, prompt_b = list(range(40, 51)), [7, 300, 12, 99, 5]

    def step(requests: list[tuple[str, list[int], int]]) -> None:
        scheduled = [ScheduledRequest(r, toks, start, tables[r], greedy, True) for r, toks, start in requests]
        prefills = [r for r in scheduled if r.num_tokens > 1]
        decodes = [r for r in scheduled if r.num_tokens == 1]
        expected = reference_model(build_forward_batch(prefills, decodes, block_size, "cpu"), reference_kv)
        if prefills:
            got = model(build_forward_batch(prefills, decodes, block_size, device), kv)
        else:  # decode-only: through the static buffers, padded from 2 requests to 4
            buffers = DecodeBuffers.allocate(4, max_blocks=8, device=device)
            buffers.fill(build_forward_batch([], decodes, block_size, "cpu"), size=4)
            got = model(buffers.forward_batch(4), kv)[: len(decodes)]
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)

    step([("a", prompt_a[:8], 0), ("b", prompt_b, 0)])
    step([("a", prompt_a[8:], 8), ("b", [61], 5)])  # a: 3-token chunk after an 8-token cached prefix
    step([("a", [77], 11), ("b", [62], 6)])
