"""`/v1/models` lists the model folders; `/metrics` exposes latency histograms, token counters,
running and waiting requests and state bytes in Prometheus format; the precision setting reaches
the engines; each model is served at the precision it is saved in unless the server's precision
says otherwise."""

import httpx
import openai
import pytest
from pydantic import ValidationError
from service_fixtures import API_KEY, ServerThread, metric, save_tiny_model

from service.config import Settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_models_are_the_folders_with_a_config(server):
    client = openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-attention", "tiny-gla"]  # not "not-a-model"
    assert all(m.object == "model" and m.owned_by == "xatl" and m.created > 0 for m in models.data)
    assert client.models.retrieve("tiny-gla").id == "tiny-gla"


def test_models_load_on_first_request_and_stay(make_server):
    with make_server(loaded_models=1) as fresh:
        assert fresh.app.state.registry.loaded() == {}
        client = openai.OpenAI(api_key=API_KEY, base_url=fresh.url + "/v1", max_retries=0)
        client.completions.create(model="tiny-gla", prompt="x", max_tokens=1)
        engine = fresh.engine("tiny-gla")
        client.completions.create(model="tiny-gla", prompt="y", max_tokens=1)
        assert fresh.engine("tiny-gla") is engine  # loaded once
        client.completions.create(model="tiny-attention", prompt="x", max_tokens=1)
        assert list(fresh.app.state.registry.loaded()) == ["tiny-attention"]  # one kept: the idle one left


def test_metrics_after_completions(server):
    client = openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)
    for _ in range(2):
        client.completions.create(model="tiny-gla", prompt="Once upon", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    response = httpx.get(server.url + "/metrics", headers=AUTH)
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for family in ("xatl_time_to_first_token_seconds", "xatl_inter_token_latency_seconds",
                   "xatl_e2e_request_latency_seconds"):
        assert f"# TYPE {family} histogram" in text
    tiny = {"model": "tiny-gla"}
    assert metric(server, "xatl_generation_tokens_total", **tiny) >= 10
    assert metric(server, "xatl_prompt_tokens_total", **tiny) >= 6
    assert metric(server, "xatl_time_to_first_token_seconds_count", **tiny) >= 2
    assert metric(server, "xatl_inter_token_latency_seconds_count", **tiny) >= 8
    assert metric(server, "xatl_e2e_request_latency_seconds_count", **tiny) >= 2
    assert metric(server, "xatl_requests_total", finish_reason="length", **tiny) >= 2
    assert "xatl_requests_running{" in text and "xatl_requests_waiting{" in text and "xatl_state_bytes{" in text
    assert metric(server, "xatl_requests_running", **tiny) == 0
    assert metric(server, "xatl_state_bytes", **tiny) == 0
    assert metric(server, "process_resident_memory_bytes") > 0


def test_the_precision_setting_reaches_the_engines(make_server, monkeypatch):
    monkeypatch.setenv("XATL_PRECISION", "int8")
    assert Settings().precision == "int8"  # XATL_PRECISION, as `xatl serve --precision` sets it
    monkeypatch.setenv("XATL_PRECISION", "int4")
    with pytest.raises(ValidationError, match="precision"):
        Settings()
    with make_server(precision="int8") as fresh:
        client = openai.OpenAI(api_key=API_KEY, base_url=fresh.url + "/v1", max_retries=0)
        completion = client.completions.create(model="tiny-gla", prompt="Once", max_tokens=3, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 3
        assert fresh.engine("tiny-gla").precision == "int8"


def test_the_compile_setting_defaults_to_auto_and_still_takes_the_old_booleans(monkeypatch):
    monkeypatch.delenv("XATL_COMPILE", raising=False)  # tests/conftest.py turns it off for test servers
    assert Settings().compile == "auto"
    for given, expected in (("true", "on"), ("false", "off"), ("on", "on"), ("auto", "auto")):
        monkeypatch.setenv("XATL_COMPILE", given)
        assert Settings().compile == expected
    monkeypatch.setenv("XATL_COMPILE", "sometimes")
    with pytest.raises(ValidationError, match="compile"):
        Settings()


def test_each_model_is_served_at_its_saved_precision_unless_the_server_says_otherwise(tokenizer, tmp_path):
    from xatl.serving.precision import save_at_precision

    models = tmp_path / "models"
    save_tiny_model(models / "tiny-fp32", ["gla", "attention"], tokenizer)
    save_at_precision(models / "tiny-fp32", models / "tiny-int8", "int8")  # as `xatl quantize` writes it
    save_at_precision(models / "tiny-fp32", models / "tiny-bf16", "bf16")
    saved = {"tiny-bf16": "bf16", "tiny-fp32": "fp32", "tiny-int8": "int8"}
    settings = dict(api_keys=[API_KEY], home=tmp_path, models_dir=models, max_batch_size=2, torch_threads=1)
    for server_precision in (None, "fp32"):
        with ServerThread(Settings(**settings, precision=server_precision)) as fresh:
            client = openai.OpenAI(api_key=API_KEY, base_url=fresh.url + "/v1", max_retries=0)
            expected = {name: server_precision or precision for name, precision in saved.items()}
            assert {m.id: m.precision for m in client.models.list().data} == expected
            assert client.models.retrieve("tiny-int8").precision == expected["tiny-int8"]
            for name in saved:
                client.completions.create(model=name, prompt="Once", max_tokens=2, extra_body={"ignore_eos": True})
                assert fresh.engine(name).precision == expected[name], name  # the server's precision wins


@pytest.mark.parametrize("config", [
    {"quantization_config": {"quant_method": "xatl", "weights": "int8"}, "dtype": "float32"},
    {"dtype": "bfloat16"}, {"torch_dtype": "float32"}, {"dtype": "float16"}, {},
    {"quantization_config": {"quant_method": "gptq"}},
])
def test_the_service_reads_a_saved_precision_as_the_library_does(config, tmp_path):
    import json

    from service.registry import saved_precision
    from xatl.artifacts import saved_precision as library_saved_precision

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xatl", **config}))
    assert saved_precision(tmp_path / "config.json") == library_saved_precision(tmp_path)  # the service's is torch-free
