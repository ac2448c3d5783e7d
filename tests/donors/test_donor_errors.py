"""Donors that cannot be read raise `DonorError` (a ValueError) whose message names the problem."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from xatl.donors import DonorError, load_donor

SMALL = dict(vocab_size=64, bos_token_id=1, eos_token_id=2)
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, **SMALL)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def copy_of(source, tmp_path):
    return shutil.copytree(source, tmp_path / "donor")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_donor_error_is_a_value_error():
    assert issubclass(DonorError, ValueError)  # the CLI turns ValueError into a one-line error


@pytest.mark.parametrize("model_type", ["bert", None])
def test_unknown_model_type(llama_dir, tmp_path, model_type):
    path = copy_of(llama_dir, tmp_path)
    edit_config(path, model_type=model_type)
    with pytest.raises(DonorError, match=f"unknown donor model_type {model_type!r}; supported: gpt2, gpt_neox"):
        load_donor(str(path))


def test_pickle_only_directory_is_refused_without_unpickling(llama_dir, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(llama_dir / "config.json", path)
    # not even a valid pickle: unpickling would raise UnpicklingError, not DonorError
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened")
    with pytest.raises(DonorError, match=r"only pickle checkpoints \(pytorch_model.bin\).*convert them to safetensors"):
        load_donor(str(path))


def test_pickle_file_given_directly_is_refused(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(DonorError, match="ckpt.pt is a pickle checkpoint, which xatl never opens"):
        load_donor(str(tmp_path / "ckpt.pt"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + bytes(60))  # torch.save's zip
    with pytest.raises(DonorError, match="pytorch_model.bin looks like a PyTorch pickle"):
        load_donor(str(tmp_path / "pytorch_model.bin"))


def test_shape_mismatch_names_the_tensor(llama_dir, tmp_path):
    path = copy_of(llama_dir, tmp_path)
    edit_config(path, intermediate_size=40)
    with pytest.raises(DonorError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\), "
                                         r"but the config needs \(40, 32\)"):
        load_donor(str(path))


def test_fused_qkv_that_does_not_fit_the_heads_names_the_tensor(tmp_path):
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, **SMALL)).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["gpt_neox.layers.0.attention.query_key_value.weight"] = torch.zeros(90, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DonorError, match=r"gpt_neox.layers.0.attention.query_key_value.weight of shape \(90, 32\)"):
        load_donor(str(tmp_path))


def test_unknown_tensor_is_named(llama_dir, tmp_path):
    path = copy_of(llama_dir, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, str(path / "model.safetensors"))
    message = r"unknown tensor\(s\) in the llama checkpoint: model.layers.0.self_attn.q_norm"
    with pytest.raises(DonorError, match=message):
        load_donor(str(path))


def test_missing_and_extra_tensors_are_named(llama_dir, tmp_path):
    path = copy_of(llama_dir, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(DonorError, match="lacks tensor.*model.layers.1.post_attention_layernorm.weight"):
        load_donor(str(path))
    edit_config(path, attention_bias=True)  # the config now wants biases the checkpoint lacks
    with pytest.raises(DonorError, match="lacks tensor.*model.layers.0.mixer.q_proj.bias"):
        load_donor(str(path))


def test_tied_head_that_differs_from_the_embedding(tmp_path):
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path)  # untied: stores lm_head
    edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.raises(DonorError, match="ties the LM head to the embeddings, but lm_head.weight differs"):
        load_donor(str(tmp_path))


@pytest.mark.parametrize("name", ["./nowhere", "./nowhere/model.bin", "/nowhere/model"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DonorError, match=f"donor {name} does not exist"):
        load_donor(name)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(DonorError, match="has no config.json"):
        load_donor(str(tmp_path))


def test_directory_without_weights(llama_dir, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(llama_dir / "config.json", path)
    with pytest.raises(DonorError, match="has neither model.safetensors nor model.safetensors.index.json"):
        load_donor(str(path))


def test_missing_shard_is_named(tmp_path):
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(DonorError, match=f"lacks shard.*{shards[-1].name}"):
        load_donor(str(tmp_path))


def test_config_missing_a_required_field(llama_dir, tmp_path):
    path = copy_of(llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DonorError, match="lacks the field 'hidden_size'"):
        load_donor(str(path))


@pytest.mark.parametrize("setting", [
    {"scale_attn_by_inverse_layer_idx": True},
    {"reorder_and_upcast_attn": True},
    {"scale_attn_weights": False},
])
def test_unsupported_gpt2_settings(tmp_path, setting):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, **SMALL)).save_pretrained(tmp_path)
    edit_config(tmp_path, **setting)
    (key, value), = setting.items()
    with pytest.raises(DonorError, match=f"GPT-2 donors with {key}={value} are not supported"):
        load_donor(str(tmp_path))


@pytest.mark.parametrize("model_type,changes,message", [
    ("mistral", {"sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window=4096"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1,
               "max_position_embeddings": 4096, "layer_types": None}, r"sliding_window=64\) in layers \[1\]"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "'llama3'"),
], ids=["mistral-window", "qwen2-window", "llama3-rope"])
def test_settings_that_change_the_maths_are_refused(llama_dir, tmp_path, model_type, changes, message):
    path = copy_of(llama_dir, tmp_path)
    edit_config(path, model_type=model_type, **changes)
    with pytest.raises(DonorError, match=message):
        load_donor(str(path))


def test_window_as_long_as_the_context_is_accepted(llama_dir, tmp_path):
    path = copy_of(llama_dir, tmp_path)
    edit_config(path, model_type="mistral", sliding_window=2048, max_position_embeddings=2048)
    assert load_donor(str(path)).model_type == "mistral"


def test_bin_that_is_not_llama2c(tmp_path):
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DonorError, match="random.bin is not a llama2.c checkpoint"):
        load_donor(str(tmp_path / "random.bin"))
    header = struct.pack("<7i", 32, 40, 2, 4, 2, 50, 16)
    (tmp_path / "truncated.bin").write_bytes(header + bytes(400))
    with pytest.raises(DonorError, match=r"implies \d+ bytes, the file has 428"):
        load_donor(str(tmp_path / "truncated.bin"))
    (tmp_path / "v1.bin").write_bytes(struct.pack("<ii", 0x616B3432, 1) + bytes(300))
    with pytest.raises(DonorError, match="version-1 export; only the legacy version-0"):
        load_donor(str(tmp_path / "v1.bin"))


def test_llama2c_tokenizer_missing_or_wrong(tmp_path):
    header = (16, 24, 1, 2, 2, 300, 8)
    floats = 300 * 16 + 16 + 3 * 16 * 16 + 16 * 16 + 16 + 3 * 24 * 16 + 16 + 8 * 8
    (tmp_path / "model.bin").write_bytes(struct.pack("<7i", *header) + bytes(4 * floats))
    assert load_donor(str(tmp_path / "model.bin")).config.vocab_size == 300
    with pytest.raises(DonorError, match="tokenizer file .*tok.bin does not exist"):
        load_donor(str(tmp_path / "model.bin"), tokenizer=str(tmp_path / "tok.bin"))
    (tmp_path / "tok.bin").write_bytes(struct.pack("<i", 7) + struct.pack("<fi", 0.0, 3) + b"ab")
    with pytest.raises(DonorError, match="tok.bin is not a llama2.c tokenizer"):
        load_donor(str(tmp_path / "model.bin"), tokenizer=str(tmp_path / "tok.bin"))


def test_hub_id_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DonorError, match="donor EleutherAI/pythia-14m is no local path, and downloading it"):
        load_donor("EleutherAI/pythia-14m")


def test_two_checkpoint_names_for_one_tensor(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=16, **SMALL)).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["wte.weight"] = tensors["transformer.wte.weight"].clone()  # base-model name as well
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DonorError, match="both give model.embed_tokens.weight"):
        load_donor(str(tmp_path))
