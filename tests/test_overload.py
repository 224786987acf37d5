"""server/admission.py through the app: --max-queued-requests / --max-queued-tokens (global and per tenant) →
429 + Retry-After in the OpenAI error shape, counted on /metrics, and released on every exit path."""

from __future__ import annotations

import asyncio

import httpx
import orjson
from fake_engine_client import FakeClient
from tiny_tokenizer import tiny_tokenizer

from server.app import build_app
from server.config import ServerConfig

USER = [{"role": "user", "content": "hi"}]


def make_app(fake: FakeClient, **limits: int):
    return build_app(ServerConfig(served_model_names=("fake",), **limits), fake, tokenizer=tiny_tokenizer())


async def post(app, body: dict, tenant: str = "default") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.post("/v1/chat/completions", json=body, headers={"X-Tenant-Id": tenant})


async def get_metrics(app) -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return (await http.get("/metrics")).text


def assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 429 and error["type"] == "RateLimitError" and error["message"]


def assert_idle(app) -> None:
    adm = app.state.admission
    assert (adm.requests, adm.tokens) == (0, 0)
    assert not adm.tenant_requests and not adm.tenant_tokens


def rejected(metrics_text: str, reason: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("kairos:requests_rejected_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kairos:requests_rejected_total for {reason}")


def test_unlimited_by_default():
    fake = FakeClient()
    app = make_app(fake)

    async def main() -> None:
        held = [app.state.admission.admit("default", 10_000) for _ in range(100)]
        r = await post(app, {"messages": USER})
        assert r.status_code == 200
        for t in held:
            t.release()

    asyncio.run(main())
    assert_idle(app)


def test_global_request_limit_429_and_metric():
    fake = FakeClient()
    fake.token_delay_s = 0.02
    app = make_app(fake, max_queued_requests=1)

    async def main() -> None:
        slow = asyncio.create_task(post(app, {"messages": USER}, "a"))
        while app.state.admission.requests == 0:
            await asyncio.sleep(0.005)
        r = await post(app, {"messages": USER}, "b")
        assert_429(r)
        assert app.state.admission.requests == 1  # the refused one was never counted
        assert (await slow).status_code == 200
        assert rejected(await get_metrics(app), "queued_requests") == 1
        assert rejected(await get_metrics(app), "queued_tokens") == 0
        assert (await post(app, {"messages": USER}, "b")).status_code == 200  # room again

    asyncio.run(main())
    assert len(fake.requests) == 2  # the refused request never reached the engine
    assert_idle(app)


def test_global_token_limit():
    fake = FakeClient()
    app = make_app(fake, max_queued_tokens=20)

    async def main() -> None:
        ticket = app.state.admission.admit("other", 15)
        assert_429(await post(app, {"messages": USER}))  # the prompt is > 5 tokens
        ticket.release()
        assert (await post(app, {"messages": USER})).status_code == 200
        assert rejected(await get_metrics(app), "queued_tokens") == 1

    asyncio.run(main())
    assert_idle(app)


def test_per_tenant_limits_hit_one_tenant_only():
    fake = FakeClient()
    app = make_app(fake, max_queued_requests_per_tenant=1, max_queued_tokens_per_tenant=1000)

    async def main() -> None:
        ticket = app.state.admission.admit("a", 5)
        assert_429(await post(app, {"messages": USER}, "a"))
        assert (await post(app, {"messages": USER}, "b")).status_code == 200
        ticket.release()
        metrics = await get_metrics(app)
        assert rejected(metrics, "tenant_queued_requests") == 1
        assert rejected(metrics, "queued_requests") == 0

    asyncio.run(main())
    assert_idle(app)


def test_released_after_engine_error_both_modes():
    fake = FakeClient()
    fake.error_after = 2
    app = make_app(fake, max_queued_requests=1)

    async def main() -> None:
        r = await post(app, {"messages": USER})
        assert r.status_code == 500
        assert_idle(app)
        r = await post(app, {"messages": USER, "stream": True})
        assert r.status_code == 200 and '"error"' in r.text
        assert_idle(app)

    asyncio.run(main())


def test_released_after_stream_finish():
    fake = FakeClient()
    app = make_app(fake, max_queued_requests=1, max_queued_tokens_per_tenant=100)

    async def main() -> None:
        r = await post(app, {"messages": USER, "stream": True}, "a")
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")

    asyncio.run(main())
    assert_idle(app)


async def serve_raw(app, body: dict, leave_after_first_chunk: bool) -> list[dict]:
    """Run the app as uvicorn would, with the client going away after the first body chunk (or at once)."""
    gone = asyncio.Event()
    sent: list[dict] = []
    first = True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": orjson.dumps(body), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-tenant-id", b"a")],
        "server": ("test", 80),
        "client": ("test", 1234),
        "app": app,
    }
    if not leave_after_first_chunk:
        gone.set()
    await app(scope, receive, send)
    return sent


def test_released_after_client_disconnect_mid_stream():
    fake = FakeClient()
    fake.token_delay_s = 0.02
    app = make_app(fake, max_queued_requests=1, max_queued_requests_per_tenant=1)
    sent = asyncio.run(serve_raw(app, {"messages": USER, "stream": True}, leave_after_first_chunk=True))
    assert sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) == 1
    assert len(fake.aborted) == 1
    assert_idle(app)


def test_released_after_client_disconnect_non_streaming():
    fake = FakeClient()
    fake.token_delay_s = 0.02
    app = make_app(fake, max_queued_tokens=100)
    asyncio.run(serve_raw(app, {"messages": USER}, leave_after_first_chunk=False))
    assert len(fake.aborted) == 1
    assert_idle(app)


def test_cli_flags_reach_the_config():
    from server.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--max-queued-requests", "8", "--max-queued-tokens-per-tenant", "4096"]
    )
    assert (args.max_queued_requests, args.max_queued_tokens) == (8, 0)
    assert (args.max_queued_requests_per_tenant, args.max_queued_tokens_per_tenant) == (0, 4096)
