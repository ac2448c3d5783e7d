"""Gated linear attention: linear attention with a decay per head, step and key dimension.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_tᵀ      S: (K, V) per head, g_t <= 0: (K,)
    o_t = scale * S_tᵀ q_t

This is GLA (Yang et al., 2023); with g the same for every key dimension it is `simple_gla`.
`chunk_gla` is the training / prefill form, `naive_gla` the token-by-token reference the tests
compare it with (outputs and grads), `gla_step` one decode step. Shapes: q, k, g (B, T, H, K);
v (B, T, H, V); initial_state / final_state (B, H, K, V), in float32 (float64 for float64 inputs).

Why the chunked form is exact and stable: a decay between two tokens is exp(G_i - G_j) with G the
cumulative log decay, a product over K that does not factor into a (query, key) pair of finite
numbers unless both factors are taken relative to a point between the two tokens. So every
exponent here is a difference G_later - G_earlier <= 0:
  - across chunks, relative to chunk boundaries (the recurrent state carries the rest);
  - inside a chunk, between sub-chunks, relative to the start of the query's sub-chunk;
  - inside a sub-chunk, with an explicit (c, c, K) decay tensor (c = 4 tokens).
That is the secondary chunking of flash-linear-attention's GLA kernels, in plain PyTorch. The sizes
(chunks of 16, sub-chunks of 4) were the fastest for training on CPU: the explicit tensor costs c·K
per token, the sub-chunk factors (C / c)·K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xatl.ops.simple_gla import MIN_LOG_DECAY

#: tokens per sub-chunk: the explicit (c, c, K) decay tensor is built for these only
SUB_CHUNK = 4


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Args:
        q, k: (B, T, H, K) queries and keys.
        v: (B, T, H, V) values.
        g: (B, T, H, K) log decay of each step, <= 0.
        scale: query scale; default K ** -0.5.
        initial_state: (B, H, K, V) state before the first token; default zeros.
        output_final_state: return the state after the last token.
        chunk_size: tokens per chunk of the recurrence; a multiple of `SUB_CHUNK` (or less than it).
    Returns:
        (o (B, T, H, V) in v's dtype, final state (B, H, K, V) or None)
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    sub_chunk = min(SUB_CHUNK, chunk_size)
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size must be a multiple of {SUB_CHUNK} or less than it, got {chunk_size}")
    scale = key_dim**-0.5 if scale is None else scale
    dtype = v.dtype
    acc = torch.promote_types(dtype, torch.float32)  # accumulate in float32 at least
    pad = (-length) % chunk_size
    if pad:  # zero k, v and g on padding: it neither writes to nor decays the state
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    chunks = (length + pad) // chunk_size

    # (B, T, H, D) -> (B, H, N, C, D): heads first, then chunks of C tokens
    def split(x):
        return x.to(acc).reshape(batch, chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = split(q) * scale, split(k), split(v), split(g)
    g_cum = g.cumsum(-2)  # (B, H, N, C, K) log decay from the chunk's start to each token, inclusive

    # 1. within chunks: o_i += sum_{j<=i} (q_i . (exp(G_i - G_j) * k_j)) v_j
    out = _intra_chunk_scores(q, k, g_cum, sub_chunk) @ v  # (B, H, N, C, V)

    # 2. what each chunk adds to the state by its end: sum_j (exp(G_last - G_j) * k_j) v_jᵀ
    g_last = g_cum[..., -1:, :]  # (B, H, N, 1, K)
    to_end = (g_last - g_cum).clamp(min=MIN_LOG_DECAY).exp()  # (B, H, N, C, K)
    chunk_states = (k * to_end).transpose(-1, -2) @ v  # (B, H, N, K, V)
    chunk_decay = g_last.clamp(min=MIN_LOG_DECAY).exp().transpose(-1, -2)  # (B, H, N, K, 1)

    # 3. across chunks: the state entering chunk n, then its contribution (exp(G_i) * q_i) S
    state = (
        q.new_zeros(batch, heads, key_dim, value_dim)
        if initial_state is None
        else initial_state.to(acc)
    )
    entering = []
    # unbind, not indexing: indexing's backward would write each chunk's grad into a full-size zero tensor
    for decay, added in zip(chunk_decay.unbind(2), chunk_states.unbind(2), strict=True):
        entering.append(state)
        state = decay * state + added
    entering = torch.stack(entering, dim=2)  # (B, H, N, K, V)
    from_start = g_cum.clamp(min=MIN_LOG_DECAY).exp()  # (B, H, N, C, K)
    out = out + (q * from_start) @ entering

    out = out.permute(0, 2, 3, 1, 4).reshape(batch, chunks * chunk_size, heads, value_dim)
    return out[:, :length].to(dtype), (state if output_final_state else None)


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, g_cum: torch.Tensor, sub_chunk: int) -> torch.Tensor:
    """Decayed causal scores A_ij = sum_d q_id k_jd exp(G_id - G_jd) for j <= i inside each chunk.

    q, k, g_cum: (B, H, N, C, K) with g_cum cumulative from the chunk's start. Returns (B, H, N, C, C).
    """
    *lead, chunk_size, key_dim = q.shape
    subs = chunk_size // sub_chunk

    # (B, H, N, C, K) -> (B, H, N, S, c, K): S sub-chunks of c tokens
    def split(x):
        return x.reshape(*lead, subs, sub_chunk, key_dim)

    q_sub, k_sub, g_sub = split(q), split(k), split(g_cum)

    # 1. diagonal blocks: the (c, c, K) decay between tokens of one sub-chunk
    causal = torch.ones(sub_chunk, sub_chunk, dtype=torch.bool, device=q.device).tril()
    log_decay = g_sub[..., :, None, :] - g_sub[..., None, :, :]  # (B, H, N, S, c, c, K)
    decay = torch.where(causal[..., None], log_decay.clamp(MIN_LOG_DECAY, 0.0).exp(), 0.0)
    diagonal = torch.einsum("...ijk,...jk->...ij", q_sub[..., :, None, :] * decay, k_sub)  # (.., S, c, c)
    # place block s at columns s*c..(s+1)*c of its rows: (.., S, c, S, c) -> (.., C, C)
    eye = torch.eye(subs, dtype=q.dtype, device=q.device)[:, None, :, None]  # (S, 1, S, 1)
    scores = (diagonal[..., :, :, None, :] * eye).reshape(*lead, chunk_size, chunk_size)
    if subs == 1:
        return scores

    # 2. earlier sub-chunks: both factors relative to G at the start of the query's sub-chunk
    start = F.pad(g_sub[..., :-1, -1, :], (0, 0, 1, 0))  # (B, H, N, S, K) G before sub-chunk s
    q_rel = q_sub * (g_sub - start[..., None, :]).clamp(min=MIN_LOG_DECAY).exp()  # (.., S, c, K)
    key_pos = torch.arange(chunk_size, device=q.device)
    earlier = key_pos[None, :] < (torch.arange(subs, device=q.device) * sub_chunk)[:, None]  # (S, C)
    log_to_start = start[..., :, None, :] - g_cum[..., None, :, :]  # (B, H, N, S, C, K)
    to_start = torch.where(earlier[..., None], log_to_start.clamp(MIN_LOG_DECAY, 0.0).exp(), 0.0)
    k_rel = k[..., None, :, :] * to_start  # (B, H, N, S, C, K), zero from the sub-chunk on
    earlier_scores = q_rel @ k_rel.transpose(-1, -2)  # (B, H, N, S, c, C)
    return scores + earlier_scores.reshape(*lead, chunk_size, chunk_size)


def naive_gla(
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
        o, state = gla_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=scale)
        outs.append(o)
    return torch.stack(outs, dim=1).to(v.dtype), (state if output_final_state else None)


def gla_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k, g (B, H, K); v (B, H, V); state (B, H, K, V) in the accumulation
    dtype (float32, or float64). Returns (output (B, H, V) in that dtype, new state)."""
    acc = state.dtype
    decay = g.to(acc).exp()[..., :, None]  # (B, H, K, 1)
    state = decay * state + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    out = torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, state)
    return out, state
