"""Keeps the engine serving: restarts the engine process after it dies, and drains on SIGTERM / SIGINT.

`EngineSupervisor.run` starts after the first Ready. When the engine process exits while the server is not shutting
down (killed, crashed, EngineError), its open streams have already ended with an error event (engine_client.py);
the supervisor logs why, waits a back-off (1 s doubling to 30 s, back to 1 s once an engine stayed up a minute),
spawns a fresh process and waits for its Ready. Meanwhile `unavailable_reason` makes /health and every request
503 + Retry-After. After `max_quick_failures` deaths in a row, each within a minute of its start (a crash loop:
bad weights, a broken device, out of memory at load), it stops trying, stays 503 and tells the server to exit
with status 1, so that what runs the server (systemd, Kubernetes) sees the failure instead of a server that answers
503 forever; `startup_failed` does the same when the first engine never becomes ready. `request_drain` (from the
signal handler) stops admissions and restarts; after the drain timeout the engine is shut down, which ends whatever
still streams with an error event, so the server can exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from engine.protocol import Ready
from server.engine_client import EngineDeadError

logger = logging.getLogger(__name__)


class RestartableClient(Protocol):
    """What the supervisor needs of server/engine_client.py's EngineClient."""

    error: str | None

    def restart(self) -> None: ...

    async def wait_exited(self) -> None: ...

    async def wait_ready(self, timeout: float) -> Ready: ...

    async def shutdown(self, timeout: float = 5.0, reason: str = "engine shut down") -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0  # an engine up this long has its next restart start over at first_delay_s
    max_quick_failures: int = 5  # deaths in a row, each before stable_after_s, that end the server; 0 = never

    def delay(self, num_quick_failures: int) -> float:
        """Back-off before the restart that follows `num_quick_failures` (>= 1) deaths in a row."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (num_quick_failures - 1))


class EngineSupervisor:
    def __init__(
        self,
        client: RestartableClient,
        ready_timeout_s: float,
        drain_timeout_s: float,
        policy: RestartPolicy = RestartPolicy(),
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.policy = policy
        self.on_restart = on_restart  # told of each spawn after a death (the metrics counter)
        self.on_give_up: Callable[[], None] | None = None  # stops the server (cli.py: uvicorn's should_exit)
        self.gave_up = False
        self.num_restarts = 0
        self.last_exit: str | None = None  # why the engine last died, first line
        self.is_restarting = False
        self.is_draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_task: asyncio.Task | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop `request_drain` hands over to (the lifespan's)."""
        self._loop = loop

    def unavailable_reason(self) -> str | None:
        if self.gave_up:
            return f"the engine keeps failing ({self.last_exit}); the server is stopping"
        if self.is_draining:
            return "the server is shutting down"
        if self.is_restarting:
            return f"the engine is restarting ({self.last_exit})"
        return None

    # ---- restarts ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """From the first Ready until cancelled or draining: on each unexpected exit, restart the engine."""
        num_quick_failures = 0
        while True:
            up_since = time.monotonic()
            await self.client.wait_exited()
            if self.is_draining:
                return
            self.is_restarting = True
            self.last_exit = (self.client.error or "the engine process exited").partition("\n")[0]
            is_quick = time.monotonic() - up_since < self.policy.stable_after_s
            num_quick_failures = num_quick_failures + 1 if is_quick else 1
            if 0 < self.policy.max_quick_failures <= num_quick_failures:
                self.give_up(
                    f"engine died {num_quick_failures} times in a row, each within "
                    f"{self.policy.stable_after_s:.0f} s of its start (last: {self.last_exit}); not restarting it again"
                )
                return
            delay = self.policy.delay(num_quick_failures)
            logger.error("engine died (%s); restarting it in %.1f s", self.last_exit, delay)
            await asyncio.sleep(delay)
            if self.is_draining:
                return
            self.num_restarts += 1
            if self.on_restart is not None:
                self.on_restart()
            self.client.restart()
            try:
                ready = await self.client.wait_ready(self.ready_timeout_s)
            except asyncio.TimeoutError:
                logger.error("restarted engine not ready after %.0f s; stopping it", self.ready_timeout_s)
                await self.client.shutdown(reason="the restarted engine did not become ready")
                continue
            except EngineDeadError:  # it died while starting: wait_exited returns at once, a longer back-off
                continue
            self.is_restarting = False
            logger.info("engine restarted (restart %d): %s, %d KV blocks", self.num_restarts,
                        ready.model_name, ready.num_kv_blocks)  # fmt: skip

    def startup_failed(self, reason: str) -> None:
        """The first engine never became ready (bad model, too little memory): nothing to restart, the server exits
        1 as vLLM's does, instead of answering 503 forever."""
        self.last_exit = reason.partition("\n")[0]
        self.give_up(f"the engine did not start ({self.last_exit})")

    def give_up(self, why: str) -> None:
        """Stop restarting, answer 503 and have the server exit 1."""
        self.gave_up = True
        logger.critical("%s; stopping the server", why)
        if self.on_give_up is not None:
            self.on_give_up()

    # ---- drain ------------------------------------------------------------------------------------------------

    def request_drain(self) -> None:
        """Safe to call from a signal handler: the drain starts on the bound loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Refuse new requests (503) and stop restarting; after the drain timeout, end the engine and with it every
        stream still open (an error event each)."""
        if self.is_draining:
            return
        self.is_draining = True
        logger.info("draining: in-flight requests have %g s to finish", self.drain_timeout_s)
        self._drain_timer = asyncio.get_running_loop().call_later(
            self.drain_timeout_s, self._on_drain_timeout
        )

    def _on_drain_timeout(self) -> None:
        logger.warning("drain timeout (%g s): ending the requests still in flight", self.drain_timeout_s)
        reason = f"the server is shutting down (drain timeout {self.drain_timeout_s:g} s)"
        self._drain_task = asyncio.ensure_future(self.client.shutdown(reason=reason))

    async def close(self) -> None:
        """The lifespan's end: no timer left behind, a timed-out drain's shutdown awaited."""
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)
