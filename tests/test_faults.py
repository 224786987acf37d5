"""Faults (issue 11): engine death and restart, client disconnects under load, SIGTERM drain.

Three layers. server/supervisor.py around a real EngineClient and engine process with test_engine_client.py's fake
core (fast, exact). The real scheduler with `check_invariants` after every step in a real engine process on the
tiny random model, under random aborts. And a real `python -m server serve` with the default model: kill -9 of its
engine under open streams, 40 streams that their clients drop at random points, SIGTERM with streams in flight.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from fake_engine_client import FakeClient
from live_server import REPO, LiveServer, free_port, live_server
from prometheus_client.parser import text_string_to_metric_families
from tiny_tokenizer import tiny_tokenizer

from engine.config import DeviceConfig, EngineConfig, ModelConfig
from engine.core import EngineCore, build_engine_core
from engine.ipc import SHM_PREFIX
from engine.protocol import AddRequest, FinishReason, Ready, SamplingParams, TokenDelta
from server.app import build_app
from server.config import ServerConfig
from server.engine_client import EngineClient, EngineDeadError, RequestStream
from server.supervisor import EngineSupervisor, RestartPolicy

SLOW_FAKE = "tests.test_engine_client:build_slow_fake_core"  # one token per 5 ms step, forever if asked
FAKE_CONFIG = EngineConfig(stats_interval_s=0.02)
READY_TIMEOUT_S = 60.0


def own_segments(pid: int) -> set[str]:
    """Shared-memory rings created by process `pid` (engine/ipc.py names them kairos_<creator pid>_<hex>)."""
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}{pid}_*")}


def request(request_id: str, max_tokens: int, prompt: list[int] | None = None) -> AddRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return AddRequest(request_id, prompt or [1, 2, 3], sampling, time.time())


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def read_until_finish(stream: RequestStream, timeout: float) -> list[TokenDelta]:
    async def read() -> list[TokenDelta]:
        return [delta async for delta in stream]

    return await asyncio.wait_for(read(), timeout)


# ---- the supervisor around a real engine process (fake core) --------------------------------------------------


def test_backoff_doubles_to_its_cap() -> None:
    policy = RestartPolicy(first_delay_s=1.0, max_delay_s=30.0)
    assert [policy.delay(n) for n in (1, 2, 3, 5, 6, 20)] == [1.0, 2.0, 4.0, 16.0, 30.0, 30.0]


class CrashingClient:
    """A client whose engine has just died, and whose next `num_bad_starts` engines die while starting."""

    def __init__(self, num_bad_starts: int) -> None:
        self.error: str | None = "engine process exited with code 1"
        self.num_bad_starts = num_bad_starts
        self.start_times: list[float] = []
        self.exited = asyncio.Event()
        self.exited.set()

    def restart(self) -> None:
        self.start_times.append(time.monotonic())
        self.exited = asyncio.Event()
        if len(self.start_times) <= self.num_bad_starts:
            self.exited.set()

    async def wait_exited(self) -> None:
        await self.exited.wait()

    async def wait_ready(self, timeout: float) -> Ready:
        if self.exited.is_set():
            raise EngineDeadError("the engine died while starting")
        return Ready("fake", 128, 16, 64, "cpu", "vllm")

    async def shutdown(self, timeout: float = 5.0, reason: str = "engine shut down") -> None:
        self.exited.set()


def test_quick_deaths_back_off_longer_and_a_stable_engine_starts_over() -> None:
    async def main() -> None:
        client = CrashingClient(num_bad_starts=2)
        policy = RestartPolicy(first_delay_s=0.05, max_delay_s=1.0, stable_after_s=0.3)
        supervisor = EngineSupervisor(client, READY_TIMEOUT_S, 5.0, policy)
        died_at = time.monotonic()
        supervise = asyncio.create_task(supervisor.run())
        await until(
            lambda: supervisor.num_restarts == 3 and not supervisor.is_restarting, 5, "third start up"
        )
        gaps = [b - a for a, b in zip([died_at, *client.start_times], client.start_times, strict=False)]
        assert [round(g, 2) >= d for g, d in zip(gaps, (0.05, 0.1, 0.2), strict=True)] == [True] * 3, gaps
        await asyncio.sleep(0.35)  # up longer than stable_after_s: the next death waits first_delay_s again
        died_at = time.monotonic()
        client.exited.set()
        await until(lambda: supervisor.num_restarts == 4, 5, "fourth start")
        assert (
            0.05 <= round(client.start_times[-1] - died_at, 2) < 0.3
        )  # not the 0.4 s of a fourth quick death
        supervise.cancel()

    asyncio.run(main())


def test_a_crash_loop_gives_up_and_stops_the_server() -> None:
    """Every engine dies while starting: after max_quick_failures deaths in a row the supervisor stops restarting,
    stays unavailable and asks the server to exit (cli.py turns that into exit status 1)."""

    async def main() -> None:
        client = CrashingClient(num_bad_starts=100)
        policy = RestartPolicy(first_delay_s=0.01, max_delay_s=0.02, max_quick_failures=3)
        supervisor = EngineSupervisor(client, READY_TIMEOUT_S, 5.0, policy)
        stopped: list[int] = []
        supervisor.on_give_up = lambda: stopped.append(1)
        await asyncio.wait_for(supervisor.run(), 5)  # returns once it gives up
        assert supervisor.gave_up and stopped == [1]
        assert supervisor.num_restarts == 2  # the first death, two restarts that died: three in a row
        assert "keeps failing" in (supervisor.unavailable_reason() or "")

    asyncio.run(main())


def test_counters_carry_across_a_restart_and_gauges_do_not() -> None:
    from engine.protocol import EngineStats
    from server.engine_client import carry_totals

    def stats(tokens: int, swaps: float, usage: float) -> EngineStats:
        return EngineStats(
            time.time(), 1, 0, 0, 10, 64, usage, 1, 5, tokens, 0, 0, 7, 0.01,
            extra={"model_swaps_total": swaps, "kv_reserved_fraction": usage},
        )  # fmt: skip

    now = carry_totals(stats(3, 1.0, 0.1), stats(100, 2.0, 0.9))
    assert (now.num_generation_tokens_total, now.num_steps_total, now.num_prompt_tokens_total) == (
        103,
        14,
        10,
    )
    assert isinstance(now.num_generation_tokens_total, int)
    assert now.extra == {"model_swaps_total": 3.0, "kv_reserved_fraction": 0.1}
    assert (now.kv_usage, now.num_running) == (0.1, 1)


def test_killed_engine_ends_streams_with_errors_then_restarts() -> None:
    async def main() -> None:
        client = EngineClient(FAKE_CONFIG, core_factory=SLOW_FAKE)
        restarts: list[int] = []
        supervisor = EngineSupervisor(
            client, READY_TIMEOUT_S, 5.0, RestartPolicy(first_delay_s=0.2), lambda: restarts.append(1)
        )
        client.start()
        await client.wait_ready(READY_TIMEOUT_S)
        supervise = asyncio.create_task(supervisor.run())
        try:
            streams = [client.add_request(request(f"r{i}", 10**6)) for i in range(3)]
            await until(
                lambda: (s := client.latest_stats) is not None and s.num_running == 3, 10, "3 running"
            )
            await until(lambda: client.latest_stats.num_generation_tokens_total >= 10, 10, "tokens counted")
            counted_before = client.latest_stats.num_generation_tokens_total
            old_pid = client.pid
            os.kill(old_pid, signal.SIGKILL)
            for deltas in await asyncio.gather(*(read_until_finish(s, 10) for s in streams)):
                assert deltas[-1].finish_reason == FinishReason.ERROR
                assert "exited with code -9" in deltas[-1].error
            await until(lambda: supervisor.is_restarting, 5, "restart noticed")
            assert "restarting" in supervisor.unavailable_reason()
            assert supervisor.num_restarts == 0  # still in its 0.2 s back-off
            await until(lambda: not supervisor.is_restarting, 30, "engine restarted")
            assert supervisor.unavailable_reason() is None
            assert client.pid != old_pid and client.is_alive and client.ready is not None
            assert supervisor.num_restarts == 1 and restarts == [1]
            assert supervisor.last_exit == "engine process exited with code -9"
            deltas = await read_until_finish(client.add_request(request("after", 4)), 10)
            assert [t for d in deltas for t in d.token_ids] == [0, 1, 2, 3]
            assert deltas[-1].finish_reason == FinishReason.LENGTH
            # Counters carry on from the dead engine's last report instead of restarting from 0 (engine_client.py).
            await until(
                lambda: (
                    (s := client.latest_stats) is not None
                    and s.num_generation_tokens_total >= counted_before + 4
                ),
                10,
                "counters carried across the restart",
            )
            assert len(own_segments(os.getpid())) == 2  # the new pair of rings; the dead engine's are gone
        finally:
            supervise.cancel()
            await client.shutdown()
        assert own_segments(os.getpid()) == set()

    asyncio.run(main())


def test_drain_timeout_ends_what_still_runs_and_stops_restarts() -> None:
    async def main() -> None:
        client = EngineClient(FAKE_CONFIG, core_factory=SLOW_FAKE)
        supervisor = EngineSupervisor(client, READY_TIMEOUT_S, 0.3, RestartPolicy(first_delay_s=0.01))
        supervisor.bind(asyncio.get_running_loop())
        client.start()
        await client.wait_ready(READY_TIMEOUT_S)
        supervise = asyncio.create_task(supervisor.run())
        short = client.add_request(request("short", 5))
        long = client.add_request(request("long", 10**6))
        supervisor.request_drain()  # as the signal handler calls it
        await until(lambda: supervisor.is_draining, 2, "drain started")
        assert supervisor.unavailable_reason() == "the server is shutting down"
        assert (await read_until_finish(short, 5))[-1].finish_reason == FinishReason.LENGTH
        started = time.monotonic()
        last = (await read_until_finish(long, 5))[-1]
        assert last.finish_reason == FinishReason.ERROR
        assert last.error == "the server is shutting down (drain timeout 0.3 s)"
        assert time.monotonic() - started < 1.0
        await asyncio.wait_for(
            supervise, 5
        )  # the engine's exit ends the supervisor: no restart while draining
        assert supervisor.num_restarts == 0 and not client.is_alive
        await supervisor.close()
        await client.shutdown()
        assert client.exitcode == 0  # a Shutdown, not a kill

    asyncio.run(main())


def test_engine_ignores_sigterm_so_the_server_can_drain_it() -> None:
    """A service manager's SIGTERM reaches the engine too (systemd kills the control group)."""

    async def main() -> None:
        async with EngineClient(FAKE_CONFIG, core_factory=SLOW_FAKE) as client:
            await client.wait_ready(READY_TIMEOUT_S)
            stream = client.add_request(request("r", 200))  # ~1 s of 5 ms steps
            os.kill(client.pid, signal.SIGTERM)
            deltas = await read_until_finish(stream, 10)
            assert deltas[-1].finish_reason == FinishReason.LENGTH and len(deltas) == 200
            assert client.is_alive
        assert client.exitcode == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("flag", "message"),
    [("is_restarting", "the engine is restarting (engine process exited with code -9)"),
     ("is_draining", "the server is shutting down")],
)  # fmt: skip
def test_app_answers_503_with_retry_after_while_restarting_or_draining(flag: str, message: str) -> None:
    async def main() -> list[httpx.Response]:
        app = build_app(ServerConfig(served_model_names=("fake",)), FakeClient(), tokenizer=tiny_tokenizer())
        app.state.supervisor.last_exit = "engine process exited with code -9"
        setattr(app.state.supervisor, flag, True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"prompt": "hi", "max_tokens": 4}
            return [await http.get("/health"), await http.post("/v1/completions", json=body)]

    for response in asyncio.run(main()):
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == {
            "message": message,
            "type": "unavailable_error",
            "param": None,
            "code": 503,
        }


