"""Mamba's selective scan: a diagonal linear recurrence with input-dependent step sizes.

Per channel d and state index n, with dt = softplus(delta + delta_bias) when `delta_softplus`:

    h_t[d, n] = exp(dt_t[d] * A[d, n]) * h_{t-1}[d, n] + dt_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    out_t[d]  = y_t[d] * silu(z_t[d])

The layout is mamba_ssm's `selective_scan_fn`: u, delta, z (B, D, L); A (D, N); B, C (B, N, L);
D, delta_bias (D,); initial_state / last state (B, D, N). The work is done in float32 (float64 for
float64 inputs) and the output has u's dtype.

`selective_scan` is the training / prefill form. The recurrence is a first-order linear scan, so it
runs as a work-efficient parallel (Blelloch) scan along the tokens: log2(L) levels of vectorised
steps, never a Python loop over tokens. Its backward is the same scan run backwards, inside one
autograd Function that keeps only the states (B, L, D, N) and recomputes the decays. The tokens go
through in chunks carried by the state, sized so that a chunk's (B, chunk, D, N) temporaries stay
near 2^20 numbers (a few MB, cache-sized: on CPU that is ~2x faster than whole sequences).
`selective_scan_ref` is the token-by-token reference the tests compare it with (outputs and
gradients); `selective_state_step` is its step, and the one-token decode step of the mixer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# states per chunk of the scan: (B, chunk, D, N) near this many numbers
CHUNK_NUMEL = 2**20


def _log_floor(dtype: torch.dtype) -> float:
    """log of the smallest decay kept: sqrt(smallest normal number). Products of two such decays,
    and of one with a state of ordinary size, stay normal: denormals slow CPUs ~4x. A decay floored
    here keeps at most 1e-19 (float32) of the state, far below the state's own precision."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def _decays_(out: torch.Tensor, dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """exp(dt * A), floored, written into `out`: dt (B, T, D), A (D, N), out (B, T, D, N)."""
    torch.mul(dt[..., None], A, out=out)
    return out.clamp_(min=_log_floor(out.dtype)).exp_()


def _scan_(decay: torch.Tensor, values: torch.Tensor) -> None:
    """values[:, t] += decay[:, t] * values[:, t - 1] for t = 1 .. T-1, in place, along dim 1.

    Work-efficient parallel scan (Blelloch), by recursion on pairs: each odd position absorbs the
    even one before it, the odd positions (pairs, with the product of both decays) are scanned
    the same way, and then each even position takes the complete odd one before it. log2(T) levels
    of vectorised ops over halving sizes; `decay` is left as it was.
    """
    length = values.shape[1]
    if length < 2:
        return
    pairs = length // 2
    early_v, late_v = values[:, 0 : 2 * pairs : 2], values[:, 1 : 2 * pairs : 2]
    early_d, late_d = decay[:, 0 : 2 * pairs : 2], decay[:, 1 : 2 * pairs : 2]
    late_v.addcmul_(late_d, early_v)
    _scan_((late_d * early_d).clamp_(min=math.exp(_log_floor(decay.dtype))), late_v)
    values[:, 2::2].addcmul_(decay[:, 2::2], values[:, 1 : length - 1 : 2])


def _reverse_scan_(decay: torch.Tensor, values: torch.Tensor) -> None:
    """values[:, t] += decay[:, t] * values[:, t + 1] for t = T-2 .. 0, in place: `_scan_` mirrored
    (each even position absorbs the odd one after it)."""
    length = values.shape[1]
    if length < 2:
        return
    if length % 2:  # the last position is complete: fold it into the one before, drop it
        values[:, -2].addcmul_(decay[:, -2], values[:, -1])
        length -= 1
    early_v, late_v = values[:, 0:length:2], values[:, 1:length:2]
    early_d, late_d = decay[:, 0:length:2], decay[:, 1:length:2]
    early_v.addcmul_(early_d, late_v)
    _reverse_scan_((early_d * late_d).clamp_(min=math.exp(_log_floor(decay.dtype))), early_v)
    values[:, 1 : length - 1 : 2].addcmul_(decay[:, 1 : length - 1 : 2], values[:, 2:length:2])


