"""Tiny GGUF files written the way llama.cpp's converter writes them, from a transformers model:
metadata under the architecture's keys, tensors under GGUF names (gguf-py's name table), Llama's
q/k rows permuted for llama.cpp's interleaved RoPE, GPT-2's Conv1D weights transposed to (out, in),
and a byte-level BPE tokenizer. Matrices are stored as `qtype`, vectors as F32 (as llama.cpp does)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


SPECIAL = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2: unknown, BOS, EOS


def byte_level_vocab(size: int) -> tuple[list[str], list[str]]:
    """`size` tokens: three special ones, the 256 byte symbols of GPT-2's byte-level BPE, then
    merges of pairs of letters."""
    to_symbol = bytes_to_unicode()
    tokens, merges = SPECIAL + list(to_symbol.values()), []
    letters = [to_symbol[b] for b in b"etaoinshrdlucmfwypvbgkjqxz"]
    for first in letters:
        for second in letters:
            if len(tokens) >= size:
                return tokens[:size], merges
            tokens.append(first + second)
            merges.append(f"{first} {second}")
    raise ValueError(f"vocabulary {size} is larger than this toy tokenizer")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rotate-half rows -> llama.cpp's interleaved pairs, per head (its converter's `permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model, path: Path, *, qtype: str = "F32", name: str = "tiny test model",
               tokenizer: bool = True, architecture: str | None = None, extra_tensors: dict | None = None,
               metadata: dict | None = None) -> Path:
    """Write `model` (a transformers CausalLM) as a GGUF file; return the path. `architecture`
    overrides `general.architecture` (and the prefix of the metadata keys), nothing else."""
    config = model.config
    model_type = config.model_type
    arch = architecture or ARCH[model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    if model_type == "gpt2":
        layers, width = config.n_layer, config.n_embd
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(width)
        writer.add_feed_forward_length(config.n_inner or 4 * width)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        layers, width = config.num_hidden_layers, config.hidden_size
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(width)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(getattr(config, "head_dim", None) or width // config.num_attention_heads)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_block_count(layers)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[qtype])
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    if tokenizer:
        tokens, merges = byte_level_vocab(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL)
                               + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL)))
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)

    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCH[model_type].upper()), layers)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    tied = config.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # a tied head is not stored: its absence is what tells a reader it is tied
        data = tensor.detach().float().numpy()
        if model_type == "gpt2" and hf_name.endswith(_CONV1D):
            data = data.T
        if ARCH[model_type] == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = _permute(data, heads)
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        _add(writer, gguf_name, np.ascontiguousarray(data), kind)
    for gguf_name, data in (extra_tensors or {}).items():
        _add(writer, gguf_name, data, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer, name: str, data: np.ndarray, kind) -> None:
    if data.ndim < 2 or kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    else:
        writer.add_tensor(name, gguf.quantize(data.astype(np.float32), kind), raw_dtype=kind)


def dequantised(tensor: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a reader gets back from storing `tensor` (out, in) as `qtype`."""
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    data = tensor.detach().float().numpy()
    return torch.from_numpy(np.array(gguf.dequantize(gguf.quantize(data, kind), kind)).reshape(data.shape))