# ---- the real scheduler, invariants checked every step, under random aborts ------------------------------------

TINY_CONFIG = EngineConfig(
    model=ModelConfig(model="tiny-random"),
    # 24 blocks of 16 tokens: 40 requests of up to 140 tokens do not fit, so some are preempted and re-admitted.
    device=DeviceConfig(device="cpu", kv_cache_memory=24 * 16 * 512, num_threads=1),
    stats_interval_s=0.05,
)


def build_checked_core(config: EngineConfig) -> EngineCore:
    """The real core; `Scheduler.check_invariants` after every step (a violation is an EngineError)."""
    return build_engine_core(config, check_invariants=True)


def test_random_aborts_leave_every_block_free_with_invariants_checked() -> None:
    rng = random.Random(11)

    async def consume(client: EngineClient, i: int) -> str:
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(4, 60))]
        stream = client.add_request(request(f"r{i}", rng.randrange(1, 80), prompt))
        stop_after = rng.choice([0, 0, 1, 2, 5, 10, 10**6])  # deltas read before the "client" leaves
        num_read = 0
        async for delta in stream:
            if delta.finish_reason is not None:
                return delta.finish_reason.name
            num_read += 1
            if num_read >= stop_after:
                break
        client.abort(stream.request_id)  # what generation.py's `finally` does on a disconnect
        return "ABORT"

    async def main() -> None:
        async with EngineClient(TINY_CONFIG, core_factory=f"{__name__}:build_checked_core") as client:
            await client.wait_ready(120)
            outcomes = await asyncio.wait_for(asyncio.gather(*(consume(client, i) for i in range(40))), 60)
            assert {"ABORT", "LENGTH"} <= set(outcomes) <= {"ABORT", "LENGTH"}
            after = time.time()
            await until(
                lambda: (s := client.latest_stats).timestamp > after and s.num_running == s.num_waiting == 0,
                20,
                "engine idle",
            )
            stats = client.latest_stats
            assert stats.num_free_blocks == stats.num_total_blocks and stats.kv_usage == 0.0
            assert stats.num_preemptions_total > 0  # the pool was contended, not just drained in order
            assert client.is_alive, client.error  # a failed invariant would have killed the engine

    asyncio.run(main())


