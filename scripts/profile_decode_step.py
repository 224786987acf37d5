"""Profile one decode step of the real engine at batch B (default 128, ctx ~256): where the time goes.

    .venv/bin/python scripts/profile_decode_step.py [--batch 128] [--context 256] [--threads 2]

Prints torch.profiler's table of the top operators by self CPU time for one step, and the step's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server sets it for the engine process
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine.config import DeviceConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.core import build_engine_core  # noqa: E402
from engine.protocol import AddRequest, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    config = EngineConfig(model=ModelConfig(dtype=args.dtype), device=DeviceConfig(num_threads=args.threads))
    core = build_engine_core(config)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        prompt = [(17 * i + j) % 40000 + 100 for j in range(args.context)]
        core.add_request(AddRequest(f"r{i}", prompt, params, 0.0))
    while core.scheduler.last_batch.num_prefill_requests or not core.scheduler.running:
        core.step()  # prefill everything; the next steps are pure decode
    for _ in range(3):
        core.step()
    start = time.perf_counter()
    core.step()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        core.step()
    print(
        f"decode step, B={args.batch}, ctx~{args.context}, {torch.get_num_threads()} threads: {plain * 1e3:.0f} ms"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
