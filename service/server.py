"""uvicorn's server with a bounded drain: the first SIGINT/SIGTERM stops new connections at once and
gives running streams `drain_seconds` to finish; then the engines close, so that the streams still
running end with an error event (`data: {"error": …}`, then `[DONE]`) rather than a cut connection,
and the process exits. Streams of job events end at once with such an error event (`stopping`):
they wait on a job that may run for hours, and the client follows again from its last event."""

from __future__ import annotations

import threading

import uvicorn

from service.registry import ModelRegistry

SHUTDOWN_MESSAGE = "the server is shutting down"


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, drain_seconds: float,
                 stopping: threading.Event | None = None):
        super().__init__(config)
        self.registry, self.drain_seconds = registry, drain_seconds
        self.stopping = stopping or threading.Event()

    def handle_exit(self, sig, frame) -> None:
        self.stopping.set()
        if not self.should_exit:  # the first signal: start the clock
            timer = threading.Timer(self.drain_seconds, self.registry.close, kwargs={"reason": SHUTDOWN_MESSAGE})
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)