# ---- a real server: kill -9 of the engine, random client disconnects under load, SIGTERM ----------------------------

DRAIN_TIMEOUT_S = 6.0
MAX_QUEUED = 40  # every stream of the load test at once: a leaked admission ticket would turn one into a 429


def completion_body(
    max_tokens: int, stream: bool = True, prompt: str = "Tell me a story about a cat."
) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}


def sse_events(lines: list[str]) -> list[dict | str]:
    return [orjson.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines if x.startswith("data: ")]


def scrape(server: LiveServer) -> dict[str, float]:
    """/metrics as {name{labels}: value}, label values only, for the series these tests read."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(v for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def engine_pid(server: LiveServer) -> int:
    """The newest engine process, from the server's log line (a restart logs a new one)."""
    return int(re.findall(r"engine process started \(pid (\d+)\)", server.log_path.read_text())[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    extra = ("--max-queued-requests", str(MAX_QUEUED), "--drain-timeout", str(DRAIN_TIMEOUT_S))
    with live_server(tmp_path_factory.mktemp("faults"), *extra) as srv:
        yield srv


async def open_stream(http: httpx.AsyncClient, body: dict, lines: list[str], opened: asyncio.Event) -> int:
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if line.startswith("data: {"):
                opened.set()
        return response.status_code


@pytest.mark.e2e
def test_engine_killed_mid_stream_errors_every_stream_and_restarts(server: LiveServer) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            lines: list[list[str]] = [[], [], []]
            opened = [asyncio.Event() for _ in lines]
            tasks = [
                asyncio.create_task(open_stream(http, completion_body(400), ls, ev))
                for ls, ev in zip(lines, opened, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in opened)), 30)
            counted_before = scrape(server)["vllm:generation_tokens_total{}"]
            os.kill(engine_pid(server), signal.SIGKILL)
            assert await asyncio.wait_for(asyncio.gather(*tasks), 10) == [200, 200, 200]  # ended, no hang
            for stream_lines in lines:
                events = sse_events(stream_lines)
                assert events[-1] == "[DONE]"
                error = events[-2]["error"]
                assert error["code"] == 503 and "exited with code -9" in error["message"], error
                assert all("error" not in e for e in events[:-2])

            health = await http.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"]
            assert "the engine is restarting" in health.json()["error"]["message"]
            refused = await http.post("/v1/completions", json=completion_body(4, stream=False))
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == 503

            deadline = time.monotonic() + 60
            while (await http.get("/health")).status_code != 200:
                assert time.monotonic() < deadline, f"no restart within 60 s:\n{server.log_tail()}"
                await asyncio.sleep(0.2)
            answer = await http.post("/v1/completions", json=completion_body(4, stream=False))
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
            status = (await http.get("/status")).json()
            assert status["engine_restarts"] == 1 and "code -9" in status["last_engine_exit"]
            return counted_before

    counted_before = asyncio.run(main())
    metrics = scrape(server)
    assert metrics["kairos:engine_restarts_total{}"] == 1.0
    # The dead engine's counts carry on (engine_client.py carry_totals): a counter never goes down mid-process.
    assert metrics["vllm:generation_tokens_total{}"] >= counted_before + 4


@pytest.mark.e2e
def test_random_client_disconnects_under_load_leak_no_kv_blocks(server: LiveServer) -> None:
    rng = random.Random(7)

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = completion_body(
            rng.randrange(8, 40), prompt=f"Request {i}: " + "write a poem. " * rng.randrange(1, 8)
        )
        how, after = rng.choice(["cancel", "close", "close", "finish"]), rng.randrange(0, 12)
        if how == "cancel":  # the client gives up at a random moment: before the headers, or mid-stream
            task = asyncio.create_task(open_stream(http, body, [], asyncio.Event()))
            await asyncio.sleep(after * 0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return how
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()  # 429: an admission ticket leaked
            num_chunks = 0
            async for line in response.aiter_lines():
                num_chunks += line.startswith("data: {")
                if how == "close" and num_chunks >= after:
                    return how  # leaving the block closes the connection mid-stream
        return how

    async def main() -> None:
        limits = httpx.Limits(max_connections=MAX_QUEUED + 5)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
            outcomes = await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(MAX_QUEUED))), 90)
            assert set(outcomes) == {"cancel", "close", "finish"}
            after = time.time()
            deadline = time.monotonic() + 30
            while True:
                stats = (await http.get("/v1/engine/stats")).json()
                is_idle = stats["num_running"] == stats["num_waiting"] == 0
                if (
                    is_idle
                    and stats["timestamp"] > after
                    and stats["num_free_blocks"] == stats["num_total_blocks"]
                ):
                    break
                assert time.monotonic() < deadline, f"KV not all free after 30 s: {stats}"
                await asyncio.sleep(0.2)

    asyncio.run(main())
    metrics = scrape(server)
    assert metrics["kairos:kv_blocks{used}"] == 0.0
    assert metrics["vllm:kv_cache_usage_perc{}"] == 0.0
    assert metrics["vllm:num_requests_running{}"] == metrics["vllm:num_requests_waiting{}"] == 0.0
    assert metrics["vllm:request_success_total{abort}"] > 0  # the disconnects reached the engine as aborts


