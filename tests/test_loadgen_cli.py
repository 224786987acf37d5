"""`python -m loadgen` end to end against the fake server: every workload kind completes a short replay and its
JSON has every field; bad input exits 2 with one line; `kairos bench` reaches the same entry point."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from fake_openai_server import MODEL, FakeBehavior, fake_server

from loadgen.cli import main
from loadgen.datasets import DEFAULT_DATA_DIR

pytestmark = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data")

FIELDS = [
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    *[
        f"{s}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for s in ("mean", "median", "std", "p90", "p99")
    ],
    "per_tenant",
    "per_app",
    "per_slo_class",
    "app_completion_s",
    "jain_index",
    "num_429",
    "workload_info",
]
REPLAYS = {  # each finishes in well under a second of sending
    "sharegpt": ["--num-requests", "4", "--max-tokens", "4", "--num-tenants", "2"],
    "azure-conv": ["--num-requests", "4", "--time-scale", "0.01"],
    "azure-code": ["--num-requests", "4", "--time-scale", "0.1"],
    "mooncake": ["--num-requests", "4", "--time-scale", "0.01"],
    "agents": ["--num-requests", "6", "--time-scale", "0.001", "--rate", "100"],
    "servegen": ["--num-requests", "6", "--rate", "50", "--num-tenants", "3"],
}


@pytest.fixture(scope="module")
def server():
    with fake_server(FakeBehavior(ttft_s=0.005, itl_s=0.001)) as s:
        yield s


@pytest.mark.parametrize("workload", list(REPLAYS))
def test_every_workload_replays(workload: str, server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / f"{workload}.json"
    argv = ["run", "--base-url", server.base_url, "--workload", workload, "--max-model-len", "256"]
    argv += [*REPLAYS[workload], "--goodput", "ttft:1000", "e2el:5000", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = orjson.loads(out.read_bytes())
    for key in FIELDS:
        assert key in report, key
    num = int(REPLAYS[workload][1])
    assert report["completed"] == num and report["failed"] == 0 and report["model_id"] == MODEL
    assert report["request_goodput"] > 0 and 0 < report["jain_index"] <= 1
    assert len(report["requests"]) == num and all(r["status"] == "ok" for r in report["requests"])
    assert "Serving Benchmark Result" in capsys.readouterr().out
    if workload == "agents":
        assert report["per_app"] and report["app_completion_s"]["mean"] > 0
    if workload == "servegen":
        assert len(report["per_tenant"]) >= 2
    if workload != "sharegpt":  # token-id prompts: the server's count equals the plan's
        planned = sum(r["prompt_tokens"] for r in report["requests"])
        assert report["total_input_tokens"] == planned


def test_plot_writes_pngs(server, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["run", "--base-url", server.base_url, "--workload", "servegen", "--num-requests", "5"]
    assert main([*argv, "--rate", "50", "--max-model-len", "256", "--json", str(out), "--plot"]) == 0
    for suffix in ("latency_cdf", "throughput", "tenants"):
        png = tmp_path / f"run_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_is_reproducible(tmp_path: Path) -> None:
    args = ["plan", "--workload", "mooncake", "--num-requests", "5", "--seed", "7"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "nope"],
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "sharegpt", "--rate", "0"],
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "sharegpt", "--rate", "-3"],
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "azure-conv", "--data-dir", "/nonexistent"],
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "sharegpt", "--goodput", "ttft"],
        ["run", "--base-url", "http://127.0.0.1:9", "--workload", "sharegpt", "--plot"],
        ["plan", "--workload", "sharegpt", "--num-requests", "0"],
        [],
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loadgen: error:") and err.count("\n") == 1


def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture) -> None:
    argv = ["run", "--base-url", "http://127.0.0.1:9", "--workload", "azure-code", "--num-requests", "1"]
    assert main(argv) == 1
    assert "cannot list models" in capsys.readouterr().err


def test_kairos_bench_dispatches_to_loadgen(capsys: pytest.CaptureFixture) -> None:
    from server.cli import main as kairos_main

    assert kairos_main(["bench", "run", "--base-url", "http://x", "--workload", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
