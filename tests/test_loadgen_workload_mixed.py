"""Mixed-class workloads (loadgen/workload_mixed.py): Azure conv as interactive + Azure code or ShareGPT as batch."""

from __future__ import annotations

import pytest

from loadgen.datasets import DEFAULT_DATA_DIR, WorkloadConfig
from loadgen.workload_mixed import class_counts
from loadgen.workloads import build_workload

pytestmark = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")


def test_trace_timing_merges_both_traces_and_tags_every_request():
    config = WorkloadConfig(num_requests=300, time_scale=0.5)
    mixed = build_workload("mixed-code", config)
    offsets = [r.offset_s for r in mixed.requests]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    counts = class_counts(mixed)
    assert set(counts) == {"interactive", "batch"} and sum(counts.values()) == 300
    # The interactive part is the azure-conv plan's prefix, with its (scaled) recorded send times.
    conv = build_workload("azure-conv", WorkloadConfig(num_requests=counts["interactive"], time_scale=0.5))
    interactive = [r for r in mixed.requests if r.slo_class == "interactive"]
    assert [(r.prompt, r.max_tokens, r.offset_s) for r in interactive] == [
        (r.prompt, r.max_tokens, r.offset_s) for r in conv.requests
    ]
    code = build_workload("azure-code", WorkloadConfig(num_requests=counts["batch"], time_scale=0.5))
    batch = [r for r in mixed.requests if r.slo_class == "batch"]
    assert [r.offset_s for r in batch] == [r.offset_s for r in code.requests]
    assert [r.index for r in mixed.requests] == list(range(300))


def test_poisson_mix_follows_the_traces_rate_ratio_and_is_seeded():
    config = WorkloadConfig(num_requests=2000, rate=20.0, prompt_format="text", use_recorded_length=True)
    mixed = build_workload("mixed-sharegpt", config)
    share = mixed.info["interactive_share"]
    assert 0.6 < share < 0.7  # conv 5.9 req/s against code 3.2 req/s
    assert class_counts(mixed)["interactive"] / 2000 == pytest.approx(share, abs=0.03)
    assert 90 < mixed.requests[-1].offset_s < 110  # 2,000 requests at 20 req/s
    batch = [r for r in mixed.requests if r.slo_class == "batch"]
    assert all(isinstance(r.prompt, str) for r in batch)  # real ShareGPT prompts
    assert build_workload("mixed-sharegpt", config) == mixed
    assert build_workload("mixed-sharegpt", WorkloadConfig(**{**config.__dict__, "seed": 1})) != mixed
