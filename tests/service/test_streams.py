"""Streams over a real connection: a client that disconnects frees its slot at the next step, an
engine error mid-stream arrives as an error event, and the event loop keeps answering while the
engine works."""

import json
import time

import httpx
import openai
import pytest
from service_fixtures import API_KEY, metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENDLESS = {"prompt": "Once", "max_tokens": 100_000, "stream": True, "ignore_eos": True}


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    model = "tiny-attention"
    cancelled_before = metric(server, "xatl_requests_total", model=model, finish_reason="cancelled")
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": model, **ENDLESS},
                      headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(10)) if line.startswith("data: ")]
        assert len(received) >= 4
        engine = server.engine(model)
        assert engine.stats().running == 1
        assert metric(server, "xatl_requests_running", model=model) == 1
        assert metric(server, "xatl_state_bytes", model=model) > 0
    # the connection is closed: the engine drops the request at its next step
    assert wait_for(lambda: engine.stats().running == 0)
    assert metric(server, "xatl_requests_running", model=model) == 0
    assert metric(server, "xatl_state_bytes", model=model) == 0
    assert metric(server, "xatl_requests_total", model=model, finish_reason="cancelled") == cancelled_before + 1
    client = openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)
    assert client.completions.create(model=model, prompt="Once", max_tokens=3).usage.completion_tokens <= 3


def test_a_client_that_gives_up_on_a_whole_completion_frees_its_slot(server):
    model = "tiny-gla"
    cancelled = lambda: metric(server, "xatl_requests_total", model=model, finish_reason="cancelled")  # noqa: E731
    before = cancelled()
    body = {"model": model, **ENDLESS, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=1.0)
    engine = server.engine(model)
    assert wait_for(lambda: engine.stats().running == 0)
    assert server.app.state.limiter.active == 0
    assert wait_for(lambda: cancelled() == before + 1)


def test_the_event_loop_answers_while_a_stream_runs(server):
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny-gla", **ENDLESS},
                      headers=AUTH, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        for _ in range(5):  # other routes answer between tokens of the running stream
            assert httpx.get(server.url + "/health").status_code == 200
            assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
        assert server.engine("tiny-gla").stats().running == 1
        assert next(lines) is not None  # and the stream is still going


def test_an_engine_error_mid_stream_arrives_as_an_error_event(server, monkeypatch):
    client = openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)
    client.completions.create(model="tiny-gla", prompt="x", max_tokens=1)  # load the model
    batch = server.engine("tiny-gla")._batch
    original, steps = batch.step, []

    def failing_step(tokens):
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("simulated device failure")
        return original(tokens)

    monkeypatch.setattr(batch, "step", failing_step)
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny-gla", **ENDLESS},
                      headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "simulated device failure" in error["message"] and error["type"] == "server_error"
    assert all("choices" in json.loads(e) for e in events[:-2])
    # the openai client raises it as an API error
    with pytest.raises(openai.APIError, match="simulated device failure"):
        steps.clear()
        list(client.completions.create(model="tiny-gla", stream=True, **{k: v for k, v in ENDLESS.items()
                                                                          if k not in ("stream", "ignore_eos")},
                                       extra_body={"ignore_eos": True}))
    monkeypatch.undo()
    assert client.completions.create(model="tiny-gla", prompt="x", max_tokens=2).usage.completion_tokens <= 2


def test_an_event_holding_unicode_line_separators_stays_one_line_for_line_splitting_clients():
    # generated text may hold U+2028, U+2029 or U+0085, which JSON leaves raw and httpx's iter_lines
    # (str.splitlines) breaks lines at: the client then read half an event (seen in the faults suite)
    from httpx._decoders import LineDecoder

    from service.routes.completions import _sse

    text = "a\u2028b\x85c\u2029d\ne\rf"
    lines = [line for line in LineDecoder().decode(_sse({"text": text})) if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: ")) == {"text": text}
