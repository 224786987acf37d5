"""KunServe's pipeline mode: replicas that dropped layers run one model together, and KV moves with the layers.

    Stage             one replica's part of a group: its ModelRunner, the contiguous layers it keeps, and a KV pool
                      that holds those layers only ([len(layers), 2, num_blocks, bs, KVH, D]).
    PipelineRunner    the Runner of a group of k ≥ 2 stages: embed on stage 0, each stage runs its layers on its
                      own KV, hidden states [T, hidden] are handed to the next stage's device, logits and sampling
                      on the last stage. One block id names the same block in every stage's pool.
    gather_kv /       KV exchange (papers.md §2.2 item 5): copy blocks out of a group's stages into one host tensor
    scatter_kv        [L, 2, n, bs, KVH, D] (every layer), and from it into another group's stages. A regroup
                      stages everything through host memory so that the old pools are freed before the new ones are
                      allocated: device memory never holds both (the paper instead maps freed weight pages into
                      the pool with GPU virtual memory, and exchanges peer to peer).
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


def gather_kv(stages: list[Stage], block_ids: list[int]) -> torch.Tensor:
    """Blocks `block_ids` of a group, every layer, into one host tensor [L, 2, n, bs, KVH, D] (stage order)."""
    parts = []
    for stage in stages:
        index = torch.tensor(block_ids, dtype=torch.int64, device=stage.kv.storage.device)
        parts.append(stage.kv.storage.index_select(2, index).cpu())
    return torch.cat(parts)


def scatter_kv(stages: list[Stage], block_ids: list[int], host: torch.Tensor) -> None:
    """Inverse of gather_kv into another group: row j of `host` goes to block block_ids[j] of every stage."""
    for stage in stages:
        storage = stage.kv.storage
        index = torch.tensor(block_ids, dtype=torch.int64, device=storage.device)
        rows = host[stage.layers.start : stage.layers.stop].to(storage.device)
        storage.index_copy_(2, index, rows)


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
