"""Multi-scale retention (RetNet, Sun et al., 2023): linear attention with a fixed decay per head.

Per head h, with γ_h = 1 − 2^−e_h fixed and e_h spread evenly over `decay_range` ([5, 9]: memories
of ~22 to ~355 tokens' half-life):

    S_t = γ_h S_{t−1} + k_t v_tᵀ            S: (head_dim, value_head_dim)
    o_t = S_tᵀ q_t / √head_dim

q and k carry rotary embeddings, so q_t·k_s depends on t − s as in the donor's attention. Each
head's output is RMS-normalised (RetNet's group norm; it also absorbs the gap in scale between
linear and softmax attention), gated by swish(g_proj(x)), and projected by o_proj. The chunked form
is `xatl.ops.simple_gla`, decoding its one-token step; the state is {"recurrent_state":
(B, H, head_dim, value_head_dim)} in float32.

Projections use transformers' attention names (`q_proj`, `k_proj`, `v_proj`, `o_proj`; `g_proj` for
the output gate), so a donor's Q/K/V/O map 1:1. `GatedLinearAttention` (xatl/mixers/gla.py) is this
block with a data-dependent decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from xatl.mixers.base import Assignment, Mixer
from xatl.mixers.rotary import apply_rotary, rotary_cos_sin
from xatl.mixers.shared import repeat_kv_heads
from xatl.ops.gla import chunk_gla, gla_step
from xatl.ops.simple_gla import chunk_simple_gla, simple_gla_step

#: rotary base of the mixer's own rotary, for donors without one
DEFAULT_ROPE_THETA = 10000.0


def retention_log_decay(num_heads: int, decay_range, device=None) -> torch.Tensor:
    """log γ_h of RetNet's heads, γ_h = 1 − 2^−e_h with e_h evenly spaced over `decay_range`:
    (num_heads,) float64."""
    low, high = decay_range
    exponents = torch.linspace(low, high, num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-exponents))


class GatedHeadRMSNorm(nn.Module):
    """RMSNorm over each head's values with a weight per channel, then the swish output gate:
    norm(o) * silu(gate), computed in float32 at least."""

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.eps = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """o, gate: (B, T, H, V) -> (B, T, H, V) in o's dtype."""
        dtype = o.dtype
        acc = torch.promote_types(dtype, torch.float32)
        o = o.to(acc)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(acc)
        return (o * F.silu(gate.to(acc))).to(dtype)


