"""The one canonical description every donor is read into.

A donor is described as the all-attention `XatlConfig` that rebuilds it (token embeddings, per-layer
norms, Q/K/V/O with head counts, position scheme, MLP kind, residual layout, final norm, LM head
tied or not) plus its weights under the names `XatlForCausalLM` uses for that config, and its
tokenizer. Converting with `--mixer attention` therefore rebuilds the donor itself, and the
transfer code never needs to know which family a donor came from.

`canonical_shapes` states that layout from the config alone, so that donors are checked without
building (or importing) the model; a test keeps it equal to `XatlForCausalLM(config).state_dict()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from xatl.config import XatlConfig


class DonorError(ValueError):
    """A donor cannot be read: unknown family, pickle-only checkpoint, missing file, bad shapes."""


@dataclass
class Donor:
    config: XatlConfig  # all-attention skeleton of the donor
    state_dict: dict[str, torch.Tensor]  # canonical names: XatlForCausalLM(config).state_dict() keys
    tokenizer: PreTrainedTokenizerBase | None
    model_type: str  # family it was read as: "gpt2", "gpt_neox", "llama", "qwen2", "llama2c", ...
    source: str  # local path or hub id
    # canonical name -> the donor checkpoint tensor it came from, with any transform applied
    # ("transformer.h.0.attn.c_attn.weight[:, 0:64] transposed"); shown in transfer reports
    origins: dict[str, str] = field(default_factory=dict)
    # how the donor's file stored its weights when they were not plain floats (GGUF: file type and
    # the type of each tensor, all dequantised on load); recorded in the transfer report
    quantization: dict | None = None

    def attention_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """The attention tensors of one layer, named relative to the attention module."""
        prefix = f"model.layers.{layer}.mixer."
        return {name[len(prefix):]: t for name, t in self.state_dict.items() if name.startswith(prefix)}


def canonical_shapes(config: XatlConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the all-attention model `config` describes, in the model's
    order: what a donor read into this config must hold, no more, no less."""
    if any(name != "attention" for name in config.layer_mixers):
        raise ValueError(f"a donor is all attention, but its config plans {config.layer_mixers}")
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    query, key_value = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    if config.position_embedding_type == "learned":
        shapes["model.embed_positions.weight"] = (config.max_position_embeddings, hidden)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (hidden,)
        if config.norm_type == "layernorm":
            shapes[f"{name}.bias"] = (hidden,)

    def linear(name: str, rows: int, columns: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (rows, columns)
        if bias:
            shapes[f"{name}.bias"] = (rows,)

    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        norm(f"{layer}.input_layernorm")
        linear(f"{layer}.mixer.q_proj", query, hidden, config.attention_bias)
        linear(f"{layer}.mixer.k_proj", key_value, hidden, config.attention_bias)
        linear(f"{layer}.mixer.v_proj", key_value, hidden, config.attention_bias)
        linear(f"{layer}.mixer.o_proj", hidden, query, config.attention_out_bias)
        norm(f"{layer}.post_attention_layernorm")
        if config.mlp_type == "gated":
            linear(f"{layer}.mlp.gate_proj", inner, hidden, config.mlp_bias)
        linear(f"{layer}.mlp.up_proj", inner, hidden, config.mlp_bias)
        linear(f"{layer}.mlp.down_proj", hidden, inner, config.mlp_bias)
    norm("model.norm")
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
