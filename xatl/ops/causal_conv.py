"""Depthwise causal convolution over time, the short convolution of Mamba and Mamba-2.

    out_t[c] = act(bias[c] + sum_{i<W} weight[c, i] * x_{t-W+1+i}[c])     (x_s = 0 before the start)

`causal_conv1d` is the training / prefill form; `causal_conv1d_step` is one decode step. Both carry
the same state: the last `W - 1` inputs, (B, C, W - 1), oldest first, zeros for a fresh sequence.
On CUDA with the `causal-conv1d` package installed both run its kernels; elsewhere they run PyTorch
(`F.conv1d`). `naive_causal_conv1d` is the tap-by-tap reference the tests compare them with.
Shapes: x (B, T, C) (tokens on dim 1, like every op here), weight (C, W), bias (C,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.utils import logging

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv
    from causal_conv1d import causal_conv1d_update as _kernel_update
except ImportError:
    _kernel_conv = _kernel_update = None

logger = logging.get_logger(__name__)

ACTIVATIONS = (None, "silu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise convolution of x (B, T, C); returns (out (B, T, C), final state or None).

    A state from an earlier call is prepended to the inputs, so that splitting a sequence and
    carrying the state gives the same outputs as one call over the whole of it. `use_kernel=False`
    forces the PyTorch path."""
    _check_activation(activation)
    batch, length, channels = x.shape
    width = weight.shape[-1]
    x = x.transpose(1, 2)  # (B, C, T)
    if initial_state is not None:
        x = torch.cat([initial_state.to(x.dtype), x], dim=-1)  # (B, C, W - 1 + T)
    final_state = None
    if output_final_state:  # the last W - 1 inputs, zeros where the sequence is shorter
        final_state = F.pad(x, (width - 1, 0))[..., x.shape[-1] :]  # (B, C, W - 1)

    if use_kernel and _kernel_applies(x, width):
        out = _kernel_conv(x.contiguous(), weight, bias, activation=activation)
    else:
        weight, bias = _cast(weight, bias, x.dtype)
        out = F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=channels)[..., : x.shape[-1]]
        out = out if activation is None else F.silu(out)
    return out[..., -length:].transpose(1, 2), final_state  # (B, T, C)


def causal_conv1d_step(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    use_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x (B, C), state (B, C, W - 1) -> (out (B, C), new state (B, C, W - 1)).
    The given state is left as it was (a new one is returned)."""
    _check_activation(activation)
    width = weight.shape[-1]
    window = torch.cat([state.to(x.dtype), x[..., None]], dim=-1)  # (B, C, W)
    new_state = window[..., 1:]
    if use_kernel and _kernel_applies(x, width):
        # the kernel shifts the state it is given in place: give it a copy
        return _kernel_update(x, state.to(x.dtype).clone(), weight, bias, activation=activation), new_state
    weight, bias = _cast(weight, bias, x.dtype)
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return (out if activation is None else F.silu(out)), new_state


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: the sum over taps written out, x (B, T, C) -> (B, T, C)."""
    _check_activation(activation)
    length, width = x.shape[1], weight.shape[-1]
    history = (
        x.new_zeros(x.shape[0], width - 1, x.shape[2])
        if initial_state is None
        else initial_state.transpose(1, 2).to(x.dtype)
    )
    x = torch.cat([history, x], dim=1)  # (B, W - 1 + T, C)
    out = sum(weight[:, i] * x[:, i : i + length] for i in range(width))
    if bias is not None:
        out = out + bias
    return out if activation is None else F.silu(out)


def _check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _cast(weight, bias, dtype):
    """The PyTorch path computes in the inputs' dtype, as the kernels do."""
    return weight.to(dtype), (None if bias is None else bias.to(dtype))


def _kernel_applies(x: torch.Tensor, width: int) -> bool:
    """The kernels run on CUDA for widths 2 to 4 in 32- or 16-bit floats; say once when they are
    missing there."""
    if not x.is_cuda or not 2 <= width <= 4 or x.dtype not in KERNEL_DTYPES:
        return False
    if _kernel_conv is None:
        logger.warning_once(
            "causal-conv1d is not installed: the causal convolution runs in PyTorch (slower). "
            "Install the `gpu` extra for its CUDA kernels."
        )
        return False
    return True
