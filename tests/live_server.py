"""A real `python -m server serve` with the default model, for end-to-end tests (the pattern of
test_server_e2e.py): start it on a free port, wait for /health, terminate it afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240.0


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(log_dir: Path, *extra_args: str) -> Iterator[LiveServer]:
    port = free_port()
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--model", "default"]
    cmd += ["--max-model-len", "512", "--kv-cache-memory", "128MiB", "--num-threads", "2", *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"server exited early:\n{server.log_tail()}"
            try:
                if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_idle(server: LiveServer, deadline_s: float = 30.0) -> dict:
    """Poll /status until stats the engine pushed after this call show nothing running or waiting (older stats
    may predate requests that ran in under one push interval); return those stats."""
    after = time.time()
    end = time.monotonic() + deadline_s
    while True:
        engine = httpx.get(f"{server.base_url}/status", timeout=5).json()["engine"]
        is_idle = engine and engine["num_running"] == 0 and engine["num_waiting"] == 0
        if is_idle and engine["timestamp"] > after:
            return engine
        assert time.monotonic() < end, f"engine still busy after {deadline_s} s: {engine}"
        time.sleep(0.1)
