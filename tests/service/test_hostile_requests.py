"""What a hostile client sent that once got a 500 or ate memory (each found by trying): a lone
surrogate in the prompt, temperatures that overflow, a top_k or seed past 64 bits, bodies far over
any prompt, chunked or not. Each is a 4xx naming the field, or served as it should be, and the
connection stays usable."""

import json

import httpx
import pytest
from service_fixtures import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def _post(client, body) -> httpx.Response:
    # the surrogate must reach the server as JSON escapes (\\ud800), as a client's JSON encoder sends it
    return client.post("/v1/completions", content=json.dumps(body).encode(), headers=AUTH)


@pytest.mark.parametrize("prompt", ["a\ud800b", ["a\udfffb"]], ids=["string", "list"])
def test_a_lone_surrogate_is_a_400_and_the_connection_lives_on(server, prompt):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = _post(client, {"model": "tiny-gla", "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "prompt" and "surrogate" in error["message"]
        again = _post(client, {"model": "tiny-gla", "prompt": "fine", "max_tokens": 2})  # same connection
        assert again.status_code == 200


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_decode_greedily(server, temperature):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        greedy = _post(client, {"model": "tiny-gla", "prompt": "Once", "max_tokens": 6, "temperature": 0,
                                "ignore_eos": True}).json()["choices"][0]["text"]
        tiny = _post(client, {"model": "tiny-gla", "prompt": "Once", "max_tokens": 6, "temperature": temperature,
                              "ignore_eos": True})
        assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize("top_k", [2**63, 10**30])
def test_a_top_k_past_the_vocabulary_keeps_every_token(server, top_k):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = _post(client, {"model": "tiny-gla", "prompt": "Once", "max_tokens": 3, "top_k": top_k, "seed": 1})
        assert response.status_code == 200


def test_a_seed_past_64_bits_is_a_400_naming_seed(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = _post(client, {"model": "tiny-gla", "prompt": "Once", "max_tokens": 3, "seed": 2**64})
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
        largest = {"model": "tiny-gla", "prompt": "Once", "max_tokens": 3, "seed": 2**64 - 1}
        assert _post(client, largest).status_code == 200


def test_bodies_over_the_limit_are_refused_before_they_are_read(make_server):
    with make_server(max_request_bytes=64 * 1024) as small, httpx.Client(base_url=small.url, timeout=60) as client:
        big = {"model": "tiny-gla", "prompt": "x" * 5_000_000}
        declared = _post(client, big)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            payload = json.dumps(big).encode()
            for start in range(0, len(payload), 65536):
                yield payload[start:start + 65536]

        chunked = client.post("/v1/completions", content=chunks(), headers=AUTH)
        assert chunked.status_code == 413
    with make_server() as server, httpx.Client(base_url=server.url, timeout=60) as client:
        fine = _post(client, {"model": "tiny-gla", "prompt": "small", "max_tokens": 1})
        assert fine.status_code == 200


def test_a_prompt_far_over_the_token_limit_is_refused(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = _post(client, {"model": "tiny-gla", "prompt": "word " * 200_000, "max_tokens": 1})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "max_prompt_tokens_exceeded"
