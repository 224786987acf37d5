"""The server's side of the engine process: spawn it, send it requests, route its token deltas to per-request streams.

Everything runs on the server's asyncio loop. Inbound records wake the loop through `loop.add_reader` on the
channel's fd; the engine's death is watched the same way through the process sentinel. Outbound sends never block
the loop: when the ring is full, records wait in an in-order outbox retried with `loop.call_later` (1 ms).

Errors reach a stream as data: when the engine dies, sends EngineError or is shut down, every open stream gets a
final `TokenDelta(finish_reason=FinishReason.ERROR, error=<one line>)` and then ends; `client.error` keeps the whole
text. Calls made on a dead engine (`add_request`) raise `EngineDeadError`. The engine is started with the spawn
context, so the program's main module must be import-safe (`if __name__ == "__main__":`). After the process has
exited, `restart()` spawns a fresh one on new rings (server/supervisor.py decides when).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from engine.codec import CodecError, decode, encode
from engine.config import EngineConfig
from engine.ipc import (
    DEFAULT_RING_CAPACITY,
    Channel,
    ChannelHandles,
    RecordTooLargeError,
    create_channel_pair,
)
from engine.process import DEFAULT_CORE_FACTORY, run_engine_process
from engine.protocol import (
    Abort,
    AddRequest,
    EngineError,
    EngineStats,
    FinishReason,
    Ready,
    ServerToEngine,
    Shutdown,
    TokenDelta,
    TokenDeltaBatch,
)

logger = logging.getLogger(__name__)

EngineMain = Callable[[dict, ChannelHandles, str, int], None]
_RETRY_SEND_S = 1e-3


class EngineDeadError(RuntimeError):
    """The engine process is not running (it died, failed to start, or was shut down)."""


class RequestStream:
    """The deltas of one request, in order; iteration ends after the delta that carries a finish_reason."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.is_finished = False  # a delta with finish_reason has been delivered (not necessarily read)

    def push(self, delta: TokenDelta) -> None:
        if self.is_finished:
            return  # late deltas after a local abort or an engine death
        self.is_finished = delta.finish_reason is not None
        self._queue.put_nowait(delta)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._queue.empty() and self.is_finished:
            raise StopAsyncIteration
        return await self._queue.get()


