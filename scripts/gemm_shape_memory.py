"""Why the engine process grew in the soak: the CPU GEMM's memory under the row counts a serving engine produces.

    .venv/bin/python scripts/gemm_shape_memory.py [--rounds 6] [--calls 300]

Each variant runs in a fresh process: `--calls` random row counts M in 1..1024 per round, each through SmolLM2's
four weight shapes (qkv 960, o 576, gate_up 3072 x 576; down 576 x 1536), and records the process's RSS and glibc's
heap (mallinfo2: in use / free) after every round, then RSS after `malloc_trim(0)`:

- `onednn`: `torch.ops.mkldnn._linear_pointwise` at the exact M (the engine before 4a1fa91);
- `onednn-padded`: `engine.model.onednn_linear`, rows padded to `row_bucket(M)` (the engine now);
- `mkl`: `F.linear` (MKL sgemm; `KAIROS_CPU_MATMUL=mkl`).

Writes docs/results/reliability/gemm_shape_memory.json. docs/results/reliability.md reads it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "reliability" / "gemm_shape_memory.json"
VARIANTS = ("onednn", "onednn-padded", "mkl")


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) >> 10
    raise RuntimeError("no VmRSS")


def run_variant(variant: str, rounds: int, calls: int) -> dict:
    """In this process: the variant's rounds; returns its samples."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    from engine.model import onednn_linear

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    exact = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    fn = {"onednn": exact, "onednn-padded": onednn_linear, "mkl": F.linear}[variant]
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    weights = [torch.randn(n, 576) for n in (960, 576, 3072)] + [torch.randn(576, 1536)]
    rng = random.Random(0)
    samples, started = [], time.perf_counter()
    for round_ in range(rounds):
        for _ in range(calls):
            m = rng.randint(1, 1024)
            for w in weights:
                fn(torch.randn(m, w.shape[1]), w)
        info = libc.mallinfo2()
        samples.append(
            {
                "round": round_ + 1,
                "seconds": round(time.perf_counter() - started, 1),
                "rss_mib": rss_mib(),
                "heap_in_use_mib": info.uordblks >> 20,
                "heap_free_mib": info.fordblks >> 20,
            }
        )
    libc.malloc_trim(0)
    return {"variant": variant, "samples": samples, "rss_after_malloc_trim_mib": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.rounds, args.calls)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--rounds", str(args.rounds)]
        cmd += ["--calls", str(args.calls)]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        result = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        results.append(result)
        first, last = result["samples"][0], result["samples"][-1]
        print(
            f"{variant:14s} RSS {first['rss_mib']} -> {last['rss_mib']} MiB, heap in use {last['heap_in_use_mib']}"
            f" free {last['heap_free_mib']} MiB, after malloc_trim {result['rss_after_malloc_trim_mib']} MiB,"
            f" {last['seconds']} s",
            flush=True,
        )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown",
    )  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    out = {
        "command": "python scripts/gemm_shape_memory.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "commit": commit.stdout.strip(),
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
