"""Issue 11, security and limits, against server/app.py with scripted or in-process engines (no engine process):
requests that can never fit the KV pool (400 at once), the request-body limit (413 while reading), --api-key
(401 shapes, constant-time compare, --protect-observability), per-tenant prefix-cache isolation through a real
EngineCore, no request text in logs, and static files only from static/."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from fake_engine_client import MAX_MODEL_LEN, FakeClient
from fake_runner import FakeRunner
from tiny_tokenizer import tiny_tokenizer

from engine.config import EngineConfig, SchedulerConfig
from engine.core import EngineCore, build_scheduler
from engine.protocol import AddRequest, Ready, TokenDelta
from server.app import build_app
from server.config import ServerConfig
from server.schema import Message, prefix_cache_salt
from server.tokenizer import Tokenizer, max_chars_per_token

USER = [{"role": "user", "content": "hi"}]
KEY = "sk-test-0123456789"


def config(**kwargs) -> ServerConfig:
    return ServerConfig(served_model_names=("fake",), predictor="none", app_cost_model="none", **kwargs)


async def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.request(method, path, **kwargs)


def run(client, cfg: ServerConfig, method: str, path: str, **kwargs) -> httpx.Response:
    return asyncio.run(call(build_app(cfg, client, tokenizer=tiny_tokenizer()), method, path, **kwargs))


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


async def raw_asgi(
    app, method: str, path: str, headers: list[tuple[bytes, bytes]] = (), chunks: list[bytes] = ()
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """One request straight into the ASGI app with an exact path (httpx would normalise `..`) and body chunks.
    Returns status, headers, body and how many body chunks the app read."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1", "backslashreplace"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    pending = list(chunks) or [b""]
    num_read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal num_read
        if num_read < len(pending):
            num_read += 1
            return {
                "type": "http.request",
                "body": pending[num_read - 1],
                "more_body": num_read < len(pending),
            }
        await asyncio.sleep(3600)  # the client is still there; it just has nothing more to say
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, num_read


# ---- requests that can never fit the KV pool ----------------------------------------------------------


def small_pool_client(num_blocks: int, per_request: int = 0) -> FakeClient:
    fake = FakeClient()
    fake.ready = Ready(
        "fake", MAX_MODEL_LEN, 4, num_blocks, "cpu", "vllm", max_blocks_per_request=per_request
    )
    return fake


def num_chat_prompt_tokens(messages: list[dict]) -> int:
    return len(tiny_tokenizer().encode_chat([Message(**m) for m in messages]))


