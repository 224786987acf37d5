"""server/app.py against a scripted fake engine client (no engine process): routes, SSE sequence, errors,
stop strings and the aborts they cause. The real engine is exercised by test_server_e2e.py."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from fake_engine_client import ANSWER, MAX_MODEL_LEN, FakeClient
from tiny_tokenizer import tiny_tokenizer

from engine.protocol import Ready
from server.app import build_app
from server.config import ServerConfig

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(served_model_names=("fake", "alias"))


async def call(fake: FakeClient, config: ServerConfig, method: str, path: str, **kwargs) -> httpx.Response:
    app = build_app(config, fake, tokenizer=tiny_tokenizer())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.request(method, path, **kwargs)


def run(fake: FakeClient, config: ServerConfig, method: str, path: str, **kwargs) -> httpx.Response:
    return asyncio.run(call(fake, config, method, path, **kwargs))


def events(response: httpx.Response) -> list:
    """Parse raw SSE; also checks the framing: every event is one `data:` line and a blank line."""
    text = response.text
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and error["message"]
    return error


# ---- happy paths ------------------------------------------------------------------------------------


def test_chat_non_streaming(fake, config):
    headers = {"X-Tenant-Id": "acme", "X-App-Id": "agent-7", "X-SLO-Class": "batch"}
    r = run(
        fake,
        config,
        "POST",
        "/v1/chat/completions",
        json={"model": "alias", "messages": USER},
        headers=headers,
    )
    assert r.status_code == 200
    body = r.json()
    assert (
        body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "fake"
    )
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["choices"][0]["finish_reason"] == "stop"
    msg = fake.requests[0]
    num_answer_tokens = len(tiny_tokenizer().encode(ANSWER))
    assert body["usage"] == {
        "prompt_tokens": len(msg.prompt_token_ids),
        "completion_tokens": num_answer_tokens,
        "total_tokens": len(msg.prompt_token_ids) + num_answer_tokens,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert (msg.tenant, msg.app_id, msg.slo_class) == ("acme", "agent-7", "batch")
    assert msg.sampling.max_tokens == MAX_MODEL_LEN - len(msg.prompt_token_ids)  # vLLM default: what fits
    assert tiny_tokenizer().decode(msg.prompt_token_ids) == "<user>hi<assistant>"
    assert fake.aborted == []  # the engine finished it itself


def test_chat_stream_sequence(fake, config):
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    r = run(fake, config, "POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    data = chunks[:-1]
    assert len({c["id"] for c in data}) == 1 and len({c["created"] for c in data}) == 1
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert data[0]["choices"][0]["delta"]["content"]  # the role travels with the first token's text
    assert all("role" not in c["choices"][0]["delta"] for c in data[1:-1])
    assert [c["choices"][0]["finish_reason"] for c in data[:-1]] == [None] * (len(data) - 2) + ["stop"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in data[:-1]) == ANSWER
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == len(
        tiny_tokenizer().encode(ANSWER)
    )


def test_completion_stream_length_and_continuous_usage(fake, config):
    body = {
        "prompt": "the",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks = events(run(fake, config, "POST", "/v1/completions", json=body))
    data = chunks[:-1]
    assert all(c["object"] == "text_completion" for c in data)
    assert data[-2]["choices"][0]["finish_reason"] == "length"
    assert [c["usage"]["completion_tokens"] for c in data[:-1]] == [1, 2, 3]
    assert data[-1]["usage"]["completion_tokens"] == 3


def test_completion_with_token_ids(fake, config):
    r = run(fake, config, "POST", "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert fake.requests[0].prompt_token_ids == [5, 6, 7]


def test_stop_string_cuts_text_and_aborts_the_engine_request(fake, config):
    body = {"messages": USER, "stop": [", the"]}
    r = run(fake, config, "POST", "/v1/chat/completions", json=body)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "hello world" and choice["finish_reason"] == "stop"
    assert fake.aborted == [fake.requests[0].request_id]
    stream = events(run(fake, config, "POST", "/v1/chat/completions", json={**body, "stream": True}))
    assert stream[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in stream[:-1]) == "hello world"


def test_models_health_stats(fake, config):
    models = run(fake, config, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake", "alias"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN and models["data"][0]["owned_by"] == "kairos"
    assert run(fake, config, "GET", "/health").json() == {"status": "ok"}
    assert run(fake, config, "GET", "/v1/engine/stats").json()["num_free_blocks"] == 100


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {"messages": USER, "temperature": 9}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": USER, "model": "gpt-9"}, 404, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 80}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ],
)
def test_bad_requests(fake, config, path, body, status, param):
    assert_error(run(fake, config, "POST", path, json=body), status, param)
    assert fake.requests == []


def test_invalid_json_unknown_route_wrong_method_unknown_class(fake, config):
    assert_error(run(fake, config, "POST", "/v1/completions", content=b"{nope"), 400)
    assert_error(run(fake, config, "GET", "/v1/nothing"), 404)
    r = run(fake, config, "GET", "/v1/chat/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = run(
        fake, config, "POST", "/v1/chat/completions", json={"messages": USER}, headers={"X-SLO-Class": "gold"}
    )
    assert_error(r, 400, "X-SLO-Class")


def test_api_key(fake):
    config = ServerConfig(served_model_names=("fake",), api_key="sekrit")
    assert_error(run(fake, config, "GET", "/v1/models"), 401)
    ok = run(fake, config, "GET", "/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200
    assert run(fake, config, "GET", "/health").status_code == 200  # probes need no key


def test_loading_and_dead_engine_are_503(fake, config):
    fake.ready = None
    assert assert_error(run(fake, config, "GET", "/health"), 503)["type"] == "unavailable_error"
    assert_error(run(fake, config, "POST", "/v1/chat/completions", json={"messages": USER}), 503)
    fake.ready = Ready("fake", MAX_MODEL_LEN, 16, 100, "cpu", "vllm")
    fake.alive = False
    assert_error(run(fake, config, "GET", "/health"), 503)
    r = run(fake, config, "POST", "/v1/chat/completions", json={"messages": USER})
    assert_error(r, 503)
    assert r.headers["retry-after"] == "1"


def test_engine_error_mid_stream_is_an_error_event_then_done(fake, config):
    fake.error_after = 2
    chunks = events(
        run(fake, config, "POST", "/v1/chat/completions", json={"messages": USER, "stream": True})
    )
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["error"]["code"] == 500 and "boom" in chunks[-2]["error"]["message"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert fake.aborted == []  # the engine ended it


def test_engine_death_non_streaming_is_503(fake, config):
    fake.error_after, fake.die = 1, True
    error = assert_error(run(fake, config, "POST", "/v1/chat/completions", json={"messages": USER}), 503)
    assert "boom" in error["message"]


def test_app_fields_tenant_weight_and_app_cost_reach_the_engine(fake):
    config = ServerConfig(served_model_names=("fake",), tenant_weights=(("acme", 2.0),))
    metadata = {"app_id": "mr-1", "app_type": "map-reduce", "app_num_requests": "16"}
    body = {"messages": USER, "max_tokens": 4, "metadata": metadata}
    assert run(
        fake, config, "POST", "/v1/chat/completions", json=body, headers={"X-Tenant-Id": "acme"}
    ).is_success
    assert run(fake, config, "POST", "/v1/chat/completions", json={**body, "user": "bob"}).is_success
    first, second = fake.requests
    assert (first.app_id, first.app_type, first.app_num_requests) == ("mr-1", "map-reduce", 16)
    assert (first.tenant_weight, second.tenant_weight) == (2.0, 1.0)  # bob is not named: weight 1
    assert first.app_cost > 0 and second.app_cost == first.app_cost  # predicted once per app
    r = run(fake, config, "POST", "/v1/chat/completions", json={**body, "metadata": {"app_type": "dag"}})
    assert_error(r, 400, "metadata.app_type")
