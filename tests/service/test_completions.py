"""The official `openai` client against a real uvicorn server: streamed and whole completions,
`usage`, the `xatl` figures, stop sequences and seeds."""

import openai
import pytest
from service_fixtures import API_KEY


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0, timeout=60)


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def test_streams_a_completion_and_reads_usage(client, tokenizer):
    stream = client.completions.create(model="tiny-gla", prompt="Once upon a time", max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert all(c.object == "text_completion" and c.model == "tiny-gla" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in text_chunks)
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 12
    prompt_tokens = len(tokenizer("Once upon a time")["input_ids"])
    assert usage_chunk.usage.prompt_tokens == prompt_tokens
    assert usage_chunk.usage.total_tokens == prompt_tokens + 12
    figures = usage_chunk.model_extra["xatl"]
    assert figures["state_bytes"] > 0 and 0 < figures["ttft_s"] <= figures["e2e_s"]
    whole = client.completions.create(model="tiny-gla", prompt="Once upon a time", max_tokens=12, **GREEDY)
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text


def test_a_whole_completion_with_usage_and_figures(client):
    completion = client.completions.create(model="tiny-attention", prompt="Héllo 日本", max_tokens=9, **GREEDY)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 9
    figures = completion.model_extra["xatl"]
    # two attention layers: (k, v) x 2 KV heads x head_dim 8 x 4 bytes per token, prompt + 8 fed tokens
    assert figures["state_bytes"] == 2 * 2 * 2 * 8 * 4 * (completion.usage.prompt_tokens + 8)
    assert figures["tokens_per_s"] > 0 and figures["peak_memory_bytes"] > 0


def test_stream_without_usage_option_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="tiny-gla", prompt="Once", max_tokens=4, stream=True, **GREEDY))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    assert "xatl" in chunks[-1].model_extra


def test_stop_sequence_and_token_prompts(client):
    full = client.completions.create(model="tiny-gla", prompt=[1, 267, 271], max_tokens=20, **GREEDY)
    text = full.choices[0].text
    stop = text[6:9]
    cut = client.completions.create(model="tiny-gla", prompt=[[1, 267, 271]], max_tokens=20, stop=stop, **GREEDY)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_seed_reproduces_a_sampled_completion(client):
    def sample(seed):
        return client.completions.create(model="tiny-gla", prompt="Once", max_tokens=16, temperature=1.0,
                                         top_p=0.95, seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)
