"""CUDA graphs for decode-only steps: one graph per padded batch size, replayed over static input buffers.

A decode step of a small model on a GPU is mostly launch overhead (a few hundred kernels per step); replaying a
captured graph turns them into one launch. A graph fixes its tensors' addresses and shapes, so:

    batch of n decodes --pad--> P = the smallest capture size >= n   (1, 2, 4, 8, 16, 24, ..., 256, like vLLM)
    static buffers, one set for all sizes (size P uses the first P rows):
        token_ids[P]  positions[P]  slot_mapping[P]  context_lens[P]  block_tables[P, max_blocks]
    rows n..P-1 are padding: slot -1 (the KV store skips it), context 0 (attention gives zeros), token 0.

Each step copies the host batch into pinned staging tensors, then asynchronously into the static buffers (no
host synchronisation), replays graph P and returns its logits[:n]. The staging tensors are rewritten only at the
next step, after the sampler has read the sampled tokens back: that read waits for this step's copies too.

The padding arithmetic and the buffer bookkeeping are tested on CPU (tests/test_cuda_graphs.py); capture and
replay (DecodeGraphs) are UNTESTED ON A GPU as of this writing: see docs/architecture.md, issue 10.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch

from engine.model import ForwardBatch, KVCache, PagedLlama

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, *range(8, 257, 8))


def capture_sizes(max_batch_size: int, sizes: tuple[int, ...] = DEFAULT_CAPTURE_SIZES) -> list[int]:
    """The sizes to capture for batches up to max_batch_size: those below it, and max_batch_size itself so the
    largest batch the scheduler can build is never left to the eager path."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


def padded_size(num_requests: int, sizes: list[int]) -> int | None:
    """The smallest captured size >= num_requests (sizes sorted), or None when the batch is larger than all."""
    i = bisect.bisect_left(sizes, num_requests)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeBuffers:
    """The static inputs every captured graph reads, plus pinned host staging of the same layout."""

    token_ids: torch.Tensor  # [max_size] int64
    positions: torch.Tensor  # [max_size] int64
    slot_mapping: torch.Tensor  # [max_size] int64; -1 = padding (not stored)
    context_lens: torch.Tensor  # [max_size] int64; 0 = padding (zeros out)
    block_tables: torch.Tensor  # [max_size, max_blocks] int64
    staging: dict[str, torch.Tensor]  # the same five, on the host (pinned on CUDA)

    _FIELDS = ("token_ids", "positions", "slot_mapping", "context_lens", "block_tables")

    @classmethod
    def allocate(cls, max_size: int, max_blocks: int, device: torch.device | str) -> DecodeBuffers:
        device = torch.device(device)

        def zeros(*shape: int, pin: bool = False) -> torch.Tensor:
            on = "cpu" if pin else device
            return torch.zeros(*shape, dtype=torch.int64, device=on, pin_memory=pin and device.type == "cuda")

        shapes = {"block_tables": (max_size, max_blocks)}
        return cls(
            **{f: zeros(*shapes.get(f, (max_size,))) for f in cls._FIELDS},
            staging={f: zeros(*shapes.get(f, (max_size,)), pin=True) for f in cls._FIELDS},
        )

    @property
    def max_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def fill(self, batch: ForwardBatch, size: int) -> None:
        """Copy a host decode-only batch of n <= size requests into rows 0..n-1 and pad rows n..size-1.
        Block-table columns past the batch's own width keep stale ids: attention reads only the blocks that
        context_lens covers, so they are never read."""
        n, width = batch.decode_block_tables.shape
        if batch.num_prefill_tokens or not n <= size <= self.max_size or width > self.max_blocks:
            raise ValueError(f"batch of {n} decodes x {width} blocks does not fit size {size}")
        host = self.staging
        for name, value, pad in (
            ("token_ids", batch.token_ids, 0),
            ("positions", batch.positions, 0),
            ("slot_mapping", batch.slot_mapping, -1),
            ("context_lens", batch.decode_context_lens, 0),
        ):
            host[name][:n] = value
            host[name][n:size] = pad
        host["block_tables"][:n, :width] = batch.decode_block_tables
        for name in self._FIELDS:
            getattr(self, name)[:size].copy_(host[name][:size], non_blocking=True)

    def forward_batch(self, size: int) -> ForwardBatch:
        """The decode-only ForwardBatch over the first `size` rows that a graph of that size captures."""
        return ForwardBatch(
            token_ids=self.token_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            logits_indices=torch.arange(size, device=self.token_ids.device),
            prefill_query_start_loc=[0],
            prefill_context_lens=[],
            prefill_block_tables=[],
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
        )


class DecodeGraphs:
    """Captured decode steps of one model and KV cache. UNTESTED ON A GPU (issue 10): written against
    torch.cuda.graph's documented contract (warm up on a side stream, capture, replay over static inputs).

    Requires a forward pass with no host synchronisation and no data-dependent shapes in decode-only steps:
    the Triton backend (kernels/triton_attention.py) reads only shapes on the host."""

    def __init__(self, model: PagedLlama, kv: KVCache, max_batch_size: int, max_blocks: int) -> None:
        self.model, self.kv = model, kv
        self.sizes = capture_sizes(max_batch_size)
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks, model.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self) -> float:
        """Capture every size, largest first so the smaller graphs reuse its memory pool. The buffers hold
        padding only (slot -1, context 0), so capturing writes nothing into the KV cache. Returns seconds."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            batch = self.buffers.forward_batch(size)
            self.buffers.slot_mapping[:size] = -1
            self.buffers.context_lens[:size] = 0
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                # Twice, outside the capture: compiles the Triton kernels for this size's constants.
                for _ in range(2):
                    self.model(batch, self.kv)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                logits = self.model(batch, self.kv)
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        logger.info(
            "captured %d decode CUDA graphs (sizes %s) in %.1fs", len(self.sizes), self.sizes, elapsed
        )
        return elapsed

    def can_run(self, batch: ForwardBatch) -> bool:
        """Decode-only, at most the largest size, within the static table width, logits for every row."""
        n = batch.decode_block_tables.shape[0]
        return (
            bool(self._graphs)
            and batch.num_prefill_tokens == 0
            and 0 < n <= self.sizes[-1]
            and batch.decode_block_tables.shape[1] <= self.buffers.max_blocks
            and batch.logits_indices.shape[0] == n
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:  # [n, vocab] fp32, a view into the graph's output
        """batch: host tensors (build_forward_batch(..., "cpu")) whose logits_indices are 0..n-1. The returned
        view is overwritten by the next replay: sample from it before the next step."""
        n = batch.decode_block_tables.shape[0]
        size = padded_size(n, self.sizes)
        graph, logits = self._graphs[size]
        self.buffers.fill(batch, size)
        graph.replay()
        return logits[:n]