def test_prompt_plus_max_tokens_over_the_pool_is_a_400_and_never_reaches_the_engine():
    fake = small_pool_client(num_blocks=5)  # 20 tokens of KV; the context is 64
    n = num_chat_prompt_tokens(USER)
    r = run(fake, config(), "POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 21 - n})
    error = assert_error(r, 400, "max_tokens")
    assert "20 tokens" in error["message"]
    assert fake.requests == []
    ok = run(fake, config(), "POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 20 - n})
    assert ok.status_code == 200 and fake.requests[-1].sampling.max_tokens == 20 - n


def test_without_max_tokens_it_is_clamped_to_what_the_pool_holds():
    fake = small_pool_client(num_blocks=5)
    r = run(fake, config(), "POST", "/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 200
    assert fake.requests[0].sampling.max_tokens == 20 - num_chat_prompt_tokens(USER)  # not 64 - prompt


def test_a_prompt_that_fills_the_pool_is_a_400_on_the_prompt():
    fake = small_pool_client(num_blocks=2)  # 8 tokens
    body = {"prompt": list(range(3, 12))}  # 9 prompt tokens < context 64, but > the pool
    assert_error(run(fake, config(), "POST", "/v1/completions", json=body), 400, "prompt")
    messages = [{"role": "user", "content": "hello world the end of the story"}]
    assert_error(
        run(fake, config(), "POST", "/v1/chat/completions", json={"messages": messages}), 400, "messages"
    )
    assert fake.requests == []


def test_a_replica_engine_bounds_a_request_by_its_largest_group_not_the_sum():
    fake = small_pool_client(num_blocks=10, per_request=5)  # two replicas of 5 blocks: 20 tokens per request
    n = num_chat_prompt_tokens(USER)
    r = run(fake, config(), "POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 21 - n})
    assert_error(r, 400, "max_tokens")


def test_engine_core_reports_its_pool_as_the_per_request_bound():
    runner = FakeRunner(num_kv_blocks=7, block_size=4)
    ready = EngineCore(build_scheduler(EngineConfig(scheduler=SchedulerConfig(block_size=4)), runner), runner)
    assert ready.ready_message().max_blocks_per_request == 7


# ---- long texts: refused before tokenizing when surely over the context, else tokenized off the loop -----


class SpyTokenizer(Tokenizer):
    """The tiny tokenizer, recording the thread each encode ran on."""

    def __init__(self) -> None:
        super().__init__(tiny_tokenizer()._hf)
        self.threads: list[threading.Thread] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.current_thread())
        return super().encode(text)

    def encode_chat(self, messages) -> list[int]:
        self.threads.append(threading.current_thread())
        return super().encode_chat(messages)


def test_a_text_longer_than_the_context_can_hold_is_refused_without_tokenizing_it():
    spy = SpyTokenizer()
    assert spy.max_chars_per_token == 7  # the tiny vocabulary's longest entry; the context is 64 tokens
    for path, body, where in (
        ("/v1/completions", {"prompt": "x" * (64 * 7 + 1)}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "é" * 300}] * 2}, "messages"),
    ):
        app = build_app(config(), FakeClient(), tokenizer=spy)
        error = assert_error(asyncio.run(call(app, "POST", path, json=body)), 400, where)
        assert "characters" in error["message"]
    assert spy.threads == []
    app = build_app(
        config(), FakeClient(), tokenizer=spy
    )  # at the bound it is tokenized (and over by tokens)
    error = assert_error(
        asyncio.run(call(app, "POST", "/v1/completions", json={"prompt": "x" * 448})), 400, "prompt"
    )
    assert "input tokens" in error["message"] and len(spy.threads) == 1


def test_a_long_text_is_tokenized_off_the_event_loop():
    fake = FakeClient()
    fake.ready = Ready("fake", 100_000, 16, 10_000, "cpu", "vllm")
    spy = SpyTokenizer()
    app = build_app(config(), fake, tokenizer=spy)
    for path, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hello world " * 2000, "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "the end " * 3000}], "max_tokens": 2},
        ),
    ):
        assert asyncio.run(call(app, "POST", path, json=body)).status_code == 200
    main = threading.main_thread()
    assert [t is main for t in spy.threads] == [True, False, False]


def test_max_chars_per_token_is_unknown_where_characters_may_vanish():
    class Backend:
        normalizer = "NFKC"
        pre_tokenizer = "ByteLevel()"

    class Hf:
        backend_tokenizer = Backend()

        def get_vocab(self):
            return {"abc": 0}

    assert max_chars_per_token(Hf()) == 0
    Backend.normalizer = None
    assert max_chars_per_token(Hf()) == 3
    Backend.pre_tokenizer = "Sequence([Split(behavior=Removed), ByteLevel()])"
    assert max_chars_per_token(Hf()) == 0


# ---- request body limit -------------------------------------------------------------------------------


def big_body(num_bytes: int) -> bytes:
    body = orjson.dumps({"messages": [{"role": "user", "content": "x" * num_bytes}], "max_tokens": 1})
    assert len(body) > num_bytes
    return body


