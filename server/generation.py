"""One request in flight: AddRequest → the engine's token deltas → text → SSE events or one JSON body.

`Generation` holds a request's state and tally. `_pieces` is the only reader of the engine stream; its `finally`
aborts the request in the engine whenever the server stops reading early (client disconnect, stop string,
error), so a request never outlives its client. Errors surface as `RequestError` (503 when the engine is gone).
Token timing goes to the Generation's `RequestObserver` (server/metrics.py): first token, each later one, finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.protocol import AddRequest, EngineStats, FinishReason, Ready, TokenDelta
from server import sse
from server.schema import GenerationParams, RequestError
from server.tokenizer import OutputText

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineClientLike(Protocol):
    """What the app needs of server/engine_client.py's EngineClient (tests may pass a fake)."""

    ready: Ready | None
    latest_stats: EngineStats | None
    error: str | None  # why the engine died, once it has

    @property
    def is_alive(self) -> bool: ...

    def start(self) -> None: ...

    async def wait_ready(self, timeout: float) -> Ready: ...

    def restart(self) -> None: ...

    async def wait_exited(self) -> None: ...

    def add_request(self, msg: AddRequest) -> AsyncIterator[TokenDelta]: ...

    def abort(self, request_id: str) -> None: ...

    async def shutdown(self, timeout: float = 5.0, reason: str = "engine shut down") -> None: ...


class RequestObserver(Protocol):
    """Told of a request's token timing as it runs (server/metrics.py's Metrics). Times are time.time()."""

    def on_first_token(self, gen: Generation, now: float) -> None: ...

    def on_token_gap(self, gen: Generation, gap_s: float) -> None: ...

    def on_finish(self, gen: Generation, now: float) -> None: ...


@dataclass
class Generation:
    """One request in flight: what goes to the engine, and the tally that the log line and usage report."""

    msg: AddRequest
    params: GenerationParams
    output: OutputText
    model_name: str
    is_chat: bool
    created: int = field(default_factory=lambda: int(time.time()))
    num_cached_tokens: int = 0
    finish_reason: str = "abort"  # what the log line says if the request never finishes normally
    observer: RequestObserver | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    queue_seconds: float = 0.0  # the engine's, from the first token's delta

    @property
    def request_id(self) -> str:
        return self.msg.request_id

    def record_delta(self, delta: TokenDelta, now: float) -> None:
        """Timing of a delta that carries tokens: TTFT on the first, the gap since the previous one after it."""
        if not delta.token_ids:
            return
        if self.first_token_time is None:
            self.first_token_time = now
            self.num_cached_tokens = delta.num_cached_tokens
            self.queue_seconds = delta.queue_seconds
            if self.observer is not None:
                self.observer.on_first_token(self, now)
        elif self.observer is not None and self.last_token_time is not None:
            self.observer.on_token_gap(self, now - self.last_token_time)
        self.last_token_time = now

    def record_finish(self, now: float) -> None:
        if self.observer is not None:
            self.observer.on_finish(self, now)
        _log_finish(self, now)

    def usage(self) -> dict[str, Any]:
        return sse.usage_body(len(self.msg.prompt_token_ids), self.output.num_tokens, self.num_cached_tokens)


