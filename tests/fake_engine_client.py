"""A scripted stand-in for server/engine_client.py's EngineClient: no engine process, deterministic deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tiny_tokenizer import tiny_tokenizer

from engine.protocol import AddRequest, EngineStats, FinishReason, Ready, TokenDelta

MAX_MODEL_LEN = 64
ANSWER = "hello world, the end"


class FakeClient:
    """Answers every request with ANSWER, one token per delta, `token_delay_s` apart; records adds and aborts."""

    def __init__(self) -> None:
        self.ready: Ready | None = Ready("fake", MAX_MODEL_LEN, 16, 100, "cpu", "vllm")
        self.latest_stats: EngineStats | None = EngineStats(
            1.0, 0, 0, 0, 100, 100, 0.0, 0, 0, 0, 0, 0, 0, 0.0
        )
        self.alive = True
        self.error: str | None = None
        self.requests: list[AddRequest] = []
        self.aborted: list[str] = []
        self.error_after: int | None = None  # end with an ERROR delta after this many tokens
        self.die = False  # with error_after: the engine is dead afterwards
        self.token_delay_s = 0.0

    @property
    def is_alive(self) -> bool:
        return self.alive

    def start(self) -> None:
        pass

    async def wait_ready(self, timeout: float) -> Ready:
        assert self.ready is not None
        return self.ready

    async def _deltas(self, msg: AddRequest) -> AsyncIterator[TokenDelta]:
        ids = tiny_tokenizer().encode(ANSWER)
        n = min(len(ids), msg.sampling.max_tokens)
        for i in range(n):
            await asyncio.sleep(self.token_delay_s)
            if self.error_after is not None and i == self.error_after:
                self.alive = not self.die
                yield TokenDelta(msg.request_id, [], FinishReason.ERROR, error="boom")
                return
            reason = None if i < n - 1 else (FinishReason.STOP if n == len(ids) else FinishReason.LENGTH)
            yield TokenDelta(msg.request_id, [ids[i]], reason, len(msg.prompt_token_ids), 3 if i == 0 else 0)

    def add_request(self, msg: AddRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(msg)
        return self._deltas(msg)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def restart(self) -> None:
        self.alive = True

    async def wait_exited(self) -> None:
        await asyncio.Event().wait()  # no process to exit: the supervisor never restarts a fake

    async def shutdown(self, timeout: float = 5.0, reason: str = "engine shut down") -> None:
        self.alive = False
