"""KunServe's pipeline mode: replicas that dropped layers run one model together, and KV moves with the layers.

    Stage             one replica's part of a group: its ModelRunner, the contiguous layers it keeps, and a KV pool
                      that holds those layers only ([len(layers), 2, num_blocks, bs, KVH, D]).
    PipelineRunner    the Runner of a group of k ≥ 2 stages: embed on stage 0, each stage runs its layers on its
                      own KV, hidden states [T, hidden] are handed to the next stage's device, logits and sampling
                      on the last stage. One block id names the same block in every stage's pool.
    exchange_kv       KV exchange (papers.md §2.2 item 5), layer by layer: a layer whose replica keeps it is copied
                      on that replica's device (old pool to new pool); only the layers that change replica travel,
                      through a host buffer of one layer's blocks. In a 2-replica merge r0's requests move only
                      layers [L/2, L) and r1's only [0, L/2): half of the KV crosses. The price: a replica holds its
                      old and new pools side by side during a regroup. The paper avoids both copy and peak by
                      mapping the freed weight pages into the pool with GPU virtual memory (not built).
    keep_layers       drop the decoder layers a replica no longer serves (their tensors are released) and reload the
                      ones it serves again from the host copy.

Micro-batches: a step runs the stages one after the other, one batch in flight. On CPU the stages share the same
cores, so a second micro-batch would only interleave work, not overlap it; on GPUs two micro-batches (the paper's
lookahead batch formation) would keep both stages busy, and are not built yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.batch import ModelOutput, SchedulerOutput
from engine.model import KVCache
from engine.runner import ModelRunner, build_forward_batch
from engine.weights import LayerWeights


@dataclass
class Stage:
    runner: ModelRunner  # the replica (its device, its weights)
    layers: range  # the decoder layers it runs, contiguous
    kv: KVCache  # those layers' K/V: kv.k[j] is layer layers[j]


def layer_bytes(layer: LayerWeights) -> int:
    return sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))


def keep_layers(runner: ModelRunner, layers: range, host_layers: list[LayerWeights]) -> None:
    """Make `runner` hold exactly `layers` of the decoder: the others are dropped (the list entry becomes None,
    releasing the replica's tensors), missing ones are copied back from the host copy onto the runner's device.
    Embedding, final norm and lm_head stay on every replica: stage 0 embeds, the last stage computes logits."""
    weights = runner.model.weights
    for i, host in enumerate(host_layers):
        if i not in layers:
            weights.layers[i] = None
        elif weights.layers[i] is None:
            weights.layers[i] = LayerWeights(
                **{k: None if t is None else t.to(runner.device, copy=True) for k, t in vars(host).items()}
            )


@dataclass
class ExchangeBytes:
    moved: int = 0  # KV bytes that changed replica (through a host buffer of one layer's blocks)
    local: int = 0  # KV bytes copied on their own replica's device (old pool to new pool)


def exchange_kv(
    old: list[Stage], new: list[Stage], src_ids: list[int], dst_ids: list[int], tally: ExchangeBytes
) -> None:
    """Blocks `src_ids` of a dissolved group's stages into blocks `dst_ids` of a new group's stages, one layer at a
    time. A layer kept by the same replica is copied on its device; a layer that changes replica goes through a host
    buffer of that one layer's blocks [2, n, bs, KVH, D] (papers.md §2.2 item 5: the authors chunk the exchange per
    layer so activations can pre-empt it between layers; here it also bounds the staging buffer)."""
    for dst in new:
        rows = torch.tensor(dst_ids, dtype=torch.int64, device=dst.kv.storage.device)
        for layer in dst.layers:
            src = next(s for s in old if layer in s.layers)
            index = torch.tensor(src_ids, dtype=torch.int64, device=src.kv.storage.device)
            chunk = src.kv.storage[layer - src.layers.start].index_select(1, index)  # [2, n, bs, KVH, D]
            num_bytes = chunk.numel() * chunk.element_size()
            if src.runner is dst.runner:
                tally.local += num_bytes
            else:
                chunk = chunk.cpu().to(dst.kv.storage.device)
                tally.moved += num_bytes
            dst.kv.storage[layer - dst.layers.start].index_copy_(1, rows, chunk)


class PipelineRunner:
    """The Runner (engine/core.py) of one pipeline group; the scheduler sees one pool of `num_kv_blocks`."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        first, last = stages[0].runner, stages[-1].runner
        self.num_kv_blocks = min(s.kv.num_blocks for s in stages)
        self.block_size = first.block_size
        self.max_model_len = first.max_model_len
        self.eos_token_ids = first.eos_token_ids
        self.model_name = first.model_name
        self.device = "+".join(s.runner.device for s in stages)
        self._last = last

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        t0 = time.perf_counter()
        if out.swap_out or out.swap_in:
            raise ValueError(
                "a pipeline group has no host swap space"
            )  # its scheduler gets none (replicas.py)
        self._last.forget_generators(out.finished_request_ids)
        if not out.scheduled:
            return ModelOutput(sampled={}, elapsed_seconds=time.perf_counter() - t0)
        prefills = [r for r in out.scheduled if r.num_tokens > 1]
        decodes = [r for r in out.scheduled if r.num_tokens == 1]
        batches: dict[str, object] = {}  # one ForwardBatch per device (the stages of one host share one)
        h = None
        for stage in self.stages:
            device = stage.runner.device
            if (batch := batches.get(device)) is None:
                batch = batches[device] = build_forward_batch(prefills, decodes, self.block_size, device)
            model = stage.runner.model
            h = model.embed(batch) if h is None else h.to(device)  # the hand-over: [T, hidden]
            h = model.forward_layers(h, batch, stage.kv, stage.layers)
        logits = self._last.model.logits(h, batch)
        sampled = self._last.sample_tokens(logits, prefills + decodes)
        return ModelOutput(sampled=sampled, elapsed_seconds=time.perf_counter() - t0)