class RetentionMixer(Mixer):
    """Multi-scale retention with a fixed-size state {"recurrent_state": (B, H, K, V)}.

    Args:
        config: the model config; uses `hidden_size`, `attention_bias` (biases of q/k/v_proj),
            `attention_out_bias` (of o_proj), `norm_eps`, the rotary fields when
            `position_embedding_type == "rotary"`, and `mixer_options["retention"]`:
            num_heads: heads (default `num_attention_heads`).
            head_dim: query/key size K per head (default the attention's `head_dim`).
            value_head_dim: value size V per head (default the attention's `head_dim`).
            use_rope: rotary on q and k (default true): the donor's rotary dims and base where it
                has rotary, else the whole head with base 10000.
            decay_range: [low, high] (default [5, 9]): head h decays by 1 − 2^−e_h, e_h spread
                evenly from low to high.
        layer_idx: index of the layer.
    """

    name = "retention"
    output_projection = "o_proj"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_options[self.name]  # resolved (and checked) by the config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = options["num_heads"]
        self.head_dim = options["head_dim"]
        self.value_head_dim = options["value_head_dim"]
        self.decay_range = tuple(options["decay_range"])
        self.use_rope = options["use_rope"]
        donor_rotary = config.position_embedding_type == "rotary"
        factor = config.partial_rotary_factor if donor_rotary else 1.0
        self.rotary_dim = int(self.head_dim * factor) // 2 * 2
        self.rope_theta = config.rope_theta if donor_rotary else DEFAULT_ROPE_THETA

        key_size, value_size = self.num_heads * self.head_dim, self.num_heads * self.value_head_dim
        self.q_proj = nn.Linear(self.hidden_size, key_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(self.hidden_size, key_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(self.hidden_size, value_size, bias=config.attention_bias)
        self.g_proj = nn.Linear(self.hidden_size, value_size, bias=False)
        self._build_decay(config, options)
        self.o_norm = GatedHeadRMSNorm(self.num_heads, self.value_head_dim, config.norm_eps)
        self.o_proj = nn.Linear(value_size, self.hidden_size, bias=config.attention_out_bias)
        if self.q_proj.weight.device.type != "meta":
            self.reset_parameters()

    def _build_decay(self, config, options: dict) -> None:
        """Parameters of the decay: none, retention's decay is fixed."""

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Log decay of each step: (B, T, H), the fixed log γ_h, in float32 (float64 for float64)."""
        batch, length, _ = hidden_states.shape
        acc = torch.promote_types(hidden_states.dtype, torch.float32)
        log_gamma = retention_log_decay(self.num_heads, self.decay_range, hidden_states.device)
        return log_gamma.to(acc).expand(batch, length, -1)

    @property
    def rotary(self):
        return (self.rotary_dim, self.rope_theta) if self.use_rope else None

    def forward(self, hidden_states, *, position_ids=None, position_embeddings=None, attention_mask=None, state=None,
                use_cache=False):
        batch, length, _ = hidden_states.shape

        # 1. projections, split into heads
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)  # (B, T, H, K)
        k = self.k_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)  # (B, T, H, K)
        v = self.v_proj(hidden_states).view(batch, length, self.num_heads, self.value_head_dim)  # (B, T, H, V)

        # 2. rotary on q and k at the tokens' absolute positions
        if self.use_rope:
            q, k = self._rotate(q, k, position_ids, position_embeddings, state)

        # 3. log decay of each step: (B, T, H) per head, or (B, T, H, K) per key dimension
        g = self.log_decay(hidden_states)

        # 4. padding writes nothing and decays nothing: the state passes it by unchanged
        if attention_mask is not None:
            keep = attention_mask[:, -length:].to(v.dtype)  # (B, T)
            k = k * keep[:, :, None, None]
            v = v * keep[:, :, None, None]
            g = g * keep.to(g.dtype).view(batch, length, *(1,) * (g.dim() - 2))

        # 5. linear attention: chunked over the tokens, or one recurrent step when decoding
        o, recurrent_state = self._linear_attention(q, k, v, g, state, use_cache)  # (B, T, H, V)

        # 6. per-head RMSNorm, swish output gate, output projection
        gate = self.g_proj(hidden_states).view(batch, length, self.num_heads, self.value_head_dim)
        o = self.o_norm(o, gate).reshape(batch, length, self.num_heads * self.value_head_dim)
        return self.o_proj(o), ({"recurrent_state": recurrent_state} if use_cache else None)

    def _rotate(self, q, k, position_ids, position_embeddings, state):
        if position_ids is None:
            if state is not None:
                raise ValueError(f"{self.name}: position_ids are needed to continue from a state")
            position_ids = torch.arange(q.shape[1], device=q.device)[None]
        cos, sin = rotary_cos_sin(position_ids, self.rotary_dim, self.rope_theta, q.dtype, position_embeddings)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, rotary_dim): broadcast over heads
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _linear_attention(self, q, k, v, g, state, use_cache):
        """A (B, T, H) decay is scalar per head (the SSD op), a (B, T, H, K) one is GLA's."""
        vector = g.dim() == 4
        initial_state = None if state is None else state["recurrent_state"]
        if q.shape[1] == 1 and initial_state is not None:
            step = gla_step if vector else simple_gla_step
            o, new_state = step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], initial_state, scale=self.head_dim**-0.5)
            return o[:, None].to(v.dtype), new_state  # (B, 1, H, V)
        chunk = chunk_gla if vector else chunk_simple_gla
        return chunk(q, k, v, g, initial_state=initial_state, output_final_state=use_cache)

    def reset_parameters(self) -> None:
        # RetNet's small xavier for the input projections; o_proj keeps the skeleton's init, as
        # the attention output it stands in for
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            init.xavier_uniform_(proj.weight, gain=2**-2.5)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if proj.bias is not None:
                init.zeros_(proj.bias)
        init.ones_(self.o_norm.weight)

    def init_from_attention(self, attention, config, *, include_qkv):
        """`o_proj` from W_O; with `include_qkv`, q/k/v_proj from Q/K/V, the key/value heads of a
        grouped-query donor repeated to every query head ("initialised" then)."""
        self._check_transferable(config, include_qkv)
        assignments = [Assignment("o_proj.weight", attention["o_proj.weight"], "copied", ["o_proj.weight"])]
        if "o_proj.bias" in attention and self.o_proj.bias is not None:
            assignments.append(Assignment("o_proj.bias", attention["o_proj.bias"], "copied", ["o_proj.bias"]))
        if not include_qkv:
            return assignments

        kv_heads = config.num_key_value_heads
        for proj, heads in (("q_proj", self.num_heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            names = [f"{proj}.weight"] + ([f"{proj}.bias"] if getattr(self, proj).bias is not None else [])
            assignments += [self._per_head_assignment(n, attention[n], heads) for n in names if n in attention]
        return assignments

    def _per_head_assignment(self, name: str, tensor: torch.Tensor, source_heads: int) -> Assignment:
        """`tensor` (rows in `source_heads` head blocks) as is, or each block repeated for the
        query heads that share it."""
        repeat = self.num_heads // source_heads
        if repeat == 1:
            return Assignment(name, tensor, "copied", [name])
        value = repeat_kv_heads(tensor, source_heads, self.num_heads)  # (H * head_dim[, hidden])
        note = f"each of the {source_heads} key/value heads repeated for its {repeat} query heads"
        return Assignment(name, value, "initialised", [name], note)

    def _check_transferable(self, config, include_qkv: bool) -> None:
        attention_width = config.num_attention_heads * config.head_dim
        value_width = self.num_heads * self.value_head_dim
        if value_width != attention_width:
            raise ValueError(
                f"W_O cannot map onto o_proj: {self.name} options num_heads * value_head_dim "
                f"({value_width}) must equal num_attention_heads * head_dim ({attention_width})"
            )
        wanted = {"num_heads": config.num_attention_heads, "head_dim": config.head_dim,
                  "value_head_dim": config.head_dim}
        wrong = [f"{key}={getattr(self, key)} (needs {value})" for key, value in wanted.items()
                 if getattr(self, key) != value]
        if include_qkv and wrong:
            raise ValueError(f"Q/K/V cannot map onto {self.name} with options {', '.join(wrong)}")
