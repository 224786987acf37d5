"""ModelRunner: turns a SchedulerOutput into one forward pass and one sampled token per request that needs one.

It owns the weights, the KV pool (sized here from the memory budget), the host swap pool (QLM eviction), the host
copies of every served model's weights when it serves several (QLM model swapping: one model's weights are
resident, `load_model` copies another's in) and the per-request seeded generators; nothing else survives a step. The scheduler owns block tables: the runner writes
K/V wherever block_ids say, and copies blocks to and from the host pool where swap_out / swap_in say.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

import torch

from engine.batch import ModelOutput, ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.model import ForwardBatch, KVCache, PagedLlama
from engine.model_store import resolve_model
from engine.protocol import SamplingParams
from engine.sampler import sample
from engine.weights import ModelWeights, load_weights

logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192
CPU_DEFAULT_KV_BYTES = 2 * 2**30  # without --kv-cache-memory / --device-memory, at most 2 GiB of KV on CPU
MAX_GRAPH_BATCH_SIZE = 256  # decode CUDA graphs up to this batch (SchedulerConfig.max_num_seqs' default)
ACTIVATION_RESERVE_BYTES = 512 * 2**20  # kept out of a device-memory budget for activations and logits
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def keep_freed_memory_in_heap() -> bool:
    """glibc hands every freed block over its mmap threshold (32 MiB at most by default) back to the OS, so each
    step's large activations (logits, gathered K/V) are page-faulted in again: a 250 MB gather took 28 ms instead
    of 4.6 ms. Raise both thresholds so freed memory is reused, as vLLM gets from tcmalloc. Process-wide: call it
    in the engine process only. Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def pick_device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