async def _pieces(client: EngineClientLike, gen: Generation) -> AsyncIterator[tuple[str, str | None]]:
    """(text, finish_reason) per engine delta; finish_reason is set on the last piece.

    The engine request is aborted in `finally` unless the engine itself finished it: this covers client
    disconnect (cancellation or aclose of this generator), a stop string, and errors alike.
    """
    engine_done = False
    try:
        async for delta in client.add_request(gen.msg):
            gen.record_delta(delta, time.time())
            text = gen.output.add(delta.token_ids)
            if gen.output.is_stopped:
                gen.finish_reason = "stop"
                yield text, "stop"
                return
            if delta.finish_reason is None:
                yield text, None
                continue
            engine_done = True
            if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                gen.finish_reason = delta.finish_reason.openai_name
                raise _engine_failure(
                    client, delta.error or f"the engine ended the request ({gen.finish_reason})"
                )
            text += gen.output.finish()
            # A stop string can still complete in the final flush; then it is a "stop" whatever the engine says.
            gen.finish_reason = "stop" if gen.output.is_stopped else delta.finish_reason.openai_name
            yield text, gen.finish_reason
            return
        engine_done = True  # the stream ended without a terminal delta: the engine is gone
        gen.finish_reason = "error"
        raise _engine_failure(client, "the engine stopped before the request finished")
    except RequestError:
        raise
    except Exception as exc:  # the engine client's own error on engine death, or a bug
        engine_done = engine_done or not client.is_alive
        gen.finish_reason = "error"
        raise _engine_failure(client, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if not engine_done:
            _abort(client, gen.request_id)
        gen.record_finish(time.time())


def _engine_failure(client: EngineClientLike, message: str) -> RequestError:
    if not client.is_alive:
        return RequestError(f"the engine is not running: {message}", status=503)
    return RequestError(message, status=500)


class SSEResponse(StreamingResponse):
    """Closes its generator however the response ends. Starlette cancels the send loop on disconnect; if that
    happens while the generator sits at a `yield`, only this aclose runs its `finally` (the engine abort)."""

    body_iterator: AsyncGenerator[bytes, None]
    on_close: Callable[[], None] | None = None  # run last, however the response ends (admission release)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()


def sse_response(
    client: EngineClientLike, gen: Generation, on_close: Callable[[], None] | None = None
) -> SSEResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    response = SSEResponse(_sse_events(client, gen), media_type="text/event-stream", headers=headers)
    response.on_close = on_close
    return response


async def _sse_events(client: EngineClientLike, gen: Generation) -> AsyncIterator[bytes]:
    chunks = sse.ChunkBuilder(gen.request_id, gen.created, gen.model_name, gen.is_chat)
    continuous = gen.params.include_usage and gen.params.continuous_usage_stats
    try:
        async with aclosing(_pieces(client, gen)) as pieces:
            async for text, finish_reason in pieces:
                usage = gen.usage() if continuous else None
                if finish_reason is not None:
                    if not chunks.sent_first:  # a one-token answer still gets its role chunk first
                        yield sse.sse_event(chunks.text(text, usage))
                        text = ""
                    yield sse.sse_event(chunks.finish(text, finish_reason, usage))
                elif text or not chunks.sent_first:  # the first token always makes a chunk (honest TTFT)
                    yield sse.sse_event(chunks.text(text, usage))
        if gen.params.include_usage:
            yield sse.sse_event(chunks.usage(gen.usage()))
    except RequestError as exc:
        yield sse.sse_event(sse.error_body(exc.message, exc.type, exc.param, exc.status))
    yield sse.DONE


async def complete(client: EngineClientLike, gen: Generation) -> dict[str, Any]:
    """The non-streaming response body."""
    texts: list[str] = []
    finish_reason = "stop"
    async with aclosing(_pieces(client, gen)) as pieces:
        async for text, reason in pieces:
            texts.append(text)
            finish_reason = reason or finish_reason
    build = sse.chat_completion_body if gen.is_chat else sse.completion_body
    return build(gen.request_id, gen.created, gen.model_name, "".join(texts), finish_reason, gen.usage())


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run a non-streaming request; None if the client left first (the work is cancelled, so aborted)."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _abort(client: EngineClientLike, request_id: str) -> None:
    """Synchronous on purpose: it runs in `finally` blocks of cancelled tasks, where an await would not."""
    try:
        client.abort(request_id)
    except Exception:  # a dead engine has nothing left to abort
        logger.warning("abort of %s failed", request_id, exc_info=True)


def _log_finish(gen: Generation, now: float) -> None:
    ttft = f"{gen.first_token_time - gen.msg.arrival_time:.3f}s" if gen.first_token_time else "-"
    logger.info(
        "%s %s prompt=%d completion=%d cached=%d ttft=%s e2e=%.3fs tenant=%s app=%s class=%s",
        gen.request_id,
        gen.finish_reason,
        len(gen.msg.prompt_token_ids),
        gen.output.num_tokens,
        gen.num_cached_tokens,
        ttft,
        now - gen.msg.arrival_time,
        gen.msg.tenant,
        gen.msg.app_id or "-",
        gen.msg.slo_class,
    )
