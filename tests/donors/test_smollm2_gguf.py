"""The shared SmolLM2-135M-Instruct GGUF (Q4_1) as a donor (a data test: needs XATL_DATA_DIR).

One load of the 135M model for the module: its shape and quantisation as the file states them, its
rebuilt all-attention form writing the continuation that transformers' own model writes (see
../shared/data/smollm2-135m/SOURCE.md), and a conversion to gated linear attention."""

import pytest
import torch

import xatl
from xatl.serving import Engine, SamplingParams

GGUF = "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def donor(data_file):
    return xatl.load_donor(str(data_file(GGUF)))


def test_shape_and_quantisation(donor):
    config = donor.config
    assert donor.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.dtype == torch.float32
    assert donor.quantization["file_type"] == "MOSTLY_Q4_1"
    assert donor.quantization["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert donor.origins["model.embed_tokens.weight"].startswith("token_embd.weight (Q8_0, dequantised)")
    assert len(donor.tokenizer) == 49152


def test_rebuilt_donor_writes_what_transformers_writes(donor):
    model = xatl.convert(donor, mixer="attention").model
    engine = Engine(model, donor.tokenizer, background=False)
    prompt = donor.tokenizer("Once upon a time, there was a little")["input_ids"]
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)))
    assert "".join(e.text for e in events) == " girl named Emma who loved"


def test_converts_to_gated_linear_attention(donor, tmp_path):
    result = xatl.convert(donor, mixer="gla", attention_layers=[0, 15, 29], transfer="xatl+qkv", out=tmp_path)
    assert result.model.config.attention_layers == [0, 15, 29]
    report = xatl.read_transfer_report(tmp_path)
    assert report["donor"]["quantization"]["file_type"] == "MOSTLY_Q4_1"
    q_proj = next(t for t in report["tensors"] if t["name"] == "model.layers.1.mixer.q_proj.weight")
    assert q_proj["donor_sources"] == [
        "blk.1.attn_q.weight (Q4_1, dequantised) as model.layers.1.self_attn.q_proj.weight"]