def test_a_body_over_the_limit_is_a_413_by_its_content_length_before_reading():
    app = build_app(config(max_request_body_bytes=1000), FakeClient(), tokenizer=tiny_tokenizer())
    body = big_body(5000)
    chunks = [body[i : i + 500] for i in range(0, len(body), 500)]
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    status, _, raw, num_read = asyncio.run(raw_asgi(app, "POST", "/v1/chat/completions", headers, chunks))
    assert status == 413 and num_read == 0  # refused on the header alone
    error = orjson.loads(raw)["error"]
    assert (
        error["code"] == 413 and error["type"] == "RequestTooLargeError" and "1000 bytes" in error["message"]
    )


@pytest.mark.parametrize("content_length", [None, b"10"], ids=["chunked", "lying"])
def test_a_body_over_the_limit_is_a_413_while_reading(content_length):
    fake = FakeClient()
    app = build_app(config(max_request_body_bytes=1000), fake, tokenizer=tiny_tokenizer())
    body = big_body(100_000)
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    headers = [(b"transfer-encoding", b"chunked")] if content_length is None else []
    headers += [(b"content-length", content_length)] if content_length else []
    status, _, raw, num_read = asyncio.run(raw_asgi(app, "POST", "/v1/chat/completions", headers, chunks))
    assert status == 413 and orjson.loads(raw)["error"]["code"] == 413
    assert num_read <= 11  # stopped at the first chunk past 1000 bytes, not after all 1000 chunks
    assert fake.requests == []


def test_a_body_at_the_limit_is_served_and_the_limit_can_be_off():
    body = orjson.dumps({"messages": USER, "max_tokens": 2})
    headers = {"content-type": "application/json"}
    r = run(
        FakeClient(),
        config(max_request_body_bytes=len(body)),
        "POST",
        "/v1/chat/completions",
        content=body,
        headers=headers,
    )
    assert r.status_code == 200
    r = run(
        FakeClient(),
        config(max_request_body_bytes=0),
        "POST",
        "/v1/chat/completions",
        content=big_body(300_000),
        headers=headers,
    )
    assert_error(r, 400, "messages")  # read whole (no limit), then refused for its length


def test_a_malformed_content_length_is_a_400():
    app = build_app(config(), FakeClient(), tokenizer=tiny_tokenizer())
    for bad in (b"-5", b"12abc", b"\xb2"):  # "\xb2" is "²", a digit to str.isdigit
        status, _, raw, _ = asyncio.run(
            raw_asgi(app, "POST", "/v1/completions", [(b"content-length", bad)], [b"{}"])
        )
        assert status == 400 and orjson.loads(raw)["error"]["code"] == 400


# ---- API key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "longer", "prefix", "empty"],
)
def test_without_the_key_every_v1_route_is_a_401(headers):
    cfg = config(api_key=KEY)
    for method, path, kwargs in (
        ("POST", "/v1/chat/completions", {"json": {"messages": USER}}),
        ("POST", "/v1/completions", {"json": {"prompt": "hi"}}),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/engine/stats", {}),
    ):
        fake = FakeClient()
        r = run(fake, cfg, method, path, headers=headers, **kwargs)
        error = assert_error(r, 401)
        assert error["type"] == "AuthenticationError" and r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text and fake.requests == []


def test_with_the_key_requests_are_served_and_the_scheme_is_case_insensitive():
    for auth in (f"Bearer {KEY}", f"bearer {KEY}"):
        r = run(
            FakeClient(),
            config(api_key=KEY),
            "POST",
            "/v1/chat/completions",
            json={"messages": USER},
            headers={"Authorization": auth},
        )
        assert r.status_code == 200, r.text


