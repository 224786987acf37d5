"""`kairos bench soak`: a long replay above capacity with random client disconnects; is anything lost or leaked?

    kairos bench soak --duration-s 1800 --load 1.5      # the committed run: docs/results/reliability.md

One command, three phases against one real server (`python -m server serve`, started here in its own process
group, admission limit `--max-queued-requests`):

1. **Capacity probe**: a closed loop holding `--max-queued-requests` requests in flight for `--probe-s`; capacity
   C = completed requests / s. That is the most the server can finish with the admission limit's worth of
   requests inside it, which is all it will ever hold.
2. **Soak**: Poisson arrivals at `--load` × C for `--duration-s`. A `--disconnect-frac` share of requests is
   closed by the client at a random point: right after the response headers, or after a uniform share of its
   planned output. A 429 is counted and not retried (retries would only move the overload around).
3. **Drain and audit**: wait for the last response, then for the engine to go idle, and read `/status` and
   `/metrics`: no KV block still in use (prefix-cached free blocks are fine), nothing running or waiting, every
   client request ended (`stuck` counts those still open at the client timeout), no 5xx and no stream error.

Every `--sample-s` the resident memory of the server's process group (server + engine) and `/status` (KV blocks
used, running, waiting) are recorded. The report splits the soak into `--window-s` windows: requests sent, ok,
429, disconnected, failed, p50 / p99 TTFT and E2E of the completed ones, RSS. Pass criteria, written with the
numbers: RSS growth from the end of the first window to the end ≤ `--rss-growth-mib`, last window's p99 E2E ≤
`--p99-ratio` × the first's, and the audit above.

loadgen imports nothing of the engine: the server is a command, everything is read over HTTP and /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from loadgen.datasets import DEFAULT_DATA_DIR, WorkloadConfig
from loadgen.harness import serving
from loadgen.plan import PlannedRequest
from loadgen.throughput_experiment import REPO, ServerSpec, group_rss_kib, loadavg, machine_info
from loadgen.workloads import build_workload

RESULTS_MD = REPO / "docs" / "results" / "reliability.md"
RESULTS_JSON = REPO / "docs" / "results" / "reliability" / "soak.json"


@dataclass(frozen=True)
class SoakSetup:
    duration_s: float = 1800.0
    load: float = 1.5  # arrival rate as a multiple of the probed capacity
    probe_s: float = 120.0
    disconnect_frac: float = 0.1
    max_queued_requests: int = 32
    max_tokens: int = 128  # cap on ShareGPT's recorded response lengths (ignore_eos: exactly that many)
    max_model_len: int = 1024
    window_s: float = 300.0
    sample_s: float = 5.0
    request_timeout_s: float = 300.0  # a response silent this long counts as stuck
    idle_timeout_s: float = 120.0  # the engine must be idle this soon after the last response
    rss_growth_mib: float = 200.0
    p99_ratio: float = 2.0
    model: str = "default"
    extra: str = ""  # more `kairos serve` flags
    port: int = 8431
    seed: int = 0
    data_dir: Path = DEFAULT_DATA_DIR

    def server_spec(self) -> ServerSpec:
        cmd = [
            str(REPO / ".venv" / "bin" / "python"),
            *("-m", "server", "serve", "--port", str(self.port), "--model", self.model),
            *("--max-model-len", str(self.max_model_len)),
            *("--max-queued-requests", str(self.max_queued_requests)),
            *shlex.split(self.extra),
        ]
        return ServerSpec("kairos-soak", cmd, self.port, "default", "fp32")


@dataclass
class Outcome:
    """One soak request. status: ok | 429 | disconnected (by us, on purpose) | http_<code> | error | stuck."""

    index: int
    sent_s: float
    status: str = "pending"
    ttft: float | None = None
    e2e: float | None = None
    chunks: int = 0
    error: str = ""


@dataclass
class Sample:
    t_s: float
    rss_mib: float  # the server's whole process group
    server_rss_mib: float = 0.0  # the server process alone (the rest is the engine)
    kv_used: int | None = None
    kv_cached: int | None = None
    running: int | None = None
    waiting: int | None = None


@dataclass
class Run:
    setup: SoakSetup
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


def plan(setup: SoakSetup, num: int) -> list[PlannedRequest]:
    """ShareGPT first turns, recorded lengths capped at max_tokens (ignore_eos), repeated if the run needs more."""
    config = WorkloadConfig(
        data_dir=setup.data_dir,
        num_requests=min(num, 2000),
        seed=setup.seed,
        max_model_len=setup.max_model_len,
        prompt_format="text",
        max_tokens=setup.max_tokens,
        use_recorded_length=True,
    )
    base = build_workload("sharegpt", config).requests
    return [base[i % len(base)] for i in range(num)]


def body(r: PlannedRequest) -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": r.prompt}],
        "max_completion_tokens": r.max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(
    client: httpx.AsyncClient, url: str, r: PlannedRequest, out: Outcome, cut_after: int | None, t0: float
) -> None:
    """Send one streamed request; cut_after: close after that many content chunks (0: after the headers)."""
    sent = time.perf_counter()
    out.sent_s = sent - t0
    try:
        async with client.stream("POST", url, json=body(r)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                out.status = "429" if resp.status_code == 429 else f"http_{resp.status_code}"
                out.error = resp.text[:200]
                return
            if cut_after == 0:
                out.status = "disconnected"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = orjson.loads(data)
                if err := chunk.get("error"):
                    out.status, out.error = "error", f"stream error: {err}"
                    return
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if out.chunks == 0:
                        out.ttft = now - sent
                    out.chunks += 1
                    out.e2e = now - sent
                    if cut_after is not None and out.chunks >= cut_after:
                        out.status = "disconnected"
                        return  # leaving the block closes the connection mid-stream
            out.status = "ok" if out.chunks else "error"
    except httpx.ReadTimeout:
        out.status, out.error = "stuck", f"no byte for {client.timeout.read} s"
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        out.status, out.error = "error", f"{type(exc).__name__}: {exc}"


def new_client(setup: SoakSetup) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=setup.request_timeout_s, write=30.0, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


def base_url(setup: SoakSetup) -> str:
    return f"http://127.0.0.1:{setup.port}"


async def probe(setup: SoakSetup, requests: list[PlannedRequest]) -> dict[str, Any]:
    """Closed loop with max_queued_requests in flight for probe_s; capacity in completed requests / s over the
    last two thirds of the probe (the first third fills the pipeline: nothing completes before one E2E)."""
    url = base_url(setup) + "/v1/chat/completions"
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    deadline = t0 + setup.probe_s
    it = itertools.cycle(requests)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            r = next(it)
            out = Outcome(r.index, 0.0)
            await one(client, url, r, out, None, t0)
            if t0 + setup.probe_s / 3 <= time.perf_counter() <= deadline:  # steady state only
                outcomes.append(out)

    async with new_client(setup) as client:
        await asyncio.gather(*(worker(client) for _ in range(setup.max_queued_requests)))
    elapsed = setup.probe_s * 2 / 3
    ok = [o for o in outcomes if o.status == "ok"]
    return {
        "duration_s": setup.probe_s,
        "counted_s": elapsed,
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "capacity_rps": len(ok) / elapsed,
        "mean_e2e_s": float(np.mean([o.e2e for o in ok])) if ok else None,
    }


async def sampler(setup: SoakSetup, pgid: int, t0: float, samples: list[Sample], done: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=10.0) as client:
        while not done.is_set():
            s = Sample(time.perf_counter() - t0, group_rss_kib(pgid) / 1024, process_rss_kib(pgid) / 1024)
            try:
                status = (await client.get(base_url(setup) + "/status")).json()
                if status.get("kv") and status.get("engine"):
                    s.kv_used, s.kv_cached = status["kv"]["used"], status["kv"]["cached"]
                    s.running, s.waiting = status["engine"]["num_running"], status["engine"]["num_waiting"]
            except (httpx.HTTPError, ValueError):
                pass
            samples.append(s)
            try:
                await asyncio.wait_for(done.wait(), setup.sample_s)
            except asyncio.TimeoutError:
                pass


def process_rss_kib(pid: int) -> int:
    """Resident memory of one process (KiB); 0 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, IndexError, ValueError):
        return 0


