"""What the real parts of the experiment drivers share: serve a ServerSpec, sample its GET /status, replay a workload
with `python -m loadgen run` against it, stop it; plus the run metadata and per-part JSON every driver writes.

HTTP and subprocesses only: loadgen imports nothing of engine/ or server/. Starting and stopping a server
(`start_server`, `stop_server`, `ServerSpec`) stay in loadgen/throughput_experiment.py, their first user.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from loadgen.throughput_experiment import REPO, ServerSpec, loadavg, machine_info, start_server, stop_server

RESULTS = REPO / "docs" / "results"
PYTHON = sys.executable


def setup_dict(setup: Any) -> dict[str, Any]:
    """A frozen setup dataclass as plain JSON types (tuples become lists), as it is stored in the result."""
    return json.loads(json.dumps(asdict(setup)))


# ---- commands -----------------------------------------------------------------------------------------------------


class ClientSetup(Protocol):
    """The fields of a driver's RealSetup that its `loadgen run` command reads."""

    port: int
    workload: str
    max_tokens: int
    max_model_len: int
    num_requests: int
    seed: int


def serve_command(port: int, *flags: str, prefix: tuple[str, ...] = ()) -> list[str]:
    """`python -m server serve` on `port` serving the default model under the name "default", then `flags`."""
    return [
        *prefix, PYTHON, "-m", "server", "serve",
        "--port", str(port),
        "--model", "default",
        "--served-model-name", "default",
        *flags,
    ]  # fmt: skip


def loadgen_run_command(
    setup: ClientSetup, rate: str, out: Path, *, extra: tuple[str, ...] = (), prefix: tuple[str, ...] = ()
) -> list[str]:
    """`python -m loadgen run` replaying `setup.workload` at recorded lengths against the server on `setup.port`;
    `extra` goes just before `--no-progress --json OUT` (the report's path is always last)."""
    return [
        *prefix, PYTHON, "-m", "loadgen", "run",
        "--base-url", f"http://127.0.0.1:{setup.port}",
        "--model", "default",
        "--workload", setup.workload,
        "--use-recorded-length",
        "--max-tokens", str(setup.max_tokens),
        "--max-model-len", str(setup.max_model_len),
        "--num-requests", str(setup.num_requests),
        "--rate", rate,
        "--seed", str(setup.seed),
        *extra,
        "--no-progress",
        "--json", str(out),
    ]  # fmt: skip


# ---- /status ------------------------------------------------------------------------------------------------------


class StatusSampler(threading.Thread):
    """GET /status every `period_s`: KV blocks used, the ledger's reserved / written tokens (EngineStats.extra),
    and the preemption counter, so a real run reports what the simulator reports. `sample` picks what is kept."""

    def __init__(self, port: int, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.period_s = f"http://127.0.0.1:{port}/status", period_s
        self.samples: list[dict[str, Any]] = []
        self._done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._done.wait(self.period_s):
                try:
                    body = client.get(self.url).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if (sample := self.sample(body)) is not None:
                    self.samples.append(sample)

    def sample(self, body: dict[str, Any]) -> dict[str, Any] | None:
        if (engine := body.get("engine")) and body.get("kv"):
            return {**engine, "kv_used_blocks": body["kv"]["used"], "info": body["engine_info"]}
        return None

    def stop(self) -> list[dict[str, Any]]:
        self._done.set()
        self.join()
        return self.samples


def status_now(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=10.0).json()


# ---- one real point -----------------------------------------------------------------------------------------------


@contextmanager
def serving(spec: ServerSpec, log_path: Path, timeout_s: float) -> Iterator[subprocess.Popen]:
    """The server of `spec`, healthy on entry, stopped (its whole process group) on exit."""
    proc = start_server(spec, log_path, timeout_s)
    try:
        yield proc
    finally:
        stop_server(proc)


@dataclass(frozen=True)
class ClientRun:
    """What one `loadgen run` against a live server gave: its report and the server's /status around it."""

    report: dict[str, Any]
    status_before: dict[str, Any]
    samples: list[dict[str, Any]]  # the sampler's, [] without one
    loadavg_before: list[float]
    started_at: float  # time.monotonic() just before the client started


def run_client(
    cmd: list[str], port: int, label: str, sampler: StatusSampler | None = None, settle_s: float = 0.0
) -> ClientRun:
    """Run the `loadgen run` command `cmd` (its report path last) while `sampler` polls the server on `port`;
    `settle_s` more seconds of sampling after the client exits. A client that wrote no report is an error."""
    out = Path(cmd[-1])
    before = status_now(port)
    if sampler:
        sampler.start()
    load = loadavg()
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=REPO, check=False, stdout=subprocess.DEVNULL)
    if settle_s:
        time.sleep(settle_s)
    samples = sampler.stop() if sampler else []
    if not out.exists():
        raise RuntimeError(f"{label}: the client wrote no {out}")
    return ClientRun(orjson.loads(out.read_bytes()), before, samples, load, t0)


# ---- command line and results -------------------------------------------------------------------------------------


def experiment_parser(name: str, doc: str, quick_help: str, workdir: Path) -> argparse.ArgumentParser:
    """`kairos bench experiment NAME`'s common flags: which part, --quick, where JSON, markdown and raw files go."""
    p = argparse.ArgumentParser(prog=f"kairos bench experiment {name}", description=doc.splitlines()[0])
    p.add_argument("--part", choices=("sim", "real", "all"), default="all")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=RESULTS / name, help="JSON (and plots) go here")
    p.add_argument("--md", type=Path, default=None, help=f"markdown to rewrite (default: OUT/../{name}.md)")
    p.add_argument("--workdir", type=Path, default=workdir, help="raw per-point JSON, server logs")
    return p


def run_meta(name: str, argv: list[str], quick: bool) -> dict[str, Any]:
    """When, where and how a driver was run; stored with every part."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "loadavg_start": loadavg(),
        "command": f"kairos bench experiment {name} " + " ".join(argv),
        "quick": quick,
    }


def write_part(out_dir: Path, part: str, result: dict[str, Any], meta: dict[str, Any]) -> Path:
    """OUT/PART.json: the part's result with the run's meta and the load average at its end."""
    result["meta"] = {**meta, "loadavg_end": loadavg()}
    path = out_dir / f"{part}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}", flush=True)
    return path
