"""The one canonical description every donor is read into.

A donor is described as the all-attention `XatlConfig` that rebuilds it (token embeddings, per-layer
norms, Q/K/V/O with head counts, position scheme, MLP kind, residual layout, final norm, LM head
tied or not) plus its weights under the names `XatlForCausalLM` uses for that config, and its
tokenizer. Converting with `--mixer attention` therefore rebuilds the donor itself, and the
transfer code never needs to know which family a donor came from.
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
