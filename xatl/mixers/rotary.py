"""Rotary position embeddings in the rotate-half layout (transformers' Llama/GPT-NeoX).

Donors that rotate interleaved pairs (llama2.c) have their q/k rows permuted on load, so one
layout serves every donor.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `position_ids` (B, T): each (B, 1, T, rotary_dim), broadcast over heads."""
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
