"""Ctrl-C (SIGINT) or SIGTERM with streams in flight: new connections are refused at once, a stream
that finishes within the drain finishes whole, and one that does not ends with an error event and
[DONE] when the drain is over; then the server exits."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from service_fixtures import build_tokenizer, save_tiny_model

XATL = Path(sys.executable).with_name("xatl")


def _stream(url: str, max_tokens: int, events: list, started: threading.Event):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"},
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()


def test_shutdown_drains_then_ends_the_remaining_streams_with_an_error(tmp_path):
    save_tiny_model(tmp_path / "data" / "models" / "tiny", ["gla", "attention"], build_tokenizer())
    with socket_port() as port:
        pass
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("XATL_")}, "XATL_API_KEYS": "k",
           "XATL_SHUTDOWN_DRAIN_SECONDS": "10", "XATL_MAX_TOKENS": "1000000", "XATL_TORCH_THREADS": "1"}
    server = subprocess.Popen([str(XATL), "serve", "--no-worker", "--data-dir", str(tmp_path / "data"),
                               "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        long_events, short_events = [], []
        long_started, short_started = threading.Event(), threading.Event()
        long = threading.Thread(target=_stream, args=(url, 1_000_000, long_events, long_started))
        long.start()
        assert long_started.wait(60)
        short = threading.Thread(target=_stream, args=(url, 8, short_events, short_started))
        short.start()
        assert short_started.wait(60)
        signalled = time.monotonic()
        server.send_signal(signal.SIGINT)
        time.sleep(0.5)
        try:
            refused = httpx.get(url + "/health", timeout=2).status_code != 200
        except httpx.HTTPError:
            refused = True
        assert refused  # no new connection once the drain has begun
        short.join(60)
        long.join(60)
        assert server.wait(timeout=60) == 0
        elapsed = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()
    # the short stream finished whole within the drain
    assert short_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    # the long one ended with an error event when the drain was over, then [DONE]
    assert long_events[-1] == "[DONE]"
    error = json.loads(long_events[-2])["error"]
    assert error["message"] == "the server is shutting down" and error["type"] == "server_error"
    assert 10 <= elapsed < 90  # the drain, then the engines close


class socket_port:
    def __enter__(self):
        import socket

        self.probe = socket.socket()
        self.probe.bind(("127.0.0.1", 0))
        return self.probe.getsockname()[1]

    def __exit__(self, *exc):
        self.probe.close()


def _wait_healthy(url, server):
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(server.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")
