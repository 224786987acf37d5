"""kernels/bench.py: refuses without CUDA (writes nothing), and renders a report of every section."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    with pytest.raises(SystemExit, match="needs CUDA"):
        bench.main(["--out", str(out)])
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_render_has_every_section() -> None:
    """The markdown writer on a hand-made report (placeholder values, never written to docs/): a key error here
    would otherwise surface only at the end of a GPU run."""
    device = dict(
        name="GPU", memory_gib=1.0, sms=1, copy_bandwidth_gbs=1.0, datasheet_bandwidth_gbs=None, torch="t",
        triton="t", cuda="c", host="h",
    )  # fmt: skip
    report = bench.Report(device=device, command="python -m kernels.bench", date="today")
    report.kernels = [
        dict(kernel="paged_decode_attention", shape="B=1 ctx=8", ms=1.0, gb_per_s=1.0, pct_of_copy_bw=1.0,
             max_abs_err_vs_reference=0.0),
        dict(kernel="paged_extend_attention", shape="1 x 8", ms=1.0, tflop_per_s=1.0, max_abs_err_vs_reference=0.0),
    ]  # fmt: skip
    report.e2e = [
        dict(engine="kairos", graphs=True, model="m", dtype="bfloat16", batch=1, prefill_s=1.0, tpot_ms=1.0,
             tokens_per_s=1.0, tpot_over_roofline=1.0),
        dict(engine="hf-transformers", graphs=False, model="m", dtype="bfloat16", batch=256, skipped="out of memory"),
    ]  # fmt: skip
    report.greedy = [dict(model="default", gpu_dtype="float32", tokens=32, leading_tokens_equal=32)]
    text = bench.render(report)
    for heading in ("## Kernels", "## End to end", "## Greedy agreement"):
        assert heading in text
    assert "| paged_extend_attention | 1 x 8 |" in text and "skipped: out of memory" in text
