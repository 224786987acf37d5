"""loadgen against a real Kairos (`python -m server serve`, default model): a chat replay of ShareGPT prompts and
a chained agent-session replay with token-id prompts, a few requests with small max_tokens each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from live_server import live_server

from loadgen.cli import main
from loadgen.datasets import DEFAULT_DATA_DIR

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="needs ../shared/data"),
]


@pytest.fixture(scope="module")
def kairos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(tmp_path_factory.mktemp("loadgen-e2e"), "--max-model-len", "2048") as server:
        yield server.base_url


def run(base_url: str, out: Path, *args: str) -> dict:
    argv = ["run", "--base-url", base_url, "--max-model-len", "512", "--max-tokens", "4", "--json", str(out)]
    assert main([*argv, "--no-progress", "--goodput", "ttft:60000", *args]) == 0
    return orjson.loads(out.read_bytes())


def test_sharegpt_chat_replay(kairos: str, tmp_path: Path) -> None:
    report = run(kairos, tmp_path / "sharegpt.json", "--workload", "sharegpt", "--num-requests", "2")
    assert report["completed"] == 2 and report["failed"] == 0 and report["backend"] == "openai-chat"
    assert 0 < report["total_output_tokens"] <= 2 * 4  # no ignore_eos: SmolLM2 may stop early
    assert report["mean_ttft_ms"] > 0 and report["request_goodput"] > 0
    assert report["model_id"]  # taken from GET /v1/models


def test_agent_sessions_replay(kairos: str, tmp_path: Path) -> None:
    args = ["--workload", "agents", "--num-requests", "3", "--time-scale", "0.01"]
    report = run(kairos, tmp_path / "agents.json", *args)
    assert report["completed"] == 3 and report["backend"] == "openai"
    # token-id prompts with ignore_eos: Kairos counts exactly what was planned
    assert report["total_input_tokens"] == sum(r["prompt_tokens"] for r in report["requests"])
    assert report["total_output_tokens"] == sum(r["max_tokens"] for r in report["requests"])
    assert len(report["per_app"]) >= 1 and report["app_completion_s"]["mean"] > 0
    assert report["jain_index_final"] == pytest.approx(1.0)


@pytest.mark.parametrize("workload", ["azure-conv", "azure-code", "mooncake", "servegen"])
def test_trace_replays(kairos: str, tmp_path: Path, workload: str) -> None:
    """The trace workloads (token-id prompts on /v1/completions, compressed in time) against the real server."""
    args = ["--workload", workload, "--num-requests", "3", "--time-scale", "0.001", "--seed", "1"]
    report = run(kairos, tmp_path / f"{workload}.json", *args)
    assert report["completed"] == 3 and report["failed"] == 0
    assert report["total_input_tokens"] == sum(r["prompt_tokens"] for r in report["requests"])
    assert report["mean_ttft_ms"] > 0 and report["per_tenant"] and report["per_slo_class"]