async def soak(setup: SoakSetup, rate: float, requests: list[PlannedRequest], pgid: int, run: Run) -> float:
    """Poisson arrivals at `rate` for duration_s; returns when every response has ended."""
    rng = np.random.default_rng(setup.seed + 1)
    url = base_url(setup) + "/v1/chat/completions"
    done = asyncio.Event()
    t0 = time.perf_counter()
    sampling = asyncio.create_task(sampler(setup, pgid, t0, run.samples, done))
    tasks: list[asyncio.Task] = []
    async with new_client(setup) as client:
        t, i = 0.0, 0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= setup.duration_s:
                break
            r = requests[i % len(requests)]
            cut = None
            if rng.random() < setup.disconnect_frac:
                cut = int(rng.integers(0, r.max_tokens))  # 0: close right after the headers
            await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
            out = Outcome(i, t)
            run.outcomes.append(out)
            tasks.append(asyncio.create_task(one(client, url, r, out, cut, t0)))
            i += 1
        await asyncio.gather(*tasks)
    end = time.perf_counter() - t0
    # keep sampling through the drain: the audit reads the last samples
    await audit_wait_idle(setup)
    done.set()
    await sampling
    return end


async def audit_wait_idle(setup: SoakSetup) -> None:
    deadline = time.monotonic() + setup.idle_timeout_s
    async with httpx.AsyncClient(timeout=10.0) as client:
        while time.monotonic() < deadline:
            try:
                status = (await client.get(base_url(setup) + "/status")).json()
                eng, kv = status.get("engine") or {}, status.get("kv") or {}
                if not eng.get("num_running") and not eng.get("num_waiting") and kv.get("used") == 0:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(1.0)