def test_the_key_is_compared_in_constant_time(monkeypatch):
    import server.app

    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(server.app.hmac, "compare_digest", spy)
    r = run(FakeClient(), config(api_key=KEY), "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert len(calls) == 1 and all(isinstance(x, bytes) and len(x) == 32 for x in calls[0])  # sha256 digests


def test_observability_is_open_by_default_and_behind_the_key_when_protected():
    for path in ("/metrics", "/status"):
        assert run(FakeClient(), config(api_key=KEY), "GET", path).status_code == 200
        protected = config(api_key=KEY, protect_observability=True)
        assert_error(run(FakeClient(), protected, "GET", path), 401)
        ok = run(FakeClient(), protected, "GET", path, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.content
    protected = config(api_key=KEY, protect_observability=True)
    for path in (
        "/",
        "/static/status.js",
        "/health",
    ):  # no data there: the page asks for /status with the key
        assert run(FakeClient(), protected, "GET", path).status_code == 200


def test_the_status_page_sends_the_key_it_was_opened_with():
    from server.app import STATIC_DIR

    js = (STATIC_DIR / "status.js").read_text()
    assert 'get("key")' in js and "Authorization" in js and "Bearer" in js


# ---- prefix-cache isolation ---------------------------------------------------------------------------


class CoreClient(FakeClient):
    """FakeClient's interface over a real EngineCore (scheduler, block manager, prefix cache) and the fake runner:
    its usage.cached_tokens are true prefix-cache hits. Output ids are folded into the tiny tokenizer's vocab."""

    def __init__(self, core: EngineCore) -> None:
        super().__init__()
        self.core = core
        self.ready = core.ready_message()

    async def _deltas(self, msg: AddRequest) -> AsyncIterator[TokenDelta]:
        self.core.add_request(msg)
        while True:
            for delta in self.core.step():
                if delta.request_id == msg.request_id:
                    yield dataclasses.replace(delta, token_ids=[3 + t % 200 for t in delta.token_ids])
                    if delta.finish_reason is not None:
                        return
            await asyncio.sleep(0)


def core_client() -> CoreClient:
    runner = FakeRunner(num_kv_blocks=64, block_size=4, max_model_len=MAX_MODEL_LEN)
    sched = SchedulerConfig(block_size=4, enable_prefix_caching=True)
    return CoreClient(
        EngineCore(build_scheduler(EngineConfig(scheduler=sched), runner), runner, check_invariants=True)
    )


PROMPT = [{"role": "user", "content": "hello world, the end of the story"}]  # several 4-token blocks


def cached_tokens(app, tenant: str, **body) -> int:
    r = asyncio.run(
        call(
            app,
            "POST",
            "/v1/chat/completions",
            json={"messages": PROMPT, "max_tokens": 2, **body},
            headers={"X-Tenant-Id": tenant},
        )
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_tenants_do_not_share_prefix_cache_blocks_by_default():
    client = core_client()
    app = build_app(config(), client, tokenizer=tiny_tokenizer())
    assert cached_tokens(app, "alice") == 0
    alice_hit = cached_tokens(app, "alice")
    assert alice_hit >= 8  # the same tenant hits its own blocks
    assert cached_tokens(app, "bob") == 0  # another tenant, the same prompt: no hit
    assert cached_tokens(app, "bob") == alice_hit
    assert client.core.stats().prefix_cache_hits_total == 2 * alice_hit  # the engine counted the same


def test_isolation_none_shares_across_tenants_and_cache_salt_narrows_it():
    app = build_app(config(prefix_cache_isolation="none"), core_client(), tokenizer=tiny_tokenizer())
    assert cached_tokens(app, "alice") == 0
    assert cached_tokens(app, "bob") >= 8
    assert cached_tokens(app, "bob", cache_salt="s3cret") == 0
    assert cached_tokens(app, "alice", cache_salt="s3cret") >= 8


def test_the_salt_reaches_the_engine_and_keeps_parts_apart():
    fake = FakeClient()
    for tenant in ("a", "b"):
        run(fake, config(), "POST", "/v1/completions", json={"prompt": "hi"}, headers={"X-Tenant-Id": tenant})
    assert fake.requests[0].cache_salt != fake.requests[1].cache_salt != ""
    assert prefix_cache_salt("tenant", "a", "b|c") != prefix_cache_salt("tenant", "a|b", "c")
    assert prefix_cache_salt("none", "a", None) == ""
    for bad in ("", 7, ["x"], "x" * 1025):
        r = run(fake, config(), "POST", "/v1/completions", json={"prompt": "hi", "cache_salt": bad})
        assert_error(r, 400, "cache_salt")
    with pytest.raises(ValueError, match="prefix_cache_isolation"):
        config(prefix_cache_isolation="app")


# ---- no request text in logs --------------------------------------------------------------------------

SECRET = "zebra quartz 4711"


def test_no_prompt_or_output_text_in_logs_by_default(caplog):
    fake = FakeClient()
    fake_error = FakeClient()
    fake_error.error_after = 1  # the engine error path logs too
    caplog.set_level(logging.DEBUG)
    cfg = config()
    chat = {"messages": [{"role": "user", "content": SECRET}], "stop": [SECRET]}
    run(fake, cfg, "POST", "/v1/chat/completions", json=chat)
    run(fake, cfg, "POST", "/v1/chat/completions", json={**chat, "stream": True})
    run(fake, cfg, "POST", "/v1/completions", json={"prompt": SECRET})
    run(fake_error, cfg, "POST", "/v1/completions", json={"prompt": SECRET})
    run(fake, cfg, "POST", "/v1/completions", json={"prompt": SECRET, "temperature": "hot"})  # a 400
    assert len(fake.requests) == 3 and caplog.records  # the requests ran, and something was logged
    for record in caplog.records:
        text = record.getMessage() + (caplog.handler.format(record) if record.exc_info else "")
        assert "zebra" not in text and "4711" not in text, text
    assert "hello world" not in caplog.text  # nor the answer


# ---- static files only from static/ -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server/app.py",
        "/static/../../etc/passwd",
        "/static//etc/passwd",
        "/static/%2e%2e/server/app.py",
        "/static/..%2fserver%2fapp.py",
        "/static/..\\server\\app.py",
        "/static/....//server/app.py",
        "/static/status.js/../../pyproject.toml",
        "/static/status.js\x00.png",
        "/static/%00",
        "/static/../static/../README.md",
    ],
)
def test_static_path_traversal_is_a_404(path):
    app = build_app(config(), FakeClient(), tokenizer=tiny_tokenizer())
    status, _, body, _ = asyncio.run(raw_asgi(app, "GET", path))
    assert 400 <= status < 500 and status != 200
    assert b"def build_app" not in body and b"root:" not in body and b"[project]" not in body
    error = orjson.loads(body)["error"]
    assert error["code"] == status


def test_static_files_are_served():
    app = build_app(config(), FakeClient(), tokenizer=tiny_tokenizer())
    status, _, body, _ = asyncio.run(raw_asgi(app, "GET", "/static/status.js"))
    assert status == 200 and b"poll" in body


# ---- the status page behind the key, in a real browser -------------------------------------------------


@contextlib.contextmanager
def uvicorn_app(app) -> Iterator[str]:
    """The app on a real socket in a thread (a fake engine: no model, starts in milliseconds)."""
    import uvicorn
    from live_server import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_protected_status_page_works_in_a_browser_with_the_key():
    from test_status_page import CHROMIUM, CHROMIUM_FLAGS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    app = build_app(config(api_key=KEY, protect_observability=True), FakeClient(), tokenizer=tiny_tokenizer())
    with uvicorn_app(app) as base_url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{base_url}/")  # no key: the page says how to give it
            page.wait_for_function(
                "document.getElementById('state').textContent.includes('401')", timeout=10_000
            )
            assert "?key=" in (page.text_content("#state") or "")
            page.goto(f"{base_url}/?key={KEY}&x=1")
            page.wait_for_function(
                "document.getElementById('state').textContent === 'serving'", timeout=10_000
            )
            assert KEY not in page.url and page.url.endswith("/?x=1")  # out of the address bar and history
            page.reload()  # the tab keeps the key
            page.wait_for_function(
                "document.getElementById('state').textContent === 'serving'", timeout=10_000
            )
            assert (page.text_content("#model") or "") == "fake"
        finally:
            browser.close()
