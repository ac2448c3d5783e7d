"""GGUF donors: tiny random transformers models written as GGUF files (by `gguf_writer`, as llama.cpp
would), read back through transformers' GGUF reader, rebuilt as `XatlForCausalLM` and compared logit
for logit with the model they were written from; quantised files give the dequantised weights and
name their quantisation in the transfer report; what cannot be converted is refused by name."""

import copy
import json
import shutil

import pytest
import torch
from gguf_writer import dequantised, write_gguf
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from xatl.cli import main as cli
from xatl.convert import convert
from xatl.donors import DonorError, load_donor
from xatl.model import XatlForCausalLM

VOCAB = 300  # the writer's toy tokenizer: 3 special tokens, 256 bytes, merges
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
# widths are multiples of 32: the block of Q8_0 and Q4_0
LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=64, **SMALL)

CASES = {
    "llama-gqa-untied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=True)),
    "qwen2-bias-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE, tie_word_embeddings=True)),
    # llama.cpp writes Mistral as "llama" (transformers 5.24 reads it as Llama: its Mistral path fails
    # on gguf-py's tables); without a sliding window the two compute the same
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_SHAPE, sliding_window=None)),
    # n_positions: transformers reads GGUF's context length into GPT-2's n_ctx, not n_positions (1024)
    "gpt2-tied": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, **SMALL)),
}
READ_AS = {"mistral": "llama"}


def randomize(model, seed=0):
    """Large random weights everywhere (norms and biases included): a tensor put in the wrong place,
    or q/k rows left in llama.cpp's order, moves the logits far beyond the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param.ndim == 1 else 0.0))
    return model.eval()


def token_ids(batch=2, length=20, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def rebuild(donor):
    model = XatlForCausalLM(donor.config).eval()
    model.load_state_dict(donor.state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def llama():
    return randomize(CASES["llama-gqa-untied"]())


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_donor_rebuilds_the_logits_of_the_model_it_was_written_from(case, tmp_path):
    reference = randomize(CASES[case]())
    donor = load_donor(str(write_gguf(reference, tmp_path / "model.gguf")))
    assert donor.model_type == READ_AS.get(case, reference.config.model_type)
    assert donor.config.tie_word_embeddings == reference.config.tie_word_embeddings
    assert donor.quantization["tensor_types"] == {"F32": len(reference.state_dict()) - donor.config.tie_word_embeddings}
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(rebuild(donor)(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_quantised_tensors_are_dequantised_and_the_quantisation_reported(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", qtype="Q8_0")
    donor = load_donor(str(path))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        canonical = name.replace("self_attn", "mixer")
        assert torch.equal(donor.state_dict[canonical], dequantised(llama.state_dict()[name], "Q8_0"))
    assert donor.state_dict["model.norm.weight"].dtype == torch.float32
    assert torch.equal(donor.state_dict["model.norm.weight"], llama.state_dict()["model.norm.weight"])  # F32
    assert donor.quantization == {"format": "gguf", "file": "model.gguf", "file_type": "MOSTLY_Q8_0",
                                  "tensor_types": {"Q8_0": 16, "F32": 5}, "dequantised_to": "float32"}
    assert donor.origins["model.layers.0.mixer.q_proj.weight"] == (
        "blk.0.attn_q.weight (Q8_0, dequantised) as model.layers.0.self_attn.q_proj.weight")
    # the logits are those of the float model with every matrix rounded through Q8_0
    rounded = copy.deepcopy(llama)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(dequantised(param, "Q8_0"))
        ids = token_ids()
        torch.testing.assert_close(rebuild(donor)(ids).logits, rounded(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(rounded(ids).logits, llama(ids).logits, atol=1e-2)


def test_convert_cli_takes_a_gguf_file_or_its_folder_and_reports_the_quantisation(llama, tmp_path, capsys):
    folder = tmp_path / "donor"
    folder.mkdir()
    path = write_gguf(llama, folder / "tiny.Q8_0.gguf", qtype="Q8_0")
    assert cli(["convert", str(path), "--mixer", "gla", "--transfer", "xatl+qkv", "--out", str(tmp_path / "a")]) == 0
    assert "quantised   MOSTLY_Q8_0 (tensors: Q8_0 16, F32 5), dequantised to float32" in capsys.readouterr().out
    assert cli(["convert", str(folder), "--mixer", "gla", "--transfer", "xatl+qkv", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "a" / "transfer_report.json").read_text())
    assert report["donor"]["quantization"]["file_type"] == "MOSTLY_Q8_0"
    q_proj = next(t for t in report["tensors"] if t["name"] == "model.layers.0.mixer.q_proj.weight")
    assert q_proj["donor_sources"] == [
        "blk.0.attn_q.weight (Q8_0, dequantised) as model.layers.0.self_attn.q_proj.weight"]
    a, b = (XatlForCausalLM.from_pretrained(tmp_path / side) for side in "ab")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")  # the GGUF's tokenizer, saved beside
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (1, 2, VOCAB)
    assert tokenizer.decode(tokenizer("the cat sat")["input_ids"]) == "the cat sat"


def test_a_gguf_file_with_another_suffix_is_read_as_gguf(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.bin", tokenizer=False)  # not taken for llama2.c
    donor = load_donor(str(path))
    assert donor.model_type == "llama" and donor.tokenizer is None


def test_conversion_of_a_gguf_donor_copies_its_dequantised_weights(llama, tmp_path):
    donor = load_donor(str(write_gguf(llama, tmp_path / "model.gguf", qtype="Q4_0")))
    model = convert(donor, mixer="gla", transfer="xatl").model
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, donor.state_dict["model.layers.1.mlp.up_proj.weight"])


# ---- refusals -----------------------------------------------------------------------------------


def test_architecture_without_a_family_is_refused_by_name(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", architecture="phi3")
    with pytest.raises(DonorError, match="architecture 'phi3'; xatl converts GGUF donors of architectures llama, "
                                         "qwen2, gpt2"):
        load_donor(str(path))


def test_rope_scaling_is_refused(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", metadata={"llama.rope.scaling.type": "linear"})
    with pytest.raises(DonorError, match="RoPE scaling of type 'linear' is not supported"):
        load_donor(str(path))


def test_a_tensor_transformers_would_drop_is_refused(llama, tmp_path):
    extra = {"rope_freqs.weight": torch.ones(8).numpy()}  # llama 3's scaled RoPE factors
    path = write_gguf(llama, tmp_path / "model.gguf", extra_tensors=extra)
    with pytest.raises(DonorError, match="tensor\\(s\\) rope_freqs.weight of .* have no place in the llama model"):
        load_donor(str(path))


def test_folder_with_two_gguf_files_asks_for_one(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "a.gguf", tokenizer=False)
    shutil.copy(path, tmp_path / "b.gguf")
    with pytest.raises(DonorError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\): pass the one"):
        load_donor(str(tmp_path))


def test_split_gguf_and_missing_file(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model-00001-of-00002.gguf", tokenizer=False)
    with pytest.raises(DonorError, match="one part of a split GGUF model"):
        load_donor(str(path))
    with pytest.raises(DonorError, match="GGUF file nowhere.gguf does not exist"):
        load_donor("nowhere.gguf")


def test_truncated_gguf_is_refused(llama, tmp_path):
    path = write_gguf(llama, tmp_path / "model.gguf", tokenizer=False)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DonorError, match="cannot read .*model.gguf as GGUF"):
        load_donor(str(path))
