"""End to end: `python -m server serve` with the real engine and the default model, driven by the real `openai`
client and by raw httpx (SSE framing, error bodies, disconnects). One server for the module; small max_tokens.

The engine's KV accounting (GET /v1/engine/stats) shows that stop strings and client disconnects abort the
request in the engine at once: the free-block count returns to the pool size within a second or two, long
before the request could have finished on its own.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import orjson
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STARTUP_TIMEOUT_S = 240.0
ABORT_DEADLINE_S = 5.0  # a 400-token request takes ~25 s on this CPU: freeing within 5 s means it was aborted


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    health_codes: list[int]  # /health status codes seen while starting, in order

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("e2e") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(port),
        "--model",
        "default",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory",
        "128MiB",
        "--num-threads",
        "2",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, log_path, [])
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited early:\n{srv.log_tail()}"
            try:
                code = httpx.get(f"{srv.base_url}/health", timeout=2).status_code
            except httpx.TransportError:
                code = None
            if code is not None:
                srv.health_codes.append(code)
                if code == 200:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def engine_stats(server: Server) -> dict:
    return httpx.get(f"{server.base_url}/v1/engine/stats", timeout=5).json()


def wait_until_idle(server: Server, deadline_s: float) -> dict:
    """Poll the engine until nothing runs or waits and every block is free again; return the last stats."""
    end = time.monotonic() + deadline_s
    while True:
        stats = engine_stats(server)
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if idle and stats["num_free_blocks"] == stats["num_total_blocks"]:
            return stats
        if time.monotonic() > end:
            pytest.fail(f"engine still busy after {deadline_s} s: {stats}")
        time.sleep(0.1)


def wait_for_running(server: Server, num_running: int, deadline_s: float = 2.0) -> None:
    """Stats are published every 0.25 s, so a request that just started may not show yet."""
    end = time.monotonic() + deadline_s
    while engine_stats(server)["num_running"] != num_running:
        assert time.monotonic() < end, engine_stats(server)
        time.sleep(0.05)


def sse_events(text: str) -> list:
    """Raw SSE body -> JSON payloads and "[DONE]"; asserts `data: <json>\\n\\n` framing throughout."""
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


# ---- startup, models ---------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(server: Server):
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200
    assert set(server.health_codes) == {503, 200}
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}


def test_models(client: openai.OpenAI, server: Server):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct", "default"]  # the directory, then --model
    assert models[0].owned_by == "kairos"
    raw = httpx.get(f"{server.base_url}/v1/models").json()
    assert raw["data"][0]["max_model_len"] == MAX_MODEL_LEN


# ---- chat and completions through the openai client -------------------------------------------------


def test_chat_non_streaming(client: openai.OpenAI, model: str):
    # The first request also pays the engine's torch.compile warm-up.
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client: openai.OpenAI, model: str):
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert "Paris" in text
    # The same greedy answer as without streaming (prompt is cached now, which must not change it).
    again = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16  # the system prompt's blocks


def test_completions(client: openai.OpenAI, model: str):
    r = client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    stream = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_completions_with_token_ids_and_seeded_sampling(client: openai.OpenAI, model: str):
    kwargs = dict(model=model, prompt=[504, 3575, 282, 4649, 314], max_tokens=6, temperature=1.0, seed=7)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert first.usage.prompt_tokens == 5
    assert first.choices[0].text == second.choices[0].text  # same seed, same sample


# ---- raw SSE framing ----------------------------------------------------------------------------------


def test_raw_sse_sequence(server: Server, model: str):
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    data = events[:-1]
    assert len({(e["id"], e["created"]) for e in data}) == 1
    first = data[0]["choices"][0]
    assert (
        first["delta"]["role"] == "assistant" and first["delta"]["content"] and first["finish_reason"] is None
    )
    assert data[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert data[-1]["choices"] == [] and set(data[-1]["usage"]) >= {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
    }
    assert all(e["object"] == "chat.completion.chunk" for e in data)


# ---- stop strings -------------------------------------------------------------------------------------


def test_stop_string_cuts_the_text_and_frees_the_engine(client: openai.OpenAI, model: str, server: Server):
    full = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    words = text.split(" ")
    assert len(words) >= 4, text
    stop = " " + words[2]  # a stop string in the middle of the greedy answer
    # ignore_eos + a long max_tokens: only the server's abort can end these requests quickly.
    long = dict(
        model=model, messages=QUESTION, max_tokens=400, temperature=0, extra_body={"ignore_eos": True}
    )
    cut = client.chat.completions.create(**long, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    wait_until_idle(server, ABORT_DEADLINE_S)
    chunks = list(client.chat.completions.create(**long, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_until_idle(server, ABORT_DEADLINE_S)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"n": 2}, "n"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": 7}, "stop"),
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ],
)
def test_bad_fields_are_400_with_param(client: openai.OpenAI, model: str, extra: dict, param: str):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, **extra)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and info.value.body["code"] == 400


def test_prompt_too_long_is_400(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="hello " * (MAX_MODEL_LEN + 10), max_tokens=4)
    assert "maximum context length" in info.value.body["message"]


def test_unknown_model_is_404(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=QUESTION, max_tokens=2)
    assert info.value.body["param"] == "model"


def test_unknown_slo_class_is_400(client: openai.OpenAI, model: str):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=2, extra_headers={"X-SLO-Class": "platinum"}
        )
    assert info.value.body["param"] == "X-SLO-Class"


def test_raw_error_shapes(server: Server):
    bad_json = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    no_route = httpx.get(f"{server.base_url}/v1/embeddings")
    wrong_method = httpx.get(f"{server.base_url}/v1/completions")
    for response, status in ((bad_json, 400), (no_route, 404), (wrong_method, 405)):
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status


# ---- client disconnect aborts the engine request ---------------------------------------------------


def test_stream_disconnect_aborts_in_the_engine(server: Server, model: str):
    wait_until_idle(server, ABORT_DEADLINE_S)
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert orjson.loads(first[len("data: ") :])["choices"][0]["finish_reason"] is None
        wait_for_running(server, 1)
    # Leaving the block closed the connection mid-stream.
    wait_until_idle(server, ABORT_DEADLINE_S)


def test_non_streaming_disconnect_aborts_in_the_engine(server: Server, model: str):
    wait_until_idle(server, ABORT_DEADLINE_S)
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    wait_for_running(server, 0, ABORT_DEADLINE_S)
    wait_until_idle(server, ABORT_DEADLINE_S)
    assert "server.app" in server.log_tail(200) and " abort " in server.log_tail(200)
