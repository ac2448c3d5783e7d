"""A real uvicorn server on a free loopback port, in a thread of the test process (so tests can
look at what is behind it), for an app built by `service.main.create_app`."""

import socket
import threading
import time

import uvicorn

from service.config import Settings
from service.main import create_app


class ServerThread:
    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.app.state.stopping.set()  # as a signal to `xatl serve` does: streams of job events end
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    def engine(self, model: str):
        return self.app.state.registry.loaded()[model]
