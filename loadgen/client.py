"""Replays a plan against an OpenAI-compatible server: asyncio + httpx, streamed SSE, per-request timing.

Timing follows `vllm bench serve` (reference/serving-anchors.md §2.3): the clock starts when the request is
sent (after waiting for a --max-concurrency slot); TTFT at the first `data:` chunk with non-empty `choices`; ITL
between successive such chunks; E2E at the last chunk. Output tokens come from the usage chunk, else one per
chunk. A 429 is counted (`on_429="count"`: the request fails) or retried after its Retry-After
(`on_429="retry"`); a retried request's times still run from its first attempt, as the user waits through them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson

from loadgen.plan import PlannedRequest

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ON_429 = ("count", "retry")
MAX_429_RETRIES = 50
DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"  # a key of ENDPOINTS
    max_concurrency: int = 0  # 0 = unlimited
    on_429: str = "count"
    api_key: str | None = None
    request_timeout_s: float = 600.0  # longest wait for the next byte of a response
    show_progress: bool | None = None  # None: when stderr is a terminal


@dataclass
class RequestResult:
    """What happened to one planned request. Times are s since the run started (`*_s`) or durations (s)."""

    index: int
    tenant: str
    app_id: str
    slo_class: str
    prompt_tokens: int  # planned; replaced by the server's usage count
    max_tokens: int
    status: str = "pending"  # "ok" | "429" | "http_<code>" | "error"
    error: str = ""
    scheduled_s: float = 0.0  # when the plan wanted it sent
    start_s: float = 0.0  # when it was sent (first attempt)
    end_s: float = 0.0  # last chunk, or the failure
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_seen: bool = False
    num_429: int = 0

    @classmethod
    def of(cls, r: PlannedRequest) -> RequestResult:
        return cls(r.index, r.tenant, r.app_id, r.slo_class, r.num_prompt_tokens, r.max_tokens)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def demanded_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def tpot(self) -> float:
        """s per output token after the first (vllm: (e2e − ttft) / (output − 1)); 0 for a one-token answer."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def chunk_times(self) -> list[float]:
        """Arrival time (s since the run started) of every chunk with choices."""
        if not self.ttft:
            return []
        times = [self.start_s + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times

    def to_dict(self, detailed: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "itl"}
        if detailed:
            d["itl"] = self.itl
        return d


def request_body(r: PlannedRequest, config: ClientConfig) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if config.endpoint == "chat":
        if not isinstance(r.prompt, str):
            raise ValueError("the chat endpoint needs text prompts (plan with prompt format 'text')")
        body["messages"] = [{"role": "user", "content": r.prompt}]
        body["max_completion_tokens"] = r.max_tokens
    else:
        body["prompt"] = r.prompt if isinstance(r.prompt, str) else list(r.prompt)
        body["max_tokens"] = r.max_tokens
    if r.ignore_eos:
        body["ignore_eos"] = True
    return body


def request_headers(r: PlannedRequest) -> dict[str, str]:
    headers = {"X-Tenant-Id": r.tenant, "X-SLO-Class": r.slo_class, "X-Request-Id": f"loadgen-{r.index}"}
    if r.app_id:
        headers["X-App-Id"] = r.app_id
    return headers


def retry_after_s(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", DEFAULT_RETRY_AFTER_S)))
    except ValueError:  # an HTTP date: not worth parsing for a local benchmark
        return DEFAULT_RETRY_AFTER_S


async def send(
    client: httpx.AsyncClient,
    url: str,
    r: PlannedRequest,
    result: RequestResult,
    config: ClientConfig,
    t0: float,
) -> None:
    """Sends one request (with 429 retries) and fills `result`."""
    body, headers = request_body(r, config), request_headers(r)
    sent = time.perf_counter()
    result.start_s = sent - t0
    try:
        for _ in range(MAX_429_RETRIES + 1):
            async with client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code == 200:
                    await read_stream(resp, result, sent)
                    break
                detail = (await resp.aread())[:300].decode(errors="replace")
                if resp.status_code != 429:
                    result.status, result.error = f"http_{resp.status_code}", detail
                    break
                result.num_429 += 1
                result.status, result.error = "429", detail
                wait = retry_after_s(resp)
            if config.on_429 == "count":
                break
            await asyncio.sleep(wait)
    except (httpx.HTTPError, orjson.JSONDecodeError, UnicodeDecodeError) as e:
        result.status, result.error = "error", f"{type(e).__name__}: {e}"
    result.end_s = time.perf_counter() - t0


async def read_stream(resp: httpx.Response, result: RequestResult, sent: float) -> None:
    num_chunks = 0
    last = sent
    async for line in resp.aiter_lines():
        if not line or line.startswith(":"):
            continue  # event separators and SSE comments (keep-alives)
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        now = time.perf_counter()
        chunk = orjson.loads(data)
        if err := chunk.get("error"):
            result.status, result.error = "error", f"stream error: {err}"
            return
        if chunk.get("choices"):
            if num_chunks == 0:
                result.ttft = now - sent
            else:
                result.itl.append(now - last)
            num_chunks += 1
            last = now
        if usage := chunk.get("usage"):
            result.output_tokens = usage.get("completion_tokens") or 0
            result.prompt_tokens = usage.get("prompt_tokens") or result.prompt_tokens
            result.usage_seen = True
    if num_chunks == 0:
        result.status, result.error = "error", "no chunk with choices"
        return
    result.e2e = last - sent
    if not result.usage_seen:
        result.output_tokens = num_chunks
    result.status, result.error = "ok", ""


class Progress:
    """`[#####.....] 12/50 ok 11 failed 1 3.2s` on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.num_ok, self.num_failed = total, 0, 0
        self.started = self.drawn = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        self.num_ok += result.ok
        self.num_failed += not result.ok
        now = time.perf_counter()
        if self.enabled and (now - self.drawn >= 0.1 or self.num_ok + self.num_failed == self.total):
            self.drawn = now
            done = self.num_ok + self.num_failed
            bar = "#" * (30 * done // max(self.total, 1))
            self.stream.write(
                f"\r[{bar:.<30}] {done}/{self.total} ok {self.num_ok} failed {self.num_failed} "
                f"{now - self.started:.1f}s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def run_plan(
    requests: Sequence[PlannedRequest], config: ClientConfig
) -> tuple[list[RequestResult], float]:
    """Replays `requests` (indexed 0..n−1 in order, as in a Workload); returns their results and the run's
    duration in s."""
    if any(r.index != i for i, r in enumerate(requests)):
        raise ValueError("requests must be indexed 0..n-1 in order")
    url = config.base_url.rstrip("/") + ENDPOINTS[config.endpoint]
    results = [RequestResult.of(r) for r in requests]
    finished = [asyncio.Event() for _ in requests]
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency > 0 else None
    progress = Progress(len(requests), config.show_progress)
    # httpx allows 100 connections by default, which would queue part of a burst inside the client.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        t0 = time.perf_counter()

        async def replay_one(r: PlannedRequest, result: RequestResult) -> None:
            try:
                due = r.offset_s
                if r.after is not None:
                    await finished[r.after].wait()
                    due += results[r.after].end_s
                result.scheduled_s = due
                await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
                if slots is None:
                    await send(client, url, r, result, config, t0)
                else:
                    async with slots:
                        await send(client, url, r, result, config, t0)
            finally:
                finished[r.index].set()
                progress.update(result)

        await asyncio.gather(*(replay_one(r, res) for r, res in zip(requests, results, strict=True)))
        duration = time.perf_counter() - t0
    progress.close()
    return results, duration


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first id listed by GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30.0, headers=headers) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return models[0]["id"]
