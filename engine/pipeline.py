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

Micro-batches: a step splits its batch into two micro-batches balanced by token and attention cost
(split_micro_batches) and issues them as a wavefront over the stages (PipelineRunner). On CPU the stages share the
same cores, so this only interleaves work; the overlap it is for needs separate devices (untested, no GPU here).
The paper's lookahead also re-forms micro-batches from the queue; here the scheduler's batch is split as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.batch import ModelOutput, ScheduledRequest, SchedulerOutput
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
    for i in range(len(host_layers)):
        if i not in layers:
            weights.layers[i] = None
        else:
            reload_layer(runner, i, host_layers)


def reload_layer(runner: ModelRunner, index: int, host_layers: list[LayerWeights]) -> int:
    """Copy decoder layer `index` back from the host copy onto the runner's device if it is missing; its bytes
    (0 if it was there). A pipeline stage ignores layers outside its range, so this can run between steps."""
    weights = runner.model.weights
    if weights.layers[index] is not None:
        return 0
    host = host_layers[index]
    weights.layers[index] = LayerWeights(
        **{k: None if t is None else t.to(runner.device, copy=True) for k, t in vars(host).items()}
    )
    return layer_bytes(host)


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


def request_cost(r: ScheduledRequest, attention_weight: float) -> float:
    """A request's share of a stage's time: its tokens through the linear layers plus its attention, the query
    tokens times the keys they see (a prefill chunk of n tokens from position p sees p + (n + 1) / 2 on average).
    KunServe §lookahead: a token-count model alone misses the attention term by 48–74 % (papers.md §2.4)."""
    attention_pairs = r.num_tokens * (r.start_position + (r.num_tokens + 1) / 2)
    return r.num_tokens + attention_weight * attention_pairs


def split_micro_batches(
    scheduled: list[ScheduledRequest], num_micro_batches: int, attention_weight: float
) -> list[list[ScheduledRequest]]:
    """Longest-processing-time-first: the costliest request goes to the lightest micro-batch, so their costs
    differ by at most one request's. Empty micro-batches are left out; each keeps prefills before decodes."""
    loads = [0.0] * num_micro_batches
    parts: list[list[ScheduledRequest]] = [[] for _ in range(num_micro_batches)]
    for r in sorted(scheduled, key=lambda r: -request_cost(r, attention_weight)):
        i = loads.index(min(loads))
        parts[i].append(r)
        loads[i] += request_cost(r, attention_weight)
    order = {r.request_id: i for i, r in enumerate(scheduled)}
    return [sorted(p, key=lambda r: (r.num_tokens == 1, order[r.request_id])) for p in parts if p]


class PipelineRunner:
    """The Runner (engine/core.py) of one pipeline group; the scheduler sees one pool of `num_kv_blocks`.

    A step splits the batch into `num_micro_batches` (split_micro_batches) and issues them as a wavefront:
    at tick t stage s runs micro-batch t − s, so on separate CUDA devices (asynchronous launches, one stream
    each) stage s+1 works on micro-batch m while stage s works on m + 1. Untested: there is no GPU here. On CPU
    the stages share the cores and run one after the other, so the split only costs (smaller GEMMs); outputs are
    the same either way, each request's attention reads its own KV only."""

    def __init__(self, stages: list[Stage], num_micro_batches: int = 2) -> None:
        self.stages = stages
        self.num_micro_batches = num_micro_batches
        first, last = stages[0].runner, stages[-1].runner
        # attention pair vs token through the layers, in FLOPs: 4·hidden (QK and PV) vs ~24·hidden² (Llama)
        self.attention_weight = 1 / (6 * first.model.arch.hidden_size)
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
        if out.swap_out or out.swap_in:  # its scheduler gets no swap space (replicas.py)
            raise ValueError("a pipeline group has no host swap space")
        self._last.forget_generators(out.finished_request_ids)
        if not out.scheduled:
            return ModelOutput(sampled={}, elapsed_seconds=time.perf_counter() - t0)
        micro = split_micro_batches(out.scheduled, self.num_micro_batches, self.attention_weight)
        batches: dict[tuple[int, str], object] = {}  # one ForwardBatch per micro-batch and device
        hidden: list = [None] * len(micro)  # [T_m, hidden] of micro-batch m, on its last stage's device
        k = len(self.stages)
        for tick in range(len(micro) + k - 1):
            for s in range(max(0, tick - len(micro) + 1), min(tick, k - 1) + 1):
                m, stage = tick - s, self.stages[s]
                device = stage.runner.device
                if (batch := batches.get((m, device))) is None:
                    parts = micro[m]
                    prefills = [r for r in parts if r.num_tokens > 1]
                    decodes = [r for r in parts if r.num_tokens == 1]
                    batch = batches[m, device] = build_forward_batch(
                        prefills, decodes, self.block_size, device
                    )
                model = stage.runner.model
                h = model.embed(batch) if s == 0 else hidden[m].to(device)  # the hand-over: [T_m, hidden]
                hidden[m] = model.forward_layers(h, batch, stage.kv, stage.layers)
        sampled: dict[str, int] = {}
        device = self._last.device
        for m, parts in enumerate(micro):
            logits = self._last.model.logits(hidden[m], batches[m, device])
            sampled |= self._last.sample_tokens(logits, parts)
        return ModelOutput(sampled=sampled, elapsed_seconds=time.perf_counter() - t0)
