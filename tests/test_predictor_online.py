"""The predictor in the request path (server/app.py with a fake engine), its online log, and the CLIs:
train → evaluate JSON keys, refit from base data + a log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from fake_engine_client import ANSWER, FakeClient
from predictor_synth import synth_rows
from tiny_tokenizer import tiny_tokenizer

from predictor.cli import main as predictor_cli
from predictor.dataset import load_log
from predictor.evaluate import main as evaluate_main
from predictor.features import FeatureSpec, RequestInfo
from predictor.model import ConstantPredictor, LengthPredictor
from predictor.online import load_tagger
from predictor.train import main as train_main
from server.app import build_app
from server.config import ServerConfig

FAST = ["--hash-dim", "256", "--learning-rate", "0.1", "--threads", "1"]
METRIC_KEYS = {
    "n",
    "mae",
    "spearman",
    "kendall_tau",
    "bucket_accuracy_64",
    "bin_accuracy",
    "coverage",
    "reservation_ratio",
    "over_reservation",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("predictor")
    data = write_jsonl(tmp / "synth.jsonl", synth_rows(1200, seed=1))
    train_main(["--data", str(data), "-o", str(tmp / "model.json"), "--test-fraction", "0.2", *FAST])
    return tmp / "model.json"


def test_evaluate_writes_every_metric_with_a_baseline(model_path, tmp_path):
    data = write_jsonl(tmp_path / "synth.jsonl", synth_rows(1200, seed=1))
    out = tmp_path / "eval.json"
    evaluate_main(["--model", str(model_path), "--data", str(data), "--split", "test", "--json", str(out)])
    result = json.loads(out.read_text())
    assert METRIC_KEYS <= set(result) and METRIC_KEYS == set(result["baseline"])
    assert 100 < result["n"] < 400  # the held-out 20 %
    assert result["kendall_tau"] > 0.5 > result["baseline"]["kendall_tau"]
    assert result["mae"] < result["baseline"]["mae"]


def post_chats(
    config: ServerConfig, fake: FakeClient, contents: list[str], max_tokens: int = 20
) -> list[int]:
    """Status codes of one chat request per content, in one app lifespan (so the log file is closed after)."""

    async def go() -> list[int]:
        app = build_app(config, fake, tokenizer=tiny_tokenizer())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                codes = []
                for content in contents:
                    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
                    codes.append((await http.post("/v1/chat/completions", json=body)).status_code)
                return codes

    return asyncio.run(go())


def test_server_tags_requests_and_logs_finished_lengths(model_path, tmp_path):
    log = tmp_path / "lengths.jsonl"
    config = ServerConfig(served_model_names=("fake",), predictor=str(model_path), predictor_log=str(log))
    fake = FakeClient()
    assert post_chats(config, fake, ["write an essay about the river", "write a line about the river"]) == [
        200,
        200,
    ]
    predictor = LengthPredictor.load(model_path)
    for msg, text in zip(
        fake.requests, ["write an essay about the river", "write a line about the river"], strict=True
    ):
        # what the model says for this request's own text, prompt size and max_tokens (the fake's context is
        # 64 tokens, so both are clamped to max_tokens)
        expected = predictor.predict(RequestInfo(text, len(msg.prompt_token_ids), 1, msg.sampling.max_tokens))
        assert (msg.rl_mean, msg.rl_q) == (expected.median, expected.upper)
        assert 0 < msg.rl_mean <= msg.rl_q <= msg.sampling.max_tokens == 20
    unclamped = [predictor.predict(RequestInfo(t, 10)).median for t in ("an essay please", "a line please")]
    assert unclamped[0] > 3 * unclamped[1]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(records) == 2 and "prompt" not in records[0] and "essay" not in log.read_text()
    num_answer_tokens = len(tiny_tokenizer().encode(ANSWER))
    assert {r["output_tokens"] for r in records} == {min(20, num_answer_tokens)}
    assert len(load_log(log, LengthPredictor.load(model_path).spec)) == 2


def test_missing_model_falls_back_to_the_constants(tmp_path, caplog):
    config = ServerConfig(served_model_names=("fake",), predictor=str(tmp_path / "nope.json"))
    fake = FakeClient()
    with caplog.at_level("WARNING"):
        assert post_chats(config, fake, ["hi"], max_tokens=40) == [200]
    assert "not loaded" in caplog.text
    msg = fake.requests[0]
    assert (msg.rl_mean, msg.rl_q) == (min(ConstantPredictor.median, 40), min(ConstantPredictor.upper, 40))
    assert load_tagger("none").is_constant


def test_refit_trains_on_base_data_plus_the_log(model_path, tmp_path):
    base = write_jsonl(tmp_path / "base.jsonl", synth_rows(600, seed=2))
    tagger = load_tagger(model_path, log_path=tmp_path / "log.jsonl")
    for row in synth_rows(300, seed=3):
        tagged = tagger.tag(row["prompt"], row["prompt_tokens"])
        tagger.record(tagged, row["response_tokens"], "stop")
    tagger.record(tagger.tag("aborted", 1), 3, "abort")  # not a natural length: refit skips it
    tagger.close()
    out = tmp_path / "refit.json"
    code = predictor_cli(
        [
            "refit",
            "--log",
            str(tmp_path / "log.jsonl"),
            "--base",
            str(base),
            "-o",
            str(out),
            "--target-field",
            "response_tokens",
            *FAST,
        ]
    )
    assert code == 0
    refit = LengthPredictor.load(out)
    assert refit.info["num_train"] + refit.info["num_calib"] == 900
    assert refit.spec == FeatureSpec(hash_dim=256)


def test_the_shipped_smollm2_model_loads_and_tags_within_max_tokens():
    """predictor/models/smollm2.json.gz ships in the repo (docs/results/predictor.md) and is what `--predictor
    default` serves: a censored-mixture model whose tags stay inside max_tokens and order short vs long asks."""
    from predictor.online import load_tagger

    tagger = load_tagger("default")
    assert not tagger.is_constant
    short = tagger.tag("What is 2+2?", 30, 1, 1024).prediction
    long = tagger.tag(
        "Write a 2000 word essay about the history of Rome, with many details.", 40, 1, 1024
    ).prediction
    for p in (short, long):
        assert 1 <= p.median <= p.upper <= 1024
    assert long.upper >= short.upper
    capped = tagger.tag("Write a 2000 word essay about the history of Rome.", 30, 1, 64).prediction
    assert capped.upper <= 64 and capped.bucket == 64
