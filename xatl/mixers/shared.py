"""What several mixers do alike, written once: grouped-query heads repeated for transfer, the short
causal convolution of the Mamba family (its init, its pass-through transfer, its prefill and step),
the Mamba family's step-size initialisation, and the check for mamba_ssm's kernels."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import logging

from xatl.mixers.base import Assignment
from xatl.ops.causal_conv import causal_conv1d, causal_conv1d_step

logger = logging.get_logger(__name__)

#: dtypes mamba_ssm's kernels take
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def repeat_kv_heads(tensor: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """Rows of key/value heads (Hkv * d, ...) repeated to every query head (H * d, ...), as
    grouped-query attention reads them: query head h uses key/value head h // (H / Hkv)."""
    blocks = tensor.unflatten(0, (num_kv_heads, -1))  # (Hkv, d, ...)
    return blocks.repeat_interleave(num_heads // num_kv_heads, dim=0).flatten(0, 1)


def kernel_applies(x: torch.Tensor, use_kernels: bool, kernel, mixer_title: str) -> bool:
    """Whether mamba_ssm's `kernel` runs `x`: CUDA, a kernel dtype, kernels allowed and installed
    (warns once when they are not installed)."""
    if not (use_kernels and x.is_cuda and x.dtype in KERNEL_DTYPES):
        return False
    if kernel is None:
        logger.warning_once(
            f"mamba_ssm is not installed: the {mixer_title} scan runs in PyTorch (slower). "
            "Install the `gpu` extra for its kernels."
        )
        return False
    return True


def time_step_bias(size: int, minimum: float, maximum: float, floor: float, device=None) -> torch.Tensor:
    """softplus⁻¹(dt) with dt log-uniform in [minimum, maximum], floored: the bias that starts each
    channel (or head) at its own step size."""
    log_min, log_max = math.log(minimum), math.log(maximum)
    dt = torch.exp(torch.rand(size, device=device) * (log_max - log_min) + log_min)
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def reset_conv_(conv: nn.Conv1d) -> None:
    """PyTorch's default conv init: the skeleton's normal(0.02) would all but silence the conv."""
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        init.zeros_(conv.bias)


def pass_through_conv(conv: nn.Conv1d) -> list[Assignment]:
    """A depthwise convolution that passes the current token through (last tap 1, others and bias
    0), so that what it convolves keeps the donor's value of the same token."""
    weight = torch.zeros_like(conv.weight)  # (channels, 1, W)
    weight[..., -1] = 1.0
    assignments = [Assignment("conv1d.weight", weight, "initialised", [], "pass-through: last tap 1")]
    if conv.bias is not None:
        assignments.append(Assignment("conv1d.bias", torch.zeros_like(conv.bias), "initialised", [], "zero"))
    return assignments


def conv_silu(
    x: torch.Tensor, conv: nn.Conv1d, state: torch.Tensor | None, *, decoding: bool, use_cache: bool,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The causal depthwise convolution, then SiLU: x (B, T, C) -> (out (B, T, C), state after these
    tokens (B, C, W - 1) or None); one step when `decoding` (T = 1, a state given)."""
    weight, bias = conv.weight[:, 0], conv.bias  # (C, W), (C,)
    if decoding:
        out, state = causal_conv1d_step(x[:, 0], state, weight, bias, activation="silu", use_kernel=use_kernel)
        return out[:, None], state  # (B, 1, C)
    return causal_conv1d(
        x, weight, bias, activation="silu", initial_state=state, output_final_state=use_cache, use_kernel=use_kernel,
    )


__all__ = ["KERNEL_DTYPES", "conv_silu", "kernel_applies", "pass_through_conv", "repeat_kv_heads", "reset_conv_",
           "time_step_bias"]