# ---- a real server: SIGTERM drains --------------------------------------------------------------------------


@pytest.mark.e2e
def test_sigterm_drains_in_flight_streams_then_exits_zero(server: LiveServer) -> None:
    """Last in the module: it ends the module's server."""
    pid = server.process.pid
    child = engine_pid(server)

    async def main() -> float:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            lines: list[list[str]] = [[] for _ in range(4)]
            opened = [asyncio.Event() for _ in lines]
            # Three short streams finish inside the drain timeout; the long one cannot (500 tokens: ~30 s here, and
            # over 10 s at 20 ms a token on 2 threads).
            bodies = [completion_body(12)] * 3 + [completion_body(500)]
            tasks = [
                asyncio.create_task(open_stream(http, body, ls, ev))
                for body, ls, ev in zip(bodies, lines, opened, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in opened)), 30)
            server.process.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            await asyncio.sleep(0.5)
            try:  # the listener is closed (refused), or the app answers 503 while it drains
                async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as fresh:
                    late = await fresh.post("/v1/completions", json=completion_body(4, stream=False))
                assert late.status_code == 503 and late.headers["retry-after"], late.text
            except httpx.TransportError:
                pass
            assert await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT_S + 10) == [200] * 4
            for stream_lines in lines[:3]:
                events = sse_events(stream_lines)
                assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            events = sse_events(lines[3])
            assert events[-1] == "[DONE]"
            assert "drain timeout" in events[-2]["error"]["message"]
            return sent_at

    sent_at = asyncio.run(main())
    assert server.process.wait(timeout=15) == 0, server.log_tail()
    assert time.monotonic() - sent_at < DRAIN_TIMEOUT_S + 10
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the engine process is gone too (reaped by the server)
    assert own_segments(pid) == set()
    log = server.log_path.read_text()
    assert "draining" in log and "Traceback" not in log


