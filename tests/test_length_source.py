"""The length-source switch: predictor tags, the oracle (true length of ignore_eos requests), seeded noise."""

from __future__ import annotations

import math

import pytest

from predictor.length_source import LengthSource
from server.cli import build_parser


def test_predictor_passes_tags_through():
    assert LengthSource().lengths(120.0, 300.0, 500, True, [5, 6]) == (120.0, 300.0)


def test_oracle_is_max_tokens_for_ignore_eos_only():
    oracle = LengthSource("oracle")
    assert oracle.lengths(120.0, 300.0, 500, True, [5, 6]) == (500.0, 500.0)
    assert oracle.lengths(120.0, 300.0, 500, False, [5, 6]) == (120.0, 300.0)  # EOS position is unknown


def test_oracle_noise_is_seeded_per_request_and_lognormal():
    noisy = LengthSource("oracle-noise", noise_sigma=0.5, seed=3)
    first = noisy.lengths(1, 1, 400, True, [5, 6, 7])
    assert first == noisy.lengths(1, 1, 400, True, [5, 6, 7])  # same request, same noise
    assert first != LengthSource("oracle-noise", 0.5, seed=4).lengths(1, 1, 400, True, [5, 6, 7])
    logs = [math.log(noisy.lengths(1, 1, 400, True, [i, i + 1])[0] / 400) for i in range(2000)]
    mean = sum(logs) / len(logs)
    std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    assert abs(mean) < 0.05 and abs(std - 0.5) < 0.05
    assert LengthSource("oracle-noise", 0.0).lengths(1, 1, 400, True, [5]) == (400.0, 400.0)


def test_bad_source_or_sigma_is_refused():
    with pytest.raises(ValueError):
        LengthSource("psychic")
    with pytest.raises(ValueError):
        LengthSource("oracle-noise", noise_sigma=-1)


def test_serve_flags_parse():
    args = build_parser().parse_args(
        [
            "serve",
            "--policy",
            "ecoserve",
            "--length-source",
            "oracle-noise",
            "--length-noise",
            "0.3",
            "--no-kv-lending",
            "--kv-reserve",
            "0.1",
        ]
    )
    assert args.length_source == "oracle-noise" and args.length_noise == 0.3
    assert args.no_kv_lending and args.kv_reserve == 0.1 and args.policy == "ecoserve"


def test_the_server_sends_oracle_lengths_for_ignore_eos_requests():
    import asyncio

    import httpx
    from fake_engine_client import FakeClient
    from tiny_tokenizer import tiny_tokenizer

    from server.app import build_app
    from server.config import ServerConfig

    async def post(fake: FakeClient, config: ServerConfig, body: dict) -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(config, fake, tokenizer=tiny_tokenizer()))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/v1/chat/completions", json=body)

    messages = [{"role": "user", "content": "hi"}]
    requests = {}
    for source in ("predictor", "oracle-noise"):
        fake = FakeClient()
        config = ServerConfig(served_model_names=("fake",), length_source=source, length_noise=0.5)
        for ignore_eos in (True, False):
            body = {"messages": messages, "max_tokens": 7, "ignore_eos": ignore_eos}
            assert asyncio.run(post(fake, config, body)).is_success
        requests[source] = fake.requests
    (tagged, tagged_eos), (noisy, noisy_eos) = requests["predictor"], requests["oracle-noise"]
    expected = LengthSource("oracle-noise", 0.5).lengths(0, 0, 7, True, noisy.prompt_token_ids)
    assert (noisy.rl_mean, noisy.rl_q) == expected != (tagged.rl_mean, tagged.rl_q)
    assert (noisy_eos.rl_mean, noisy_eos.rl_q) == (
        tagged_eos.rl_mean,
        tagged_eos.rl_q,
    )  # EOS: the predictor's
