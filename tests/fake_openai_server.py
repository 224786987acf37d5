"""A deterministic fake OpenAI-compatible server for the load generator's tests (Starlette + uvicorn in a thread).

It streams `max_tokens` (or `max_completion_tokens`) chunks of one token each: the first after `ttft_s`, the
next ones `itl_s` apart; `finish_reason` rides on the last token's chunk (as vLLM does), then a usage chunk
with empty `choices`, then `[DONE]`. Prompt tokens: the number of ids, or of whitespace-separated words.
Tenants in `reject_tenants` always get 429; every request's first `num_429_first` attempts get 429 too.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


@dataclass(frozen=True)
class FakeBehavior:
    ttft_s: float = 0.1
    itl_s: float = 0.02
    send_usage: bool = True
    reject_tenants: frozenset[str] = frozenset()
    num_429_first: int = 0
    retry_after: str = "0"


@dataclass
class FakeLog:
    """What the server received: one entry per attempt."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)


def _chunk(body: dict[str, Any], is_chat: bool, index: int, last: bool) -> bytes:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
    if is_chat:
        choice["delta"] = {"role": "assistant", "content": " tok"} if index == 0 else {"content": " tok"}
    else:
        choice["text"] = " tok"
    return b"data: " + orjson.dumps({"id": "x", "model": body.get("model"), "choices": [choice]}) + b"\n\n"


def build_app(behavior: FakeBehavior, log: FakeLog) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def generate(request: Request) -> Response:
        body = orjson.loads(await request.body())
        headers = {k.lower(): v for k, v in request.headers.items()}
        log.requests.append({"path": request.url.path, "body": body, "headers": headers})
        request_id = headers.get("x-request-id", "")
        log.attempts[request_id] = attempt = log.attempts.get(request_id, 0) + 1
        if headers.get("x-tenant-id") in behavior.reject_tenants or attempt <= behavior.num_429_first:
            error = {"error": {"message": "too many requests", "type": "RateLimitError", "code": 429}}
            return JSONResponse(error, status_code=429, headers={"Retry-After": behavior.retry_after})
        is_chat = request.url.path.endswith("/chat/completions")
        num_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if is_chat:
            num_prompt = sum(len(m["content"].split()) for m in body["messages"])
        else:
            prompt = body["prompt"]
            num_prompt = len(prompt.split()) if isinstance(prompt, str) else len(prompt)

        async def stream() -> AsyncIterator[bytes]:
            start = time.perf_counter()
            for i in range(num_tokens):
                # Sleep to an absolute deadline, so scheduling jitter does not accumulate over the stream.
                due = start + behavior.ttft_s + i * behavior.itl_s
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                yield _chunk(body, is_chat, i, i == num_tokens - 1)
            if behavior.send_usage:
                usage = {"prompt_tokens": num_prompt, "completion_tokens": num_tokens}
                yield b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
    ]
    return Starlette(routes=routes)


@dataclass
class FakeServer:
    base_url: str
    log: FakeLog


@contextmanager
def fake_server(behavior: FakeBehavior | None = None) -> Iterator[FakeServer]:
    """Serves the fake app on a free port in a background thread for the duration of the `with`."""
    log = FakeLog()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(behavior or FakeBehavior(), log), log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield FakeServer(f"http://127.0.0.1:{port}", log)
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()
