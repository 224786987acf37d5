"""server/generation.py: a request in flight is aborted in the engine whenever its client goes away."""

from __future__ import annotations

import asyncio

from fake_engine_client import ANSWER, FakeClient
from starlette.requests import Request
from tiny_tokenizer import tiny_tokenizer

from engine.protocol import AddRequest
from server.generation import Generation, complete, run_unless_disconnected, sse_response
from server.schema import GenerationParams


def make_generation(stream: bool, max_tokens: int = 50) -> Generation:
    tok = tiny_tokenizer()
    prompt_ids = tok.encode("hi")
    params = GenerationParams(stream=stream)
    msg = AddRequest("req-1", prompt_ids, params.sampling(max_tokens), arrival_time=0.0)
    return Generation(msg, params, tok.output_text(prompt_ids, ()), "fake", is_chat=True)


def slow_client() -> FakeClient:
    client = FakeClient()
    client.token_delay_s = 0.05  # ANSWER takes ~0.5 s
    return client


def test_complete_reads_to_the_end_without_aborting():
    client = FakeClient()
    body = asyncio.run(complete(client, make_generation(stream=False)))
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert client.aborted == []


def test_non_streaming_disconnect_cancels_and_aborts():
    client = slow_client()

    async def main() -> object:
        async def receive() -> dict:
            await asyncio.sleep(0.1)
            return {"type": "http.disconnect"}

        request = Request({"type": "http", "method": "POST", "headers": []}, receive)
        return await run_unless_disconnected(request, complete(client, make_generation(stream=False)))

    assert asyncio.run(main()) is None
    assert client.aborted == ["req-1"]


async def serve_sse(client: FakeClient, slow_send: bool) -> tuple[list[dict], list[str]]:
    """Run the SSE response as uvicorn would (ASGI 2.3), with the client leaving after the first chunk.

    Returns what was sent and the aborts seen as soon as the response returned (before asyncio.run's own
    clean-up closes leftover generators, which would hide a missing abort).
    """
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            gone.set()
            if slow_send:  # the disconnect lands while the generator waits at its `yield`
                await asyncio.sleep(1)

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await sse_response(client, make_generation(stream=True))(scope, receive, send)
    return sent, list(client.aborted)


def test_stream_disconnect_while_waiting_for_tokens_aborts():
    client = slow_client()
    sent, aborted = asyncio.run(serve_sse(client, slow_send=False))
    assert aborted == ["req-1"]
    assert sum(1 for m in sent if m["type"] == "http.response.body") == 1


def test_stream_disconnect_while_sending_aborts():
    client = slow_client()
    _, aborted = asyncio.run(serve_sse(client, slow_send=True))
    assert aborted == ["req-1"]