class EngineClient:
    """Owns the engine process and both rings. Use on one asyncio loop: `start()` there, `await shutdown()` last."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        target: EngineMain = run_engine_process,
        core_factory: str = DEFAULT_CORE_FACTORY,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        log_level: int | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.core_factory = core_factory
        self.ring_capacity = ring_capacity
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self.ready: Ready | None = None
        self.latest_stats: EngineStats | None = None
        self.error: str | None = None  # why the engine is dead, once it is
        # The dead engine's last stats (its counters already carrying the ones before it): added to the new
        # engine's counters, so /metrics and the status window keep counting up across a restart instead of
        # dropping to 0 in the middle of one server process's life.
        self._carried: EngineStats | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._outbox: deque[bytes] = deque()
        self._is_dead = False
        self._ready_future: asyncio.Future[Ready] | None = None
        self._exited: asyncio.Future[None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the engine process (returns at once; `await wait_ready()` next). Call from the running loop."""
        if self._process is not None:
            raise RuntimeError("engine client already started")
        self._loop = asyncio.get_running_loop()
        self._ready_future = self._loop.create_future()
        self._exited = self._loop.create_future()
        self._channel, handles = create_channel_pair(self.ring_capacity)
        # The child's OpenMP runtime reads this when torch loads. By default idle OpenMP threads spin, and on a
        # machine whose cores the server process also needs (2 cores here), each parallel region then waits for
        # a descheduled spinner: 81 vs 511 output tok/s on the offline-128 benchmark (docs/results/throughput.md).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ctx = multiprocessing.get_context("spawn")
        self._process = ctx.Process(
            target=self.target,
            args=(self.config.to_dict(), handles, self.core_factory, self.log_level),
            name="kairos-engine",
            daemon=False,
        )
        try:
            self._process.start()
        except BaseException:
            self._channel.close()
            raise
        logger.info("engine process started (pid %d)", self._process.pid)
        self._loop.add_reader(self._channel.fileno(), self._on_channel_readable)
        self._loop.add_reader(self._process.sentinel, self._on_process_exit)

    def restart(self) -> None:
        """Spawn a fresh engine process after the last one exited (`await wait_ready()` next). The old process's
        streams have all ended with errors by then; `ready`, `latest_stats` and `error` start over."""
        if self._exited is None or not self._exited.done():
            raise RuntimeError("the engine process is still running")
        self._process = None
        self.ready = None
        if self.latest_stats is not None:
            self._carried = self.latest_stats
        self.latest_stats = None
        self.error = None
        self._is_dead = False
        self.start()

    async def wait_exited(self) -> None:
        """Until the current engine process has exited, for whatever reason (death, error, shutdown)."""
        if self._exited is None:
            raise RuntimeError("engine client not started")
        await asyncio.shield(self._exited)

    async def wait_ready(self, timeout: float) -> Ready:
        """The engine's Ready. EngineDeadError if it dies first; TimeoutError after `timeout` seconds."""
        if self._ready_future is None:
            raise RuntimeError("engine client not started")
        return await asyncio.wait_for(asyncio.shield(self._ready_future), timeout)

    async def shutdown(self, timeout: float = 5.0, reason: str = "engine shut down") -> None:
        """Ask the engine to stop, wait up to `timeout` s, then kill it; release the rings.

        Open streams end at once with an ERROR delta carrying `reason`. Idempotent.
        """
        if self._process is None or self._exited is None:
            return
        if not self._exited.done():
            if not self._is_dead:
                self._mark_dead(reason)
                self._send(Shutdown(reason="server shutdown"))
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), timeout)
            except asyncio.TimeoutError:
                logger.warning("engine did not exit within %.1f s; killing it", timeout)
                await self._stop_process()
        self._release()

    async def __aenter__(self) -> EngineClient:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # ---- state ----------------------------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        return not self._is_dead and self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The engine process's exit code once it has exited (negative: killed by that signal)."""
        return None if self._process is None else self._process.exitcode

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def num_queued_sends(self) -> int:
        """Records waiting in the outbox for room in the ring (back-pressure from the engine)."""
        return len(self._outbox)

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, msg: AddRequest) -> RequestStream:
        """Send a request; its deltas arrive on the returned stream. May be called before Ready."""
        if not self.is_alive:
            raise EngineDeadError(self.error or "the engine is not running")
        if msg.request_id in self._streams:
            raise ValueError(f"request id {msg.request_id!r} is already open")
        stream = RequestStream(msg.request_id)
        self._send(msg)  # raises RecordTooLargeError before any state changes
        self._streams[msg.request_id] = stream
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request. Its stream ends at once with FinishReason.ABORT; later deltas for it are dropped."""
        if (stream := self._streams.pop(request_id, None)) is None:
            return
        stream.push(TokenDelta(request_id, [], FinishReason.ABORT))
        if self.is_alive:
            self._send(Abort(request_ids=[request_id]))

    # ---- outbound -------------------------------------------------------------------------------------------

    def _send(self, msg: ServerToEngine) -> None:
        assert self._channel is not None and self._loop is not None
        data = encode(msg)
        if len(data) > self._channel.max_record_size:
            raise RecordTooLargeError(
                f"{type(msg).__name__} is {len(data)} bytes; the ring takes at most "
                f"{self._channel.max_record_size}"
            )
        if self._outbox or not self._channel.try_send(data):
            if not self._outbox:
                self._loop.call_later(_RETRY_SEND_S, self._flush_outbox)
            self._outbox.append(data)

    def _flush_outbox(self) -> None:
        if self._channel is None or self._channel.is_closed:
            self._outbox.clear()
            return
        while self._outbox and self._channel.try_send(self._outbox[0]):
            self._outbox.popleft()
        if self._outbox:
            self._loop.call_later(_RETRY_SEND_S, self._flush_outbox)

    # ---- inbound --------------------------------------------------------------------------------------------

    def _on_channel_readable(self) -> None:
        if self._channel is None or self._channel.is_closed:
            return
        try:
            messages = [decode(record) for record in self._channel.recv_all()]
        except CodecError as exc:
            logger.error("undecodable message from the engine: %s; stopping it", exc)
            self._mark_dead(f"protocol error: {exc}")
            self._process.kill()
            return
        for msg in messages:
            match msg:
                case TokenDeltaBatch(deltas=deltas):
                    self._route(deltas)
                case EngineStats() as stats:
                    self.latest_stats = stats if self._carried is None else carry_totals(stats, self._carried)
                case Ready() as ready:
                    self.ready = ready
                    logger.info(
                        "engine ready: %s on %s, %d KV blocks",
                        ready.model_name,
                        ready.device,
                        ready.num_kv_blocks,
                    )
                    if not self._ready_future.done():
                        self._ready_future.set_result(ready)
                case EngineError(message=message):
                    logger.error("engine error: %s", message.partition("\n")[0])  # the engine logged it whole
                    self._mark_dead(f"engine error: {message}")
                case _:
                    self._mark_dead(f"unexpected message from the engine: {type(msg).__name__}")

    def _route(self, deltas: list[TokenDelta]) -> None:
        for delta in deltas:
            if (stream := self._streams.get(delta.request_id)) is None:
                continue  # aborted here already
            stream.push(delta)
            if delta.finish_reason is not None:
                del self._streams[delta.request_id]

    def _on_process_exit(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        self._on_channel_readable()  # whatever the engine sent before it exited (an EngineError, last deltas)
        self._process.join(timeout=1.0)  # the sentinel fires as the process exits; reaping is immediate
        logger.info("engine process exited with code %s", self._process.exitcode)
        self._mark_dead(f"engine process exited with code {self._process.exitcode}")
        self._release()
        self._exited.set_result(None)

    def _mark_dead(self, reason: str) -> None:
        """End every open stream with an error; later calls raise EngineDeadError. Keeps the first reason.

        `self.error` keeps the whole text (an engine traceback included); streams get its first line only,
        since their error text may reach API clients.
        """
        self._is_dead = True
        self.error = self.error or reason
        summary = self.error.partition("\n")[0]
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.push(TokenDelta(stream.request_id, [], FinishReason.ERROR, error=summary))
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_exception(EngineDeadError(self.error))
            self._ready_future.exception()  # retrieved: no "never retrieved" warning when nobody waits

    async def _stop_process(self) -> None:
        self._process.kill()  # the engine ignores SIGTERM (engine/process.py): only the server stops it
        await asyncio.wait_for(asyncio.shield(self._exited), 5.0)

    def _release(self) -> None:
        """After the process has exited: stop watching fds, release the rings. Idempotent."""
        if self._channel is not None and not self._channel.is_closed:
            self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
        self._outbox.clear()


# ---- counters across engine restarts ----------------------------------------------------------------------------


_TOTALS = tuple(f.name for f in fields(EngineStats) if f.name.endswith("_total"))  # the cumulative fields


def carry_totals(stats: EngineStats, dead: EngineStats) -> EngineStats:
    """`stats` from a restarted engine with the counters of `dead` (the last stats before the restart, themselves
    carried) added: the *_total fields and the *_total entries of `extra`; gauges are the new engine's."""
    extra = dict(stats.extra)
    for key, value in dead.extra.items():
        if key.endswith("_total"):
            extra[key] = extra.get(key, 0.0) + value
    changes: dict[str, Any] = {name: getattr(stats, name) + getattr(dead, name) for name in _TOTALS}
    return replace(stats, **changes, extra=extra)