class _SelectiveScanCore(torch.autograd.Function):
    """The state recurrence and its read-out, for one chunk of tokens:

        h_t = exp(dt_t A) * h_{t-1} + dtu_t B_tᵀ      y_t = h_t C_t      (per batch row)

    dt, dtu (B, T, D); A (D, N); B, C (B, T, N); initial (B, D, N) or None.
    Returns y (B, T, D) and the last state (B, D, N). Only the states are kept for backward (the
    decays are recomputed), and the (B, T, D, N) temporaries are written in place. Backward, with
    G_t the gradient reaching h_t:  G_t = C_t gy_t + exp(dt_{t+1} A) G_{t+1}  (the same scan,
    run backwards), then  g_dtu = G B,  g_B = Gᵀ dtu,  g_(dt A)_t = G_t * exp(dt_t A) * h_{t-1}.
    """

    @staticmethod
    def forward(ctx, dt, A, dtu, B, C, initial):
        states = torch.mul(dtu[..., None], B[:, :, None, :])  # (B, T, D, N): the inputs dtu_t B_tᵀ
        decay = _decays_(torch.empty_like(states), dt, A)  # (B, T, D, N)
        if initial is not None:
            states[:, 0].addcmul_(decay[:, 0], initial)
        _scan_(decay, states)
        ctx.save_for_backward(dt, A, dtu, B, C, initial, states)
        y = torch.einsum("btdn,btn->btd", states, C)
        return y, states[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        dt, A, dtu, B, C, initial, states = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # else G below inherits its strides, and every reshape copies G
        # 1. G: the gradient reaching each state, from the read-out and from later states
        grad = torch.mul(grad_y[..., None], C[:, :, None, :])  # (B, T, D, N)
        grad[:, -1] += grad_last
        decay = _decays_(torch.empty_like(states), dt, A)  # (B, T, D, N)
        if grad.shape[1] > 1:  # G_t takes decay_{t+1} G_{t+1}: the last one first, then the scan
            grad[:, -2].addcmul_(decay[:, -1], grad[:, -1])
            _reverse_scan_(decay[:, 1:], grad[:, :-1])
        grad_initial = None
        if initial is not None and ctx.needs_input_grad[5]:
            grad_initial = decay[:, 0] * grad[:, 0]
        # 2. the inputs and the read-out
        grad_dtu = torch.einsum("btdn,btn->btd", grad, B)
        grad_B = _sum_over_channels(grad, dtu)
        grad_C = _sum_over_channels(states, grad_y)
        # 3. the decays: g_(dt A)_t = G_t * decay_t * h_{t-1}, over the decays in place; then
        # the sums over n and over (batch, time), with `grad` as the buffer
        grad_log_decay = decay.mul_(grad)
        grad_log_decay[:, 1:].mul_(states[:, :-1])
        if initial is None:
            grad_log_decay[:, 0].zero_()
        else:
            grad_log_decay[:, 0].mul_(initial)
        grad_dt = torch.mul(grad_log_decay, A, out=grad).sum(-1)
        grad_A = torch.mul(grad_log_decay, dt[..., None], out=grad).sum((0, 1))
        return grad_dt, grad_A, grad_dtu, grad_B, grad_C, grad_initial


def _sum_over_channels(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_d weights[b, t, d] * states[b, t, d, :]: (B, T, D, N), (B, T, D) -> (B, T, N), as a
    row vector times each (D, N) matrix, which reads the states in place (no transposed copy)."""
    batch, length, channels, size = states.shape
    rows = weights.reshape(batch * length, 1, channels)
    return torch.bmm(rows, states.reshape(batch * length, channels, size)).view(batch, length, size)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan over a whole sequence (see the module docstring for shapes).

    `chunk_size`: tokens scanned at once (None: about 2^20 / (B * D * N), at least 8).
    Returns `(out (B, D, L), final_state (B, D, N))`; final_state is None unless `output_final_state`.
    """
    # the scan runs in float32 (or float64) whatever autocast is on: its products of many decays lose
    # everything in bf16, and its backward needs the dtypes of its forward
    with torch.autocast(u.device.type, enabled=False):
        out, state = _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)
    return out, (state if output_final_state else None)


def _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size):
    dtype = u.dtype
    acc = torch.promote_types(dtype, torch.float32)
    dt = _time_step(delta.to(acc), delta_bias, delta_softplus)
    # (B, D, L) -> (B, L, D) and (B, N, L) -> (B, L, N): tokens on dim 1 for the scan, so that each
    # of its steps works on contiguous (D, N) blocks
    dtu = (dt * u.to(acc)).transpose(1, 2).contiguous()
    dt = dt.transpose(1, 2).contiguous()
    B, C = (x.to(acc).transpose(1, 2).contiguous() for x in (B, C))
    A = A.to(acc)
    state = None if initial_state is None else initial_state.to(acc)

    if chunk_size is None:
        chunk_size = max(8, CHUNK_NUMEL // (A.numel() * u.shape[0]))
    outs = []
    # split, not sliced chunk by chunk: the backward of one split is one concatenation
    for pieces in zip(*(x.split(chunk_size, dim=1) for x in (dt, dtu, B, C))):
        y, state = _SelectiveScanCore.apply(pieces[0], A, pieces[1], pieces[2], pieces[3], state)
        outs.append(y)
    out = torch.cat(outs, dim=1).transpose(1, 2)  # (B, D, L)
    out = _skip_and_gate(out, u.to(acc), D, z)
    return out.to(dtype), state


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: the recurrence one token at a time, with `selective_state_step`; returns like
    `selective_scan`."""
    batch, channels, length = u.shape
    acc = torch.promote_types(u.dtype, torch.float32)
    state = (
        u.new_zeros(batch, channels, A.shape[1], dtype=acc)
        if initial_state is None
        else initial_state.to(acc)
    )
    outs = []
    for t in range(length):
        z_t = None if z is None else z[:, :, t]
        out, state = selective_state_step(
            state, u[:, :, t], delta[:, :, t], A, B[:, :, t], C[:, :, t], D=D, z=z_t,
            dt_bias=delta_bias, dt_softplus=delta_softplus,
        )
        outs.append(out)
    out = torch.stack(outs, dim=-1)  # (B, D, L)
    return out, (state if output_final_state else None)


def selective_state_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step, in mamba_ssm's `selective_state_update` layout but functional.

    state (B, D, N) in the accumulation dtype; x, dt, z (B, D); A (D, N); B, C (B, N).
    Returns (out (B, D) in x's dtype, new state).
    """
    acc = state.dtype
    dt = _time_step(dt.to(acc), dt_bias, dt_softplus)
    decay = (dt[..., None] * A.to(acc)).clamp(min=_log_floor(acc)).exp()  # (B, D, N), floored as in the scan
    state = decay * state + (dt * x.to(acc))[..., None] * B.to(acc)[:, None, :]
    out = torch.einsum("bdn,bn->bd", state, C.to(acc))
    return _skip_and_gate(out, x.to(acc), D, z).to(x.dtype), state


def _time_step(delta: torch.Tensor, delta_bias: torch.Tensor | None, softplus: bool) -> torch.Tensor:
    """delta (B, D, ...) plus the per-channel bias, through softplus when asked."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype).view(-1, *([1] * (delta.dim() - 2)))
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(out: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None):
    """out + D * u, times silu(z); u, z (B, D, ...) like out."""
    shape = (-1, *([1] * (out.dim() - 2)))
    if D is not None:
        out = out + D.to(out.dtype).view(shape) * u
    if z is not None:
        out = out * F.silu(z.to(out.dtype))
    return out


__all__ = ["selective_scan", "selective_scan_ref", "selective_state_step"]