def final_audit(setup: SoakSetup) -> dict[str, Any]:
    status = httpx.get(base_url(setup) + "/status", timeout=10.0).json()
    metrics = httpx.get(base_url(setup) + "/metrics", timeout=10.0).text
    rejected = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kairos:requests_rejected_total")
    )
    eng = status["engine"]
    return {
        "kv_used_blocks": status["kv"]["used"],
        "kv_cached_blocks": status["kv"]["cached"],
        "kv_total_blocks": status["kv"]["total"],
        "num_running": eng["num_running"],
        "num_waiting": eng["num_waiting"],
        "num_preemptions_total": eng["num_preemptions_total"],
        "server_rejected_total": rejected,
        "health": httpx.get(base_url(setup) + "/health", timeout=10.0).status_code,
    }


def pct(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


def windows(setup: SoakSetup, run: Run) -> list[dict[str, Any]]:
    rows = []
    for k in range(math.ceil(setup.duration_s / setup.window_s)):
        lo, hi = k * setup.window_s, min((k + 1) * setup.window_s, setup.duration_s)
        mine = [o for o in run.outcomes if lo <= o.sent_s < hi]
        ok = [o for o in mine if o.status == "ok"]
        inside = [s for s in run.samples if lo <= s.t_s < hi]
        count = {s: sum(o.status == s for o in mine) for s in ("ok", "429", "disconnected")}
        rows.append(
            {
                "window": f"{lo / 60:.0f}–{hi / 60:.0f} min"
                if setup.window_s >= 60
                else f"{lo:.0f}–{hi:.0f} s",
                "sent": len(mine),
                **count,
                "failed": len(mine) - sum(count.values()),
                "ttft_p50_s": pct([o.ttft for o in ok], 50),
                "ttft_p99_s": pct([o.ttft for o in ok], 99),
                "e2e_p50_s": pct([o.e2e for o in ok], 50),
                "e2e_p99_s": pct([o.e2e for o in ok], 99),
                "rss_end_mib": inside[-1].rss_mib if inside else None,
                "server_rss_end_mib": inside[-1].server_rss_mib if inside else None,
                "kv_used_max": max((s.kv_used for s in inside if s.kv_used is not None), default=None),
                "in_engine_max": max(
                    ((s.running or 0) + (s.waiting or 0) for s in inside if s.running is not None),
                    default=None,
                ),
            }
        )
    return rows


def checks(setup: SoakSetup, rows: list[dict[str, Any]], run: Run, audit: dict[str, Any]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for o in run.outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    bad = {s: n for s, n in statuses.items() if s not in ("ok", "429", "disconnected")}
    rss = [r["rss_end_mib"] for r in rows if r["rss_end_mib"] is not None]
    growth = rss[-1] - rss[0] if len(rss) >= 2 else None
    p99 = [r["e2e_p99_s"] for r in rows if r["e2e_p99_s"] is not None]
    ratio = p99[-1] / p99[0] if len(p99) >= 2 and p99[0] else None
    result = {
        "no_leaked_blocks": audit["kv_used_blocks"] == 0,
        "engine_idle": audit["num_running"] == 0 and audit["num_waiting"] == 0,
        "no_stuck_or_failed_request": not bad,
        "healthy_after": audit["health"] == 200,
        "rss_growth_mib": growth,
        "rss_growth_ok": growth is not None and growth <= setup.rss_growth_mib,
        "p99_e2e_last_over_first": ratio,
        "p99_stable": ratio is not None and ratio <= setup.p99_ratio,
    }
    result["pass"] = all(v for k, v in result.items() if isinstance(v, bool))
    result["statuses"] = statuses
    result["failures"] = [asdict(o) for o in run.outcomes if o.status in bad][:20]
    return result


def run_soak(setup: SoakSetup, workdir: Path) -> dict[str, Any]:
    started = datetime.now(timezone.utc)
    load_before = loadavg()
    with serving(setup.server_spec(), workdir / "server.log", timeout_s=600.0) as proc:
        probe_requests = plan(setup, 5000)
        capacity = asyncio.run(probe(setup, probe_requests))
        if capacity["completed"] == 0:
            raise RuntimeError("the capacity probe completed no request; see the server log")
        rate = setup.load * capacity["capacity_rps"]
        num = int(rate * setup.duration_s * 1.3) + 10
        requests = plan(setup, num)[::-1]  # reversed: the soak does not start with the probe's prompts
        run = Run(setup)
        soak_s = asyncio.run(soak(setup, rate, requests, proc.pid, run))
        audit = final_audit(setup)
    rows = windows(setup, run)
    return {
        "command": "",  # set by main
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()},
        "probe": capacity,
        "rate_rps": rate,
        "soak_wall_s": soak_s,
        "windows": rows,
        "audit": audit,
        "checks": checks(setup, rows, run, audit),
        "samples": [asdict(s) for s in run.samples],
    }


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    s, c, a, p = result["setup"], result["checks"], result["audit"], result["probe"]
    lines = [
        "## Soak",
        "",
        f"Command: `{result['command'].strip()}` · {result['date']} · "
        f"{result['machine']['cpu_model']}, {result['machine']['num_cpus']} cores, commit "
        f"{result['machine']['repo_commit']} · load average before/after "
        f"{result['loadavg_before'][0]:.1f} / {result['loadavg_after'][0]:.1f}",
        "",
        f"Server: `kairos serve --model {s['model']} --max-model-len {s['max_model_len']} --max-queued-requests "
        f"{s['max_queued_requests']} {s['extra']}`. Workload: ShareGPT first turns, recorded response lengths "
        f"capped at {s['max_tokens']} tokens (ignore_eos), streamed chat.",
        "",
        f"Capacity probe ({p['duration_s']:.0f} s closed loop, {s['max_queued_requests']} in flight): "
        f"{p['completed']} completed in its last {p['counted_s']:.0f} s → **{p['capacity_rps']:.2f} req/s**. Soak: Poisson at {s['load']}× = "
        f"**{result['rate_rps']:.2f} req/s** for {s['duration_s'] / 60:.0f} min, {s['disconnect_frac']:.0%} of "
        f"requests closed by the client at a random point; 429s counted, not retried.",
        "",
        "| window | sent | ok | 429 | disconnected | failed | TTFT p50 / p99 (s) | E2E p50 / p99 (s) | RSS end, "
        "all / server (MiB) | KV blocks used, max | in engine, max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["windows"]:
        lines.append(
            f"| {r['window']} | {r['sent']} | {r['ok']} | {r['429']} | {r['disconnected']} | {r['failed']} | "
            f"{_f(r['ttft_p50_s'])} / {_f(r['ttft_p99_s'])} | {_f(r['e2e_p50_s'])} / {_f(r['e2e_p99_s'])} | "
            f"{_f(r['rss_end_mib'], 0)} / {_f(r.get('server_rss_end_mib'), 0)} | {r['kv_used_max']} | {r['in_engine_max']} |"
        )
    mark = {True: "yes", False: "**NO**"}
    lines += [
        "",
        f"Audit after the drain: KV blocks in use {a['kv_used_blocks']} of {a['kv_total_blocks']} "
        f"({a['kv_cached_blocks']} free but prefix-cached), running {a['num_running']}, waiting "
        f"{a['num_waiting']}, /health {a['health']}, server-side 429s {a['server_rejected_total']:.0f}, "
        f"preemptions {a['num_preemptions_total']}.",
        "",
        f"- no leaked KV block: {mark[c['no_leaked_blocks']]}; engine idle: {mark[c['engine_idle']]}; "
        f"healthy after: {mark[c['healthy_after']]}",
        f"- every request ended as ok / 429 / our own disconnect: {mark[c['no_stuck_or_failed_request']]} "
        f"(statuses {c['statuses']})",
        f"- RSS growth, end of window 1 → end: {_f(c['rss_growth_mib'], 0)} MiB (bound {s['rss_growth_mib']:.0f}): "
        f"{mark[c['rss_growth_ok']]}",
        f"- p99 E2E, last window / first: {_f(c['p99_e2e_last_over_first'])} (bound {s['p99_ratio']}): "
        f"{mark[c['p99_stable']]}",
        f"- **{'PASS' if c['pass'] else 'FAIL'}**",
        "",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def write_markdown(result: dict[str, Any], md: Path) -> None:
    """Replace the soak section between the markers (the rest of the page is written by hand)."""
    section = f"{BEGIN}\n{markdown(result)}{END}"
    text = md.read_text() if md.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(head + section + tail)


def parse_args(argv: list[str]) -> tuple[SoakSetup, argparse.Namespace]:
    d = SoakSetup()
    p = argparse.ArgumentParser(prog="kairos bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=d.duration_s)
    p.add_argument("--load", type=float, default=d.load, help="arrival rate / probed capacity")
    p.add_argument("--probe-s", type=float, default=d.probe_s)
    p.add_argument("--disconnect-frac", type=float, default=d.disconnect_frac)
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--window-s", type=float, default=d.window_s)
    p.add_argument("--sample-s", type=float, default=d.sample_s)
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    p.add_argument("--rss-growth-mib", type=float, default=d.rss_growth_mib)
    p.add_argument("--p99-ratio", type=float, default=d.p99_ratio)
    p.add_argument("--model", default=d.model)
    p.add_argument("--extra", default=d.extra, help="more `kairos serve` flags, one string")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", type=Path, default=d.data_dir)
    p.add_argument("--json", type=Path, default=RESULTS_JSON)
    p.add_argument("--md", type=Path, default=RESULTS_MD, help="page whose soak section is rewritten")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kairos-soak"))
    a = p.parse_args(argv)
    setup = SoakSetup(
        duration_s=a.duration_s,
        load=a.load,
        probe_s=a.probe_s,
        disconnect_frac=a.disconnect_frac,
        max_queued_requests=a.max_queued_requests,
        max_tokens=a.max_tokens,
        max_model_len=a.max_model_len,
        window_s=a.window_s,
        sample_s=a.sample_s,
        request_timeout_s=a.request_timeout_s,
        rss_growth_mib=a.rss_growth_mib,
        p99_ratio=a.p99_ratio,
        model=a.model,
        extra=a.extra,
        port=a.port,
        seed=a.seed,
        data_dir=a.data_dir,
    )
    return setup, a


def main(argv: list[str]) -> int:
    setup, args = parse_args(argv)
    result = run_soak(setup, args.workdir)
    result["command"] = "kairos bench soak " + shlex.join(argv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    write_markdown(result, args.md)
    print(markdown(result))
    return 0 if result["checks"]["pass"] else 1
