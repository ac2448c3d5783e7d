"""Every error is OpenAI's envelope with a 4xx naming the field or the limit: API keys, limits,
validation, unknown models and routes."""

import json

import httpx
import openai
import pytest
from service_fixtures import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, body, headers=AUTH):
    return httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)


def assert_envelope(response, status, *, param=None, code=None, says=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert says in error["message"]
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/tiny-gla", "/metrics"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}],
                         ids=["missing", "wrong", "not-bearer"])
def test_every_route_but_health_needs_a_key(server, path, headers):
    response = httpx.get(server.url + path, headers=headers)
    assert_envelope(response, 401, code="invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"


def test_completions_need_a_key_before_anything_else(server):
    assert_envelope(post(server, {"model": "tiny-gla"}, headers={}), 401, code="invalid_api_key")


def test_the_openai_client_sees_401_as_an_authentication_error(server):
    client = openai.OpenAI(api_key="wrong", base_url=server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.completions.create(model="tiny-gla", prompt="x")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


def test_health_needs_no_key(server):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_a_server_without_keys_refuses_with_the_way_out(make_server):
    with make_server(api_keys=[]) as bare:
        response = httpx.get(bare.url + "/v1/models", headers=AUTH)
        assert_envelope(response, 401, says="XATL_API_KEYS")


def test_limits_name_themselves(server):
    error = assert_envelope(post(server, {"model": "tiny-gla", "prompt": "x", "max_tokens": 100_001}), 400,
                            param="max_tokens", code="max_tokens_exceeded", says="100000")
    assert "max_tokens" in error["message"]
    long_prompt = "Once upon a time " * 40  # well over the 64-token limit of the test server
    error = assert_envelope(post(server, {"model": "tiny-gla", "prompt": long_prompt}), 400,
                            param="prompt", code="max_prompt_tokens_exceeded")
    assert "max_prompt_tokens" in error["message"] and "64" in error["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x"}, "model"),
        ({"model": "tiny-gla"}, "prompt"),
        ({"model": "tiny-gla", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "tiny-gla", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "tiny-gla", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny-gla", "prompt": "x", "n": 2}, "n"),
        ({"model": "tiny-gla", "prompt": "x", "logprobs": 1}, "logprobs"),
        ({"model": "tiny-gla", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "tiny-gla", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "tiny-gla", "prompt": "x", "frobnicate": True}, "frobnicate"),
        ({"model": "tiny-gla", "prompt": ["x", "y"]}, "prompt"),
        ({"model": "tiny-gla", "prompt": [1, 99999]}, "prompt"),
        ({"model": "tiny-gla", "prompt": []}, "prompt"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, param):
    error = assert_envelope(post(server, body), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400(server):
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers)
    assert_envelope(response, 400, code="json_invalid")


def test_unknown_model_and_route_are_404s(server):
    assert_envelope(post(server, {"model": "nope", "prompt": "x"}), 404, param="model", code="model_not_found")
    assert_envelope(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404, param="model")
    assert_envelope(httpx.get(server.url + "/v2/everything", headers=AUTH), 404)


def test_concurrent_streams_over_the_limit_get_429(make_server):
    with make_server(max_concurrent_streams=1) as limited:
        body = {"model": "tiny-gla", "prompt": "Once", "max_tokens": 100_000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", limited.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as first:
            lines = first.iter_lines()  # (kept: dropping it would close the stream)
            next(lines)  # the first stream holds the only slot
            error = assert_envelope(post(limited, {"model": "tiny-gla", "prompt": "x"}), 429,
                                    code="max_concurrent_streams")
            assert "max_concurrent_streams" in error["message"] and "1" in error["message"]
        # the slot comes back once the first client has gone
        for _ in range(200):
            response = post(limited, {"model": "tiny-gla", "prompt": "x", "max_tokens": 2})
            if response.status_code != 429:
                break
        assert response.status_code == 200, response.text
        assert json.loads(response.text)["usage"]["completion_tokens"] <= 2
