"""Linear attention with a scalar decay per head and step (the state-space-dual form).

    S_t = exp(g_t) * S_{t-1} + k_t v_tᵀ          S: (K, V) per head
    o_t = scale * S_tᵀ q_t

Retention (g constant per head) and Mamba-2's SSD (q=C, k=B, v=dt*x, g=dt*A) are both this op.
`chunk_simple_gla` is the training / prefill form: quadratic inside chunks of `chunk_size` tokens,
recurrent across chunks (a Python loop over T / chunk_size chunks, never over tokens).
`naive_simple_gla` is the token-by-token reference the tests compare it with, outputs and grads.
Both take and return the same shapes: q, k (B, T, H, K); v (B, T, H, V); g (B, T, H);
initial_state / final_state (B, H, K, V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# exp(x) for x below this is a float32 denormal or less; denormals slow CPUs ~4x and contribute
# nothing measurable, so decays are clamped here (their gradient there is ~0 anyway).
MIN_LOG_DECAY = -60.0


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    dtype = v.dtype
    acc = torch.promote_types(dtype, torch.float32)  # accumulate in float32 at least
    pad = (-length) % chunk_size
    if pad:  # zero k, v and g on padding: it neither writes to nor decays the state
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, 0, 0, pad))
    chunks = (length + pad) // chunk_size

    # (B, T, H, D) -> (B, H, N, C, D): heads first, then chunks of C tokens
    def split(x):
        return x.to(acc).reshape(batch, chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    q, k, v = split(q) * scale, split(k), split(v)
    g = g.to(acc).reshape(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)  # (B, H, N, C)
    g_cum = g.cumsum(-1)  # log decay from the chunk's start to each token, inclusive

    # 1. within chunks: o_i += sum_{j<=i} exp(G_i - G_j) (q_i . k_j) v_j
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # clamped above at 0 too: the masked upper triangle would overflow exp, and 0 * inf is NaN in backward
    log_decay = (g_cum[..., :, None] - g_cum[..., None, :]).clamp(min=MIN_LOG_DECAY, max=0.0)
    decay = torch.where(causal, log_decay.exp(), 0.0)  # (B, H, N, C, C)
    scores = (q @ k.transpose(-1, -2)) * decay
    out = scores @ v  # (B, H, N, C, V)

    # 2. what each chunk adds to the state by its end: sum_j exp(G_last - G_j) k_j v_jᵀ
    to_end = (g_cum[..., -1:] - g_cum).clamp(min=MIN_LOG_DECAY).exp()  # (B, H, N, C)
    chunk_states = (k * to_end[..., None]).transpose(-1, -2) @ v  # (B, H, N, K, V)
    chunk_decay = g_cum[..., -1].clamp(min=MIN_LOG_DECAY).exp()  # (B, H, N)

    # 3. across chunks: the state entering chunk n, then its contribution exp(G_i) q_i S
    state = (
        q.new_zeros(batch, heads, key_dim, value_dim)
        if initial_state is None
        else initial_state.to(acc)
    )
    entering = []
    # unbind, not indexing: each indexed slice's backward would fill a full-size zero tensor
    for decay_n, added_n in zip(chunk_decay.unbind(2), chunk_states.unbind(2)):
        entering.append(state)
        state = decay_n[..., None, None] * state + added_n
    entering = torch.stack(entering, dim=2)  # (B, H, N, K, V)
    from_start = g_cum.clamp(min=MIN_LOG_DECAY).exp()[..., None]  # (B, H, N, C, 1)
    out = out + (q * from_start) @ entering

    out = out.permute(0, 2, 3, 1, 4).reshape(batch, chunks * chunk_size, heads, value_dim)
    return out[:, :length].to(dtype), (state if output_final_state else None)


def naive_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference: the recurrence, one token at a time, in float32 (or float64 for float64 inputs)."""
    batch, length, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    acc = torch.promote_types(v.dtype, torch.float32)
    state = (
        q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=acc)
        if initial_state is None
        else initial_state.to(acc)
    )
    outs = []
    for t in range(length):
        o, state = simple_gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=scale)
        outs.append(o)
    return torch.stack(outs, dim=1).to(v.dtype), (state if output_final_state else None)


def simple_gla_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k (B, H, K); v (B, H, V); g (B, H); state (B, H, K, V) in the
    accumulation dtype (float32, or float64). Returns (output (B, H, V) in that dtype, new state)."""
    acc = state.dtype
    decay = g.to(acc).exp()[..., None, None]
    state = decay * state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    out = torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, state)
    return out, state
