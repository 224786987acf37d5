"""server/engine_client.py + engine/process.py: a real spawned engine process around a fake core.

The fake core lives in this module; the engine process imports it by the path in `core_factory`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from engine.config import DeviceConfig, EngineConfig, ModelConfig
from engine.ipc import SHM_PREFIX
from engine.protocol import AddRequest, EngineStats, FinishReason, Ready, SamplingParams, TokenDelta
from server.engine_client import EngineClient, EngineDeadError, RequestStream

CONFIG = EngineConfig(stats_interval_s=0.02)
READY_TIMEOUT_S = 30.0


# ---- the fake core (runs in the engine process) -------------------------------------------------------------


class FakeCore:
    """Each request yields tokens 0, 1, …, max_tokens - 1, one per step, then finishes with LENGTH.

    A request whose id starts with "boom" makes `step` raise. Counters go out in `EngineStats.extra`.
    """

    def __init__(self, config: EngineConfig, step_delay_s: float = 0.0) -> None:
        self.config = config
        self.step_delay_s = step_delay_s
        self.num_generated: dict[str, int] = {}
        self.requests: dict[str, AddRequest] = {}
        self.num_added = 0
        self.num_aborted = 0
        self.num_steps = 0

    def add_request(self, msg: AddRequest) -> None:
        self.requests[msg.request_id] = msg
        self.num_generated[msg.request_id] = 0
        self.num_added += 1

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.num_aborted += 1

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[TokenDelta]:
        time.sleep(self.step_delay_s)
        self.num_steps += 1
        deltas = []
        for request_id, msg in list(self.requests.items()):
            if request_id.startswith("boom"):
                raise RuntimeError(f"boom in step for {request_id}")
            n = self.num_generated[request_id]
            self.num_generated[request_id] = n + 1
            is_last = n + 1 >= msg.sampling.max_tokens
            num_prompt = len(msg.prompt_token_ids) if n == 0 else 0
            deltas.append(TokenDelta(request_id, [n], FinishReason.LENGTH if is_last else None, num_prompt))
            if is_last:
                del self.requests[request_id]
        return deltas

    def stats(self) -> EngineStats:
        return EngineStats(
            timestamp=time.time(),
            num_running=len(self.requests),
            num_waiting=0,
            num_preempted=0,
            num_free_blocks=64,
            num_total_blocks=64,
            kv_usage=0.0,
            num_preemptions_total=0,
            num_prompt_tokens_total=0,
            num_generation_tokens_total=sum(self.num_generated.values()),
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
            num_steps_total=self.num_steps,
            last_step_seconds=self.step_delay_s,
            extra={"num_added": float(self.num_added), "num_aborted": float(self.num_aborted)},
        )

    def ready_message(self) -> Ready:
        return Ready("fake", 128, 16, 64, "cpu", self.config.scheduler.policy)


def build_fake_core(config: EngineConfig) -> FakeCore:
    return FakeCore(config)


def build_slow_fake_core(config: EngineConfig) -> FakeCore:
    return FakeCore(config, step_delay_s=0.005)


def build_broken_core(config: EngineConfig) -> FakeCore:
    raise ValueError("no such model: nowhere")


FAST = f"{__name__}:build_fake_core"
SLOW = f"{__name__}:build_slow_fake_core"
BROKEN = f"{__name__}:build_broken_core"


# ---- helpers ------------------------------------------------------------------------------------------------


def _own_segments() -> set[str]:
    """Rings this test process created (other servers may run on the machine at the same time)."""
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}{os.getpid()}_*")}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = _own_segments()
    yield
    assert _own_segments() - before == set()


def request(request_id: str, max_tokens: int = 4, prompt: list[int] | None = None) -> AddRequest:
    return AddRequest(request_id, prompt or [1, 2, 3], SamplingParams(max_tokens=max_tokens), time.time())


async def collect(stream: RequestStream, timeout: float = 10.0) -> list[TokenDelta]:
    async def drain() -> list[TokenDelta]:
        return [delta async for delta in stream]

    return await asyncio.wait_for(drain(), timeout)


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ---- tests --------------------------------------------------------------------------------------------------


def test_requests_stream_back_in_order() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=FAST) as client:
            ready = await client.wait_ready(READY_TIMEOUT_S)
            assert ready == Ready("fake", 128, 16, 64, "cpu", CONFIG.scheduler.policy) == client.ready
            assert client.is_alive
            sizes = {"a": 5, "b": 1, "c-ü": 3}
            streams = {rid: client.add_request(request(rid, n, [7] * n)) for rid, n in sizes.items()}
            results = await asyncio.gather(*(collect(s) for s in streams.values()))
            for n, deltas in zip(sizes.values(), results, strict=True):
                assert [t for d in deltas for t in d.token_ids] == list(range(n))
                assert [d.finish_reason for d in deltas] == [None] * (n - 1) + [FinishReason.LENGTH]
                assert deltas[0].num_prompt_tokens == n
            assert client.num_open_streams == 0
            await until(
                lambda: client.latest_stats is not None and client.latest_stats.extra["num_added"] == 3
            )
            await until(lambda: client.latest_stats.num_running == 0)
        assert not client.is_alive
        assert client.exitcode == 0

    asyncio.run(main())


def test_requests_sent_before_ready_are_served() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=FAST) as client:
            stream = client.add_request(request("early", 2))
            assert [d.token_ids for d in await collect(stream, READY_TIMEOUT_S)] == [[0], [1]]

    asyncio.run(main())


def test_abort_ends_the_stream_and_reaches_the_core() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=SLOW) as client:
            await client.wait_ready(READY_TIMEOUT_S)
            stream = client.add_request(request("long", 10**6))
            keep = client.add_request(request("short", 3))
            assert (await asyncio.wait_for(anext(stream), 5)).token_ids == [0]
            client.abort("long")
            client.abort("long")  # twice, or for an unknown id: no effect
            rest = await collect(stream)
            assert rest[-1].finish_reason == FinishReason.ABORT
            assert [d.finish_reason for d in await collect(keep)][-1] == FinishReason.LENGTH
            await until(lambda: client.latest_stats.extra["num_aborted"] == 1.0)
            await until(lambda: client.latest_stats.num_running == 0)

    asyncio.run(main())


def test_killing_the_engine_ends_every_open_stream_with_an_error() -> None:
    async def main() -> None:
        client = EngineClient(CONFIG, core_factory=SLOW)
        client.start()
        try:
            await client.wait_ready(READY_TIMEOUT_S)
            streams = [client.add_request(request(f"r{i}", 10**6)) for i in range(3)]
            for stream in streams:
                await asyncio.wait_for(anext(stream), 5)
            os.kill(client.pid, signal.SIGKILL)
            for stream in streams:
                last = (await collect(stream, timeout=5))[-1]
                assert last.finish_reason == FinishReason.ERROR
                assert "exited with code -9" in last.error
            assert not client.is_alive
            assert client.exitcode == -signal.SIGKILL
            with pytest.raises(EngineDeadError, match="code -9"):
                client.add_request(request("late"))
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_engine_error_reaches_every_stream_with_its_traceback() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=SLOW) as client:
            await client.wait_ready(READY_TIMEOUT_S)
            bystander = client.add_request(request("fine", 10**6))
            await asyncio.wait_for(anext(bystander), 5)
            culprit = client.add_request(request("boom-1"))
            for stream in (bystander, culprit):
                last = (await collect(stream, timeout=5))[-1]
                assert last.finish_reason == FinishReason.ERROR
                assert last.error == "engine error: RuntimeError: boom in step for boom-1"
            assert "Traceback" in client.error and "boom-1" in client.error
            assert not client.is_alive
            await until(lambda: client.exitcode is not None)
            assert client.exitcode == 1

    asyncio.run(main())


def test_a_core_that_fails_to_build_fails_wait_ready() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=BROKEN) as client:
            with pytest.raises(EngineDeadError, match="no such model"):
                await client.wait_ready(READY_TIMEOUT_S)
            assert not client.is_alive

    asyncio.run(main())


def test_shutdown_is_clean_and_ends_open_streams() -> None:
    async def main() -> None:
        client = EngineClient(CONFIG, core_factory=SLOW)
        client.start()
        await client.wait_ready(READY_TIMEOUT_S)
        stream = client.add_request(request("open", 10**6))
        await asyncio.wait_for(anext(stream), 5)
        started = time.monotonic()
        await client.shutdown(timeout=5)
        assert time.monotonic() - started < 2
        assert client.exitcode == 0
        assert not client.is_alive
        last = (await collect(stream))[-1]
        assert (last.finish_reason, last.error) == (FinishReason.ERROR, "engine shut down")
        await client.shutdown()  # idempotent

    asyncio.run(main())


def test_a_full_ring_queues_sends_in_order_without_blocking_the_loop() -> None:
    async def main() -> None:
        async with EngineClient(CONFIG, core_factory=FAST, ring_capacity=4096) as client:
            await client.wait_ready(READY_TIMEOUT_S)
            streams = [client.add_request(request(f"r{i:03d}", 2, [5] * 20)) for i in range(100)]
            assert client.num_queued_sends > 0  # ~150 bytes per record: most wait in the outbox
            results = await asyncio.gather(*(collect(s) for s in streams))
            assert all([d.token_ids for d in deltas] == [[0], [1]] for deltas in results)
            assert client.num_queued_sends == 0

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("engine.runner") is None, reason="engine/runner.py not there yet"
)
def test_the_real_core_serves_a_tiny_random_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIROS_CACHE_DIR", str(tmp_path))  # the spawned engine inherits the environment
    monkeypatch.setenv("KAIROS_COMPILE", "0")
    config = EngineConfig(
        model=ModelConfig(model="tiny-random"),
        device=DeviceConfig(device="cpu", kv_cache_memory=8 * 2**20, num_threads=1),
        stats_interval_s=0.05,
    )

    async def main() -> None:
        async with EngineClient(config) as client:
            ready = await client.wait_ready(120)
            assert (ready.model_name, ready.device, ready.block_size) == ("tiny-random", "cpu", 16)
            sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            streams = [
                client.add_request(AddRequest(f"r{i}", [1, 2, 3, 4 + i], sampling, time.time()))
                for i in range(2)
            ]
            for deltas in await asyncio.gather(*(collect(s, timeout=60) for s in streams)):
                assert len([t for d in deltas for t in d.token_ids]) == 6
                assert deltas[-1].finish_reason == FinishReason.LENGTH
            await until(lambda: client.latest_stats.num_generation_tokens_total == 12, timeout=10)
        assert client.exitcode == 0

    asyncio.run(main())


def _serve_then_hang(config_dict: dict, report: Connection) -> None:
    """A stand-in server process: starts an engine, reports its pid and rings, then waits to be killed."""

    async def main() -> None:
        client = EngineClient(EngineConfig.from_dict(config_dict), core_factory=SLOW)
        client.start()
        await client.wait_ready(READY_TIMEOUT_S)
        client.add_request(request("orphan", 10**6))
        report.send((client.pid, client._channel._outbound.name, client._channel._inbound.name))
        await asyncio.sleep(60)

    asyncio.run(main())


def test_the_engine_exits_when_the_server_process_dies() -> None:
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    server = ctx.Process(target=_serve_then_hang, args=(CONFIG.to_dict(), sender))
    server.start()
    ring_names: list[str] = []
    try:
        assert receiver.poll(READY_TIMEOUT_S)
        engine_pid, *ring_names = receiver.recv()
        os.kill(server.pid, signal.SIGKILL)
        server.join(5)
        deadline = time.monotonic() + 5
        while _is_running(engine_pid):
            assert time.monotonic() < deadline, "the engine outlived its server"
            time.sleep(0.01)
    finally:
        if server.is_alive():
            server.kill()
        for (
            name
        ) in ring_names:  # the killed server could not unlink them; its resource tracker would, at exit
            segment = SharedMemory(name=name)
            segment.close()
            segment.unlink()


def _is_running(pid: int) -> bool:
    """False once the process is gone or a zombie (its parent died; init reaps it when it gets to it)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False
