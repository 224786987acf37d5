"""uvicorn's Server with Kairos's exit-signal handling: SIGTERM / SIGINT first tell the app to drain, and a drained
exit is exit code 0 (plain uvicorn re-raises the caught signal after its shutdown, so SIGTERM would end in -15)."""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit_signal = on_exit_signal  # must be signal-safe: EngineSupervisor.request_drain is

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop waiting for open connections
            return
        self.on_exit_signal()
        self.should_exit = True
