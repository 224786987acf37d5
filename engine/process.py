"""The engine process: `run_engine_process` is its main, `EngineLoop` the loop around an `EngineCore`.

Each turn: take every message the server sent (add, abort, shutdown), run one step if there is work and send its
deltas as one `TokenDeltaBatch`, publish `EngineStats` every `stats_interval_s` and on going idle, and sleep on the
inbound wake-up fd (or the parent's death) when idle. Any exception is sent as `EngineError` before a non-zero exit.
"""

from __future__ import annotations

import importlib
import logging
import math
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection, parent_process
from typing import Any

from engine.codec import decode, encode
from engine.config import EngineConfig
from engine.ipc import Channel, ChannelHandles
from engine.protocol import Abort, AddRequest, EngineError, EngineToServer, Shutdown, TokenDeltaBatch

logger = logging.getLogger(__name__)

DEFAULT_CORE_FACTORY = "engine.core:build_engine_core"
MAX_ERROR_CHARS = 8192  # the tail of a traceback is the useful part; far below a ring's size
_SEND_POLL_S = 0.5  # how often a sender blocked on a full ring checks that the server is still there


class ProtocolError(RuntimeError):
    """The server sent something the engine does not accept."""


class ParentGone(Exception):
    """The server process exited: nobody is left to serve."""


def load_factory(path: str) -> Callable[[EngineConfig], Any]:
    """'package.module:function' -> the function."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"core factory must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module_name), attr)


class EngineLoop:
    """Drives a core from a channel. `core` is an EngineCore or anything with its five methods."""

    def __init__(
        self, core: Any, channel: Channel, stats_interval_s: float, parent_sentinel: int | None
    ) -> None:
        self.core = core
        self.channel = channel
        self.stats_interval_s = stats_interval_s
        self.parent_sentinel = parent_sentinel  # readable once the server process has exited
        self.is_busy = False
        self.next_stats_at = 0.0
        self._poller = select.poll()  # built once: the idle wait is on the request latency path
        for fd in (channel.fileno(), parent_sentinel):
            if fd is not None:
                self._poller.register(fd, select.POLLIN)

    def run(self) -> None:
        """Until Shutdown (returns) or the parent's exit (raises ParentGone)."""
        self.send(self.core.ready_message())
        logger.info("engine ready")
        self.send_stats()
        while self.take_messages():
            if self.core.has_work():
                self.set_busy(True)
                if deltas := self.core.step():
                    self.send(TokenDeltaBatch(deltas))
            elif self.is_busy:
                self.set_busy(False)
                self.send_stats()
            if time.monotonic() >= self.next_stats_at:
                self.check_parent()
                self.send_stats()
            if not self.is_busy:
                self.wait(self.next_stats_at - time.monotonic())

    def take_messages(self) -> bool:
        """Apply every pending message; False on Shutdown."""
        for record in self.channel.recv_all():
            match decode(record):
                case AddRequest() as msg:
                    self.core.add_request(msg)
                case Abort(request_ids=request_ids):
                    self.core.abort(request_ids)
                case Shutdown(reason=reason):
                    logger.info("engine shutting down (%s)", reason or "requested")
                    return False
                case msg:
                    raise ProtocolError(f"the engine does not accept {type(msg).__name__}")
        return True

    def set_busy(self, is_busy: bool) -> None:
        if is_busy != self.is_busy:
            self.is_busy = is_busy
            # debug: under light load this flips once per request
            logger.debug("engine %s", "busy" if is_busy else "idle")

    def send_stats(self) -> None:
        self.send(self.core.stats())
        self.next_stats_at = time.monotonic() + self.stats_interval_s

    def wait(self, timeout: float) -> None:
        """Sleep until the server sends something, the timeout (s) passes, or the server exits (ParentGone)."""
        events = self._poller.poll(max(0, math.ceil(timeout * 1000)))
        if any(fd == self.parent_sentinel for fd, _ in events):
            raise ParentGone("the server process exited")

    def check_parent(self) -> None:
        if self.parent_sentinel is not None and connection.wait([self.parent_sentinel], 0):
            raise ParentGone("the server process exited")

    def send(self, msg: EngineToServer) -> None:
        """Blocks while the outbound ring is full (back-pressure), but not past the server's exit.

        A TokenDeltaBatch too large for one ring record goes as several batches (halves, recursively).
        """
        data = encode(msg)
        if (
            isinstance(msg, TokenDeltaBatch)
            and len(data) > self.channel.max_record_size
            and len(msg.deltas) > 1
        ):
            half = len(msg.deltas) // 2
            self.send(TokenDeltaBatch(msg.deltas[:half]))
            self.send(TokenDeltaBatch(msg.deltas[half:]))
            return
        while True:
            try:
                return self.channel.send(data, timeout=_SEND_POLL_S)
            except TimeoutError:
                self.check_parent()


def error_message(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}"
    if len(text) > MAX_ERROR_CHARS:
        text = "…" + text[-MAX_ERROR_CHARS:]
    return f"{summary}\n{text}"


def run_engine_process(
    config_dict: dict,
    channel_handles: ChannelHandles,
    core_factory: str = DEFAULT_CORE_FACTORY,
    log_level: int = logging.INFO,
) -> None:
    """Main of the engine process (a multiprocessing target; spawn-safe: every argument is plain or picklable).

    `core_factory` is 'module:function' taking an EngineConfig and returning the core (tests pass a fake).
    Exits 0 after Shutdown or the server's exit; 1 after sending EngineError for any exception.
    """
    # Ctrl-C in a terminal reaches the whole process group, and so does a service manager's SIGTERM (systemd kills
    # the control group): the server decides when the engine stops, after draining (server/supervisor.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=log_level, format="%(asctime)s kairos-engine %(levelname)s %(name)s: %(message)s"
        )
    channel = channel_handles.attach()
    try:
        config = EngineConfig.from_dict(config_dict)
        logger.info("engine starting (core factory %s)", core_factory)
        core = load_factory(core_factory)(config)
        parent = parent_process()
        EngineLoop(core, channel, config.stats_interval_s, parent.sentinel if parent else None).run()
    except ParentGone:
        logger.warning("engine exiting: the server process is gone")
    except BaseException as exc:
        logger.exception("engine failed")
        _report_error(channel, exc)
        sys.exit(1)
    finally:
        channel.close()


def _report_error(channel: Channel, exc: BaseException) -> None:
    try:
        channel.send(encode(EngineError(error_message(exc))), timeout=1.0)
    except (TimeoutError, OSError, ValueError) as send_exc:
        # The server learns of the death from the process sentinel anyway; only the text is lost.
        logger.error("could not send EngineError to the server: %s", send_exc)
