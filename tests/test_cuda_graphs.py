"""engine/cuda_graphs.py on CPU: capture sizes, batch padding, the static buffers' bookkeeping, backend choice.
Capture and replay need a GPU: the CUDA test at the end runs only where one is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.batch import ScheduledRequest, SchedulerOutput
from engine.config import DeviceConfig, ModelConfig
from engine.cuda_graphs import DEFAULT_CAPTURE_SIZES, DecodeBuffers, capture_sizes, padded_size
from engine.model import pick_decode_backend
from engine.protocol import SamplingParams
from engine.runner import ModelRunner, build_forward_batch

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)


def test_capture_sizes_cover_every_batch_up_to_the_max() -> None:
    assert capture_sizes(256) == list(DEFAULT_CAPTURE_SIZES)
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]  # the max itself, so the fullest batch is captured too
    assert capture_sizes(1) == [1]
    with pytest.raises(ValueError):
        capture_sizes(0)


@pytest.mark.parametrize(
    "n, expected", [(1, 1), (3, 4), (4, 4), (5, 8), (9, 16), (17, 24), (250, 256), (257, None)]
)
def test_padded_size_is_the_smallest_captured_size_that_fits(n: int, expected: int | None) -> None:
    assert padded_size(n, list(DEFAULT_CAPTURE_SIZES)) == expected


def _decodes(contexts: list[int], block_size: int = 4) -> list[ScheduledRequest]:
    """One decode per context length; request r's blocks are 10r, 10r+1, ... (distinct per request)."""
    return [
        ScheduledRequest(
            f"r{r}", [100 + r], ctx - 1, [10 * r + j for j in range(-(-ctx // block_size))], GREEDY, True
        )
        for r, ctx in enumerate(contexts)
    ]


def test_fill_copies_real_rows_and_pads_the_rest() -> None:
    buffers = DecodeBuffers.allocate(max_size=8, max_blocks=6, device="cpu")
    buffers.fill(build_forward_batch([], _decodes([5, 9, 1, 13]), 4, "cpu"), size=8)  # a wider batch first
    buffers.fill(build_forward_batch([], _decodes([6, 2, 3]), 4, "cpu"), size=4)
    assert buffers.token_ids[:4].tolist() == [100, 101, 102, 0]
    assert buffers.positions[:4].tolist() == [5, 1, 2, 0]
    assert buffers.slot_mapping[:4].tolist() == [1 * 4 + 1, 10 * 4 + 1, 20 * 4 + 2, -1]  # padding: not stored
    assert buffers.context_lens[:4].tolist() == [6, 2, 3, 0]  # padding: attention gives zeros
    assert buffers.block_tables[:3, :2].tolist() == [[0, 1], [10, 0], [20, 0]]
    # rows past `size` keep the older batch: no graph of size 4 reads them
    assert buffers.context_lens[4:].tolist() == [0, 0, 0, 0] and buffers.token_ids[4] == 0


def test_fill_rejects_what_no_graph_can_run() -> None:
    buffers = DecodeBuffers.allocate(max_size=4, max_blocks=2, device="cpu")
    with pytest.raises(ValueError):  # 9 tokens need 3 blocks of 4: wider than the static table
        buffers.fill(build_forward_batch([], _decodes([9]), 4, "cpu"), size=1)
    with pytest.raises(ValueError):  # 3 requests do not fit a size-2 graph
        buffers.fill(build_forward_batch([], _decodes([1, 2, 3]), 4, "cpu"), size=2)


def test_forward_batch_views_the_first_rows() -> None:
    buffers = DecodeBuffers.allocate(max_size=8, max_blocks=3, device="cpu")
    batch = buffers.forward_batch(4)
    assert batch.num_prefill_tokens == 0 and batch.logits_indices.tolist() == [0, 1, 2, 3]
    assert batch.decode_block_tables.shape == (4, 3)
    assert (
        batch.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()
    )  # views, so a replay sees new data


def test_auto_backend_is_triton_on_cuda_and_unchanged_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIROS_DECODE_ATTENTION", raising=False)
    assert pick_decode_backend("auto", torch.device("cuda"), torch.bfloat16, 128, 4) == "triton"
    assert pick_decode_backend("auto", torch.device("cpu"), torch.float32, 64, 3) in ("cpu-kernel", "eager")


def test_prefill_tensors_pad_block_tables() -> None:
    prompts = [
        ScheduledRequest("a", [1, 2, 3, 4, 5, 6], 0, [7, 3], GREEDY, True),
        ScheduledRequest("b", [9, 8], 4, [5, 2], GREEDY, True),  # a 2-token chunk after a 4-token prefix
    ]
    qsl, lens, tables, max_query_len = build_forward_batch(prompts, [], 4, "cpu").prefill_tensors
    assert qsl.tolist() == [0, 6, 8] and lens.tolist() == [6, 6] and max_query_len == 6
    assert tables.tolist() == [[7, 3], [5, 2]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the same greedy tokens with and without decode graphs, over batch sizes that pad (3 -> 4)."""
    monkeypatch.setenv("KAIROS_CACHE_DIR", str(tmp_path))
    runs = []
    for graphs in (False, True):
        config = DeviceConfig(device="cuda", kv_cache_memory=256 * 4096)
        runner = ModelRunner(ModelConfig(model="synthetic:tiny"), config, block_size=16, cuda_graphs=graphs)
        runner.warmup()
        assert (runner.decode_graphs is not None) == graphs
        prompts = [[5 + i, 17, 300, 2, 44 + i] * (i + 1) for i in range(3)]
        tables = [[10 * i + j for j in range(4)] for i in range(3)]
        first = runner.execute(
            SchedulerOutput(
                [ScheduledRequest(f"r{i}", p, 0, tables[i], GREEDY, True) for i, p in enumerate(prompts)]
            )
        )
        tokens = {r: [t] for r, t in first.sampled.items()}
        for _ in range(8):
            steps = [
                ScheduledRequest(
                    f"r{i}", [tokens[f"r{i}"][-1]], len(p) + len(tokens[f"r{i}"]) - 1, tables[i], GREEDY, True
                )
                for i, p in enumerate(prompts)
            ]
            for r, t in runner.execute(SchedulerOutput(steps)).sampled.items():
                tokens[r].append(t)
        runs.append(tokens)
    assert runs[0] == runs[1]