@pytest.mark.e2e
def test_a_crash_loop_ends_the_server_with_status_1(tmp_path: Path) -> None:
    """`--max-engine-restarts 2`: an engine killed, restarted, killed again within a minute of its start — the
    server stops restarting and exits 1 (for systemd / Kubernetes), its engine and rings gone."""
    with live_server(tmp_path, "--max-engine-restarts", "2") as srv:
        first = engine_pid(srv)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while engine_pid(srv) == first or httpx.get(f"{srv.base_url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"no restart within 60 s:\n{srv.log_tail()}"
            time.sleep(0.2)
        os.kill(engine_pid(srv), signal.SIGKILL)
        assert srv.process.wait(timeout=30) == 1, srv.log_tail()
        log = srv.log_path.read_text()
        assert "not restarting it again" in log and "Traceback" not in log
        assert own_segments(srv.process.pid) == set()


@pytest.mark.e2e
def test_an_engine_that_never_starts_ends_the_server_with_status_1(tmp_path: Path) -> None:
    """A KV budget too small for one block: the engine fails before its Ready; the server logs why and exits 1
    instead of answering 503 forever."""
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(free_port()), "--model", "default"]
    cmd += ["--max-model-len", "512", "--kv-cache-memory", "1KiB", "--num-threads", "1"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert process.wait(timeout=120) == 1, log_path.read_text()
    finally:
        process.kill()
    log = log_path.read_text()
    assert "startup failed" in log and "the engine did not start" in log
    assert own_segments(process.pid) == set()
