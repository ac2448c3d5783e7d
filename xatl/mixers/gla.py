"""Gated linear attention (GLA, Yang et al., 2023): retention whose decay depends on the input.

    S_t = diag(a_t) S_{t−1} + k_t v_tᵀ          S: (head_dim, value_head_dim) per head
    o_t = S_tᵀ q_t / √head_dim

The option `decay` picks the form of a_t:
  - "scalar" (default): one decay per head and step, log a_t = −softplus(W_a x_t + b), run by the
    SSD op `xatl.ops.simple_gla` (Mamba-2's decay on a linear-attention head);
  - "vector": GLA proper, one decay per key dimension from a low-rank projection,
    log a_t = logsigmoid(W_2 W_1 x_t + b) / 16, run by `xatl.ops.gla`.
Both start as retention: W_a = 0 (W_2 = 0) and b set so that head h decays by γ_h = 1 − 2^−e_h,
e_h spread over `decay_range`; training then learns what to keep from that start.

Why scalar by default: the decay between tokens s and t multiplies the whole score q_t·k_s, so
q/k copied from the donor (with its rotary) still score as its attention did, weighted by recency,
whereas a decay per key dimension reweights the two halves of a rotary pair differently and the
score stops depending on t − s alone. It is also the form the tiny-scale reproduction measured best
(../shared/notes/xatl-at-tiny-scale.md), and its chunked op is several times cheaper: its decay
between two tokens is one number, not K of them.

Everything else (rotary, per-head RMSNorm, SiLU output gate, o_proj, padding, state, transfer) is
`RetentionMixer`'s; see xatl/mixers/retention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from xatl.mixers.retention import RetentionMixer, retention_log_decay


class GatedLinearAttention(RetentionMixer):
    """Gated linear attention with a fixed-size state {"recurrent_state": (B, H, K, V)}.

    Args:
        config: the model config, used as by `RetentionMixer`, with `mixer_options["gla"]`:
            num_heads, head_dim, value_head_dim: as retention's (defaults from the attention).
            use_rope: rotary on q and k (default true when the donor uses rotary).
            decay: "scalar" (one data-dependent decay per head) or "vector" (one per key dimension).
            decay_range: [low, high] (default [5, 9]): the decays at init, 1 − 2^−e_h over heads.
            gate_low_rank_dim: rank of the vector decay's projection `gk_proj` (default 16).
            gate_logit_normalizer: divides the vector decay's logsigmoid (default 16).
        layer_idx: index of the layer.
    """

    name = "gla"

    def _build_decay(self, config, options: dict) -> None:
        self.decay = options["decay"]
        if self.decay == "scalar":
            self.gk_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)  # W_a
            self.gk_bias = nn.Parameter(torch.empty(self.num_heads))  # b
        else:
            self.gate_logit_normalizer = float(options["gate_logit_normalizer"])
            rank = options["gate_low_rank_dim"]
            self.gk_proj = nn.Sequential(  # W_2 W_1
                nn.Linear(self.hidden_size, rank, bias=False),
                nn.Linear(rank, self.num_heads * self.head_dim, bias=False),
            )
            self.gk_bias = nn.Parameter(torch.empty(self.num_heads * self.head_dim))  # b

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Log decay of each step: (B, T, H) scalar or (B, T, H, K) vector, in float32 (float64 for
        float64)."""
        batch, length, _ = hidden_states.shape
        acc = torch.promote_types(hidden_states.dtype, torch.float32)
        logits = self.gk_proj(hidden_states).to(acc) + self.gk_bias.to(acc)
        if self.decay == "scalar":
            return -F.softplus(logits)  # (B, T, H)
        log_decay = F.logsigmoid(logits) / self.gate_logit_normalizer
        return log_decay.view(batch, length, self.num_heads, self.head_dim)  # (B, T, H, K)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        log_gamma = retention_log_decay(self.num_heads, self.decay_range)  # (H,) float64
        if self.decay == "scalar":
            # -softplus(b) = log γ  <=>  b = log(expm1(-log γ))
            init.zeros_(self.gk_proj.weight)
            init.copy_(self.gk_bias, torch.log(torch.expm1(-log_gamma)))
        else:
            # logsigmoid(b) / N = log γ  <=>  sigmoid(b) = γ^N  <=>  b = logit(γ^N)
            down, up = self.gk_proj
            init.xavier_uniform_(down.weight, gain=2**-2.5)
            init.zeros_(up.weight)
            log_power = self.gate_logit_normalizer * log_gamma
            bias = log_power - torch.log(-torch.expm1(log_power))
            init.copy_(self.gk_bias, bias.repeat_interleave(self.head_dim))
