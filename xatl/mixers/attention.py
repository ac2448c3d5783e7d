"""Softmax attention as the donor has it: q/k/v/o projections, grouped-query heads, rotary or no
positions. Layers that keep attention in a hybrid use this mixer, and an all-attention plan
rebuilds the donor itself. Its state is the key/value cache, the one state that grows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xatl.mixers.base import Assignment, Mixer
from xatl.mixers.rotary import apply_rotary, rotary_cos_sin


class Attention(Mixer):
    """Multi-head (grouped-query) causal self-attention.

    Args:
        config: the model config; uses `hidden_size`, `num_attention_heads`,
            `num_key_value_heads`, `head_dim`, `attention_bias`, `attention_out_bias`, and the
            rotary fields when `position_embedding_type == "rotary"`.
        layer_idx: index of the layer.
    """

    name = "attention"
    output_projection = "o_proj"
    state_grows = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rotary = config.position_embedding_type == "rotary"
        self.rotary_dim = config.rotary_dim
        self.rope_theta = config.rope_theta
        qkv_bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)

    @property
    def rotary(self):
        return (self.rotary_dim, self.rope_theta) if self.use_rotary else None

    def forward(self, hidden_states, *, position_ids=None, position_embeddings=None, attention_mask=None, state=None,
                use_cache=False):
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, H, T, hd); k, v: (B, Hkv, T, hd)
        past = 0 if state is None else state["key"].shape[2]
        if self.use_rotary:
            if position_ids is None:
                position_ids = torch.arange(past, past + length, device=hidden_states.device)[None]
            cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.rope_theta, q.dtype, position_embeddings)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None:
            k = torch.cat([state["key"], k], dim=2)  # (B, Hkv, past + T, hd)
            v = torch.cat([state["value"], v], dim=2)

        mask = self._mask(attention_mask, past, length, hidden_states.device)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=length > 1 and mask is None and past == 0,  # length first: a plain bool when decoding
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), ({"key": k, "value": v} if use_cache else None)

    @staticmethod
    def _mask(attention_mask, past: int, length: int, device) -> torch.Tensor | None:
        """Boolean (B, 1, T, past + T) mask, or None when causal alone is enough."""
        # a compiled decode step cannot branch on the mask's values: there a given mask is used as given
        no_padding = attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all()))
        if no_padding and (past == 0 or length == 1):
            return None
        total = past + length
        causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(diagonal=past)
        mask = causal[None, None]  # (1, 1, T, S)
        if not no_padding:
            keep = attention_mask[:, -total:].bool()[:, None, None, :]  # (B, 1, 1, S)
            mask = mask & keep
            # a query on padding would see no key at all: let it see itself (its output is unused)
            own = torch.arange(length, device=device)[:, None] + past == torch.arange(total, device=device)
            mask = mask | own[None, None]
        return mask

    def pad_state(self, state, columns):
        # zero slots before the cache's first token: (B, Hkv, S, hd) -> (B, Hkv, columns + S, hd)
        return {key: F.pad(t, (0, 0, columns, 0)) for key, t in state.items()} if columns else state

    def select_state(self, state, rows, drop_columns=0):
        state = super().select_state(state, rows)
        if drop_columns:
            state = {key: t[:, :, drop_columns:] for key, t in state.items()}  # (B', Hkv, S - drop, hd)
        return state

    def init_from_attention(self, attention, config, *, include_qkv):
        # A layer that keeps attention receives the donor's attention whole, whatever the mode.
        return [Assignment(name, tensor, "copied", [name]) for name, tensor in attention.items()]