class ModelRunner:
    """One model on one device. After construction (seconds: load, size and allocate the KV pool):

    num_kv_blocks, block_size      the KV pool the scheduler hands out (block ids 0 .. num_kv_blocks - 1)
    max_model_len                  ModelConfig.max_model_len, or the model's own capped at 8192
    eos_token_ids, vocab_size      from config.json / generation_config.json
    model_name, device             served name ("default" for the default model) and "cpu" / "cuda[:i]"
    execute(SchedulerOutput) -> ModelOutput, warmup() -> seconds
    """

    def __init__(
        self,
        model_config: ModelConfig,
        device_config: DeviceConfig,
        block_size: int,
        decode_backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        """decode_backend: one of engine.model.DECODE_BACKENDS; "auto" picks the fastest that works here.
        cuda_graphs: capture decode steps (engine/cuda_graphs.py) on CUDA with the Triton backend."""
        self.device = pick_device(device_config.device)
        if self.device == "cpu":
            keep_freed_memory_in_heap()
        if device_config.num_threads > 0:
            torch.set_num_threads(device_config.num_threads)
        model_dir = resolve_model(model_config.model)
        self.model_name = model_config.served_model_name or (
            model_config.model
            if model_config.model in ("default", "tiny-random") or model_config.model.startswith("synthetic:")
            else model_dir.name
        )
        dtype = _DTYPES[model_config.dtype]
        t0 = time.perf_counter()
        weights = load_weights(model_dir, dtype=dtype, device=self.device)
        self.model = PagedLlama(weights, decode_backend)
        self.model_names = (self.model_name, *model_config.extra_served_model_names)
        self.resident_model = self.model_name
        # Several models: each one's weights in host memory, and the measured seconds to copy them in.
        self.host_weights: dict[str, ModelWeights] = {}
        self.model_load_seconds: dict[str, float] = {}
        if model_config.extra_models:
            self._load_host_models(model_config, model_dir, dtype)
        arch = weights.arch
        self.vocab_size = arch.vocab_size
        self.eos_token_ids: tuple[int, ...] = arch.eos_token_ids
        self.max_model_len = model_config.max_model_len or min(
            arch.max_position_embeddings, MAX_DEFAULT_MODEL_LEN
        )
        self.block_size = block_size
        bytes_per_block = KVCache.bytes_per_block(
            arch.num_layers, block_size, arch.num_kv_heads, arch.head_dim, self.model.kv_dtype
        )
        kv_bytes = self._kv_budget(device_config, weights.num_bytes)
        self.num_kv_blocks = kv_bytes // bytes_per_block
        if self.num_kv_blocks < 1:
            raise ValueError(f"KV budget {kv_bytes} B is smaller than one block ({bytes_per_block} B)")
        self.kv_cache = self.model.allocate_kv_cache(self.num_kv_blocks, block_size)
        # Host swap pool, [L, 2, num_host_blocks, bs, KVH, D] like the device pool; pinned for async copies on GPU.
        self.num_host_blocks = device_config.swap_space // bytes_per_block
        host_shape = list(self.kv_cache.storage.shape)
        host_shape[2] = self.num_host_blocks
        is_cuda = self.device.startswith("cuda")
        self.host_kv = torch.zeros(host_shape, dtype=self.kv_cache.storage.dtype, pin_memory=is_cuda)
        self.swap_seconds_per_block = self._measure_swap() if self.num_host_blocks else 0.0
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs and is_cuda and self.model.decode_backend == "triton":
            max_blocks = -(-self.max_model_len // block_size)
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, MAX_GRAPH_BATCH_SIZE, max_blocks)
        self._generators: dict[str, torch.Generator] = {}
        self._shared_generator = torch.Generator(device=self.device)
        self._shared_generator.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
        logger.info(
            "runner ready in %.1fs: %s on %s, %d KV blocks x %d tokens (%.0f MiB), max_model_len %d",
            time.perf_counter() - t0,
            self.model_name,
            self.device,
            self.num_kv_blocks,
            block_size,
            self.num_kv_blocks * bytes_per_block / 2**20,
            self.max_model_len,
        )

    def _kv_budget(self, cfg: DeviceConfig, weight_bytes: int) -> int:
        if cfg.kv_cache_memory > 0:
            return cfg.kv_cache_memory
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(torch.device(self.device))
            # Weights are already resident, so they are in total - free.
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - ACTIVATION_RESERVE_BYTES
            return max(0, min(budget, free - ACTIVATION_RESERVE_BYTES))
        if cfg.device_memory > 0:
            return cfg.device_memory - weight_bytes - ACTIVATION_RESERVE_BYTES
        return CPU_DEFAULT_KV_BYTES

    # ---- model swapping (QLM, engine/model_swap.py) ---------------------------------------------------------

    def _load_host_models(self, config: ModelConfig, model_dir, dtype: torch.dtype) -> None:
        """Every model's weights in host memory (the first one's too: a swap overwrites the resident tensors), then
        each loaded once to time it, the first one last so it is resident at the end."""
        if len(config.extra_models) != len(config.extra_served_model_names):
            raise ValueError("every extra model needs a served name")
        if len(set(self.model_names)) != len(self.model_names):
            raise ValueError(f"served model names must differ: {self.model_names}")
        paths = [model_dir] + [resolve_model(spec) for spec in config.extra_models]
        for name, path in zip(self.model_names, paths, strict=True):
            host = load_weights(path, dtype=dtype, device="cpu")
            if host.arch != self.model.arch:
                raise ValueError(
                    f"model {name!r} ({path}) differs in architecture or shape from {self.model_name!r}: the models "
                    "of one replica must share one (fine-tuned variants of one base), so the KV pool keeps its layout"
                )
            self.host_weights[name] = host
        for name in reversed(self.model_names):
            self.model_load_seconds[name] = self.load_model(name)
        logger.info(
            "models in host memory: %s; measured load (host -> resident weights): %s",
            ", ".join(self.model_names),
            ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in self.model_load_seconds.items()),
        )

    def load_model(self, name: str) -> float:
        """Copy `name`'s weights from host memory into the resident tensors: the shapes are equal, so the KV pool, the
        kernels and any captured CUDA graphs stay valid. Returns the seconds it took (the swap cost QLM estimates)."""
        t0 = time.perf_counter()
        copy_weights(self.host_weights[name], self.model.weights)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.resident_model = name
        return time.perf_counter() - t0

    # ---- swap (QLM eviction) ---------------------------------------------------------------------------------

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device block, host block) pairs out, then (host block, device block) pairs in: every layer's K
        and V of each block, bit for bit. Outs first: a device block freed by a swap-out may take a swap-in."""
        storage = self.kv_cache.storage  # [L, 2, num_blocks, bs, KVH, D]
        if swap_out:
            device_ids, host_ids = (torch.tensor(ids) for ids in zip(*swap_out, strict=True))
            self.host_kv[:, :, host_ids] = storage[:, :, device_ids.to(storage.device)].cpu()
        if swap_in:
            host_ids, device_ids = (torch.tensor(ids) for ids in zip(*swap_in, strict=True))
            blocks = self.host_kv[:, :, host_ids].to(storage.device, non_blocking=True)
            storage[:, :, device_ids.to(storage.device)] = blocks

    def _measure_swap(self) -> float:
        """Seconds to move one block one way, timed on a round trip of up to 16 blocks (the scheduler prices a swap
        against a recompute with it, engine/swap.py). The pool holds nothing yet, so the copies harm nothing."""
        n = min(16, self.num_host_blocks, self.num_kv_blocks)
        pairs = [(i, i) for i in range(n)]
        self.swap(pairs, [])  # first touch (page faults, allocator) outside the timing
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self.swap(pairs, pairs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return (time.perf_counter() - t0) / (2 * n)

    # ---- one step ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelOutput:
        t0 = time.perf_counter()
        for request_id in out.finished_request_ids:
            # Preempted requests keep their generator: they are recomputed and go on sampling from it.
            self._generators.pop(request_id, None)
        self.swap(out.swap_out, out.swap_in)
        load_s = self.load_model(out.load_model) if out.load_model else 0.0
        if not out.scheduled:  # a step may only move KV or load a model
            return ModelOutput(
                sampled={}, elapsed_seconds=time.perf_counter() - t0, model_load_seconds=load_s
            )
        # Prefill chunks first, then single-token requests (decodes) as one batched attention call.
        prefills = [r for r in out.scheduled if r.num_tokens > 1]
        decodes = [r for r in out.scheduled if r.num_tokens == 1]
        ordered = prefills + decodes
        if (graphs := self._live_decode_graphs()) is not None and not prefills:
            # Host tensors: the graphs copy them into their static buffers.
            batch = build_forward_batch([], decodes, self.block_size, "cpu")
            if graphs.can_run(batch):
                sampled = self.sample_tokens(graphs.run(batch), decodes)
                return ModelOutput(sampled, time.perf_counter() - t0, load_s)
        batch = build_forward_batch(prefills, decodes, self.block_size, self.device)
        logits = self.model(batch, self.kv_cache)
        sampled = self.sample_tokens(logits, ordered)
        return ModelOutput(sampled, time.perf_counter() - t0, load_s)

    def _live_decode_graphs(self) -> DecodeGraphs | None:
        """The captured graphs, while they still point at this runner's KV pool. A KunServe regroup reallocates
        the pool (engine/replicas.py): the graphs are dropped then, which also frees the old pool they hold."""
        if self.decode_graphs is not None and self.decode_graphs.kv is not self.kv_cache:
            logger.info("KV pool reallocated: decode CUDA graphs dropped, decodes run eagerly")
            self.decode_graphs = None
        return self.decode_graphs

    def sample_tokens(self, logits: torch.Tensor, ordered: list[ScheduledRequest]) -> dict[str, int]:
        """One token per request of `ordered` (prefills, then decodes) that needs one; logits rows in that order.
        Also called by a KunServe pipeline (engine/pipeline.py) on its last stage's runner."""
        sampling = [r for r in ordered if r.needs_sample]
        tokens = sample(
            logits,
            [r.sampling for r in sampling],
            [self._generator(r) for r in sampling],
            self._shared_generator,
        ).tolist()
        return {r.request_id: t for r, t in zip(sampling, tokens, strict=True)}

    def forget_generators(self, request_ids: list[str] | None = None) -> None:
        """Drop the generators of `request_ids` (None: all). A KunServe regroup drops all: a request may sample
        elsewhere, and one that comes back must rebuild its generator (replaying its draws), not resume a stale one."""
        if request_ids is None:
            self._generators.clear()
        for request_id in request_ids or ():
            self._generators.pop(request_id, None)

    def _generator(self, request: ScheduledRequest) -> torch.Generator | None:
        if request.sampling.seed is None or request.sampling.is_greedy:
            return None
        if (gen := self._generators.get(request.request_id)) is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(request.sampling.seed)
            # Rebuilt after a loss (e.g. another replica ran it): replay one draw per token already sampled.
            if request.num_generated:
                torch.rand(request.num_generated, generator=gen, device=self.device)  # one uniform per token
            self._generators[request.request_id] = gen
        return gen

    # ---- warm-up -------------------------------------------------------------------------------------------

    def warmup(self) -> float:
        """Run a prefill and decode batches of two shapes, so torch.compile's automatic dynamic shapes kick in
        before traffic (reference/cpu-feasibility.md §2). Writes only into block 0..n of the pool, which the
        scheduler has not handed out yet. Returns seconds spent."""
        t0 = time.perf_counter()
        greedy = SamplingParams(temperature=0.0)
        bs = self.block_size
        blocks_per = max(1, min(4, self.num_kv_blocks // 4))
        num_reqs = max(1, min(4, self.num_kv_blocks // blocks_per))
        ctx = min(blocks_per * bs, self.max_model_len) - 1
        tables = [[i * blocks_per + j for j in range(blocks_per)] for i in range(num_reqs)]
        prompts = [
            ScheduledRequest(f"warmup-{i}", [1] * ctx, 0, tables[i], greedy, True) for i in range(num_reqs)
        ]
        self.execute(SchedulerOutput(scheduled=prompts))
        for n, length in (
            (num_reqs, ctx - 1),
            (max(1, num_reqs - 1), max(1, ctx - bs - 1)),
            (num_reqs, ctx - 2),
        ):
            steps = [ScheduledRequest(f"warmup-{i}", [1], length, tables[i], greedy, True) for i in range(n)]
            self.execute(SchedulerOutput(scheduled=steps))
        if self.decode_graphs is not None:
            self.decode_graphs.capture()
        elapsed = time.perf_counter() - t0
        logger.info("warm-up done in %.1fs", elapsed)
        return elapsed


def copy_weights(src: ModelWeights, dst: ModelWeights) -> None:
    """Every tensor of `src` into its twin in `dst` (same architecture and shape); a tied lm_head once."""
    pairs = [(src.embed, dst.embed), (src.norm, dst.norm)]
    if dst.lm_head is not dst.embed:
        pairs.append((src.lm_head, dst.lm_head))
    for src_layer, dst_layer in zip(src.layers, dst.layers, strict=True):
        pairs += [(getattr(src_layer, name), t) for name, t in vars(dst_layer).items() if t is not None]
    with torch.no_grad():
        for s, d in pairs:
            d.copy_(s)


def build_forward_batch(
    prefills: list[ScheduledRequest], decodes: list[ScheduledRequest], block_size: int, device: str
) -> ForwardBatch:
    """Flat tensors for one step: prefill chunks (more than one token) first, then single-token decodes."""
    bs = block_size
    for r in (*prefills, *decodes):
        if len(r.block_ids) * bs < r.context_len:
            raise ValueError(f"{r.request_id}: {len(r.block_ids)} blocks cannot hold {r.context_len} tokens")
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    qsl = [0]
    prefill_tables = []
    for r in prefills:
        table = r.block_ids
        pos = range(r.start_position, r.context_len)
        token_ids += r.token_ids
        positions += pos
        slots += [table[p // bs] * bs + p % bs for p in pos]
        qsl.append(len(token_ids))
        if r.needs_sample:
            logits_indices.append(len(token_ids) - 1)
        prefill_tables.append(torch.tensor(table[: (r.context_len + bs - 1) // bs], dtype=torch.int64))
    max_blocks = max(((r.context_len + bs - 1) // bs for r in decodes), default=0)
    decode_tables = []
    for r in decodes:
        p = r.start_position
        token_ids.append(r.token_ids[0])
        positions.append(p)
        slots.append(r.block_ids[p // bs] * bs + p % bs)
        if r.needs_sample:
            logits_indices.append(len(token_ids) - 1)
        used = r.block_ids[: (p + bs) // bs]
        decode_tables.append(used + [0] * (max_blocks - len(used)))  # pad with block 0: masked, never read
    dev = device

    def to_device(host: torch.Tensor) -> torch.Tensor:
        # Pinned, so the copy is truly async: from pageable memory CUDA synchronises the stream first.
        return (host.pin_memory() if dev.startswith("cuda") else host).to(dev, non_blocking=True)

    def t(x: list) -> torch.Tensor:
        return to_device(torch.tensor(x, dtype=torch.int64))

    return ForwardBatch(
        token_ids=t(token_ids),
        positions=t(positions),
        slot_mapping=t(slots),
        logits_indices=t(logits_indices),
        prefill_query_start_loc=qsl,
        prefill_context_lens=[r.context_len for r in prefills],
        prefill_block_tables=[to_device(x) for x in prefill_tables],
        decode_block_tables=t(decode_tables).view(len(decodes), max_blocks),
        decode_context_lens=t([r.context_len for r in decodes]),
    )
