"""Rotary position embeddings in the rotate-half layout (transformers' Llama/GPT-NeoX).

Donors that rotate interleaved pairs (llama2.c) have their q/k rows permuted on load, so one
layout serves every donor.
"""

from __future__ import annotations

import torch

#: cos and sin tables (each (B, 1, T, rotary_dim), float32) of one forward's positions by
#: (rotary_dim, rope_theta): computed once for all layers (`rotary_tables`) and handed to each mixer
#: as `position_embeddings`, as transformers' models hand theirs
RotaryTables = dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]]


def rotary_tables(position_ids: torch.Tensor, keys) -> RotaryTables:
    """The tables of `position_ids` (B, T) for each (rotary_dim, rope_theta) in `keys`.

    Computed once per forward rather than in each layer; the decode step computes them before its
    compiled graph, whose inputs they become: inside it, inductor recomputed a layer's cos and sin
    (a power, a cosine and a sine) for every element of the state update that reads them (measured
    ~3 ms of a 13 ms int8 step of random-width512 on an AVX2 machine)."""
    return {key: rotary_cos_sin(position_ids, *key, torch.float32) for key in keys}


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype,
    tables: RotaryTables | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `position_ids` (B, T): each (B, 1, T, rotary_dim), broadcast over heads;
    taken from `tables` where they hold them."""
    if tables is not None and (rotary_dim, theta) in tables:
        cos, sin = tables[rotary_dim, theta]
        return cos.to(dtype), sin.to(dtype)
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim)
    )
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of each head of `x` (B, H, T, head_dim)."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat([rotated, passed], dim=-1) if passed.numel() else rotated
