"""The engine on the real pretrained stories260K (XATL_DATA_DIR): converted with attention kept
it tells llama2.c's reference story, and for the donor and a GLA hybrid its greedy tokens equal
transformers' `generate()` on the same weights."""

import pytest
import torch

import xatl
from xatl.serving import Engine, SamplingParams

REFERENCE_START = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def donor(data_file):
    return xatl.load_donor(str(data_file("stories260K/stories260K.bin")),
                           tokenizer=str(data_file("stories260K/tok512.bin")))


@pytest.mark.parametrize("mixer,attention_layers", [("attention", []), ("gla", [2])], ids=["donor", "gla-hybrid"])
def test_engine_greedy_equals_generate_on_stories260k(donor, mixer, attention_layers):
    conversion = xatl.convert(donor, mixer=mixer, attention_layers=attention_layers)
    model, tokenizer = conversion.model, conversion.tokenizer
    engine = Engine(model, tokenizer, background=False)
    prompt = [tokenizer.bos_token_id]
    events = list(engine.generate(prompt, SamplingParams(max_new_tokens=60, temperature=0.0)))
    tokens = [e.token_id for e in events]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 1:].tolist()
    assert len(tokens) == 60 or tokens[-1] in engine.eos_token_ids  # 60 tokens, or an end of sequence
    assert tokens == expected[: len(tokens)]
    text = "".join(e.text for e in events)
    assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    if mixer == "attention":
        assert text.startswith(REFERENCE_START)
