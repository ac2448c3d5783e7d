"""Mamba-2 (SSD): a selective state-space mixer whose scan is linear attention with a scalar decay.

Per head h, with step size dt_t > 0 and A_h < 0:

    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)ᵀ        S: (state_size N, head_dim P)
    y_t = S_tᵀ C_t + D_h x_t

which is `xatl.ops.simple_gla` with q = C, k = B, v = dt x, g = dt A and scale 1. Around the scan:
an input projection to [z, xBC, dt], a short causal convolution + SiLU over xBC = [x, B, C], the
gated output norm(y) * silu(z) (RMSNorm per group of heads) and `out_proj`. Parameter names and
layout are those of transformers' `Mamba2Mixer`, so checkpoints map 1:1; its gate comes before the
norm, norm(y * silu(z)), which `norm_before_gate=False` reproduces.

Why the norm comes before the gate here: a mixer that replaces attention in a pretrained model
must start as a small change to it. A fresh gate is small, silu(z) ≈ z / 2 with z near 0 and of
random sign, and after the norm it keeps the mixer's output small, as the gates of retention, GLA
and Mamba do. Before the norm, the RMSNorm divides that scale out: each group leaves as a vector
of RMS 1 whose signs are the random signs of z, and W_O (copied from the donor) writes it into the
residual stream. On stories260K that write had 2-3x the RMS of the donor's attention output
(0.35-0.96 against 0.15-0.33 per layer) and was unrelated to it; the D skip (D = 1 adds x to y) lifts
y * silu(z) far above the norm's epsilon even with random x, B, C. Step-0 loss on TinyStories text
(uniform guess 6.24, donor with its attention removed 4.88): 7.93 (`xatl`) and 8.80 (`xatl+qkv`)
with the gate before the norm, 4.93 and 4.83 with the norm first; 150 training steps took
`xatl+qkv` to 1.82 instead of 2.27 (GLA 1.82), and training from scratch to 2.64 instead of 2.98.

Mapping from attention (the defaults make the shapes fit): C plays Q, B plays K, x plays V,
`out_proj` plays W_O; one group per head gives every head its own B and C, as attention gives
every head its own query and (shared) key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from xatl.mixers import shared
from xatl.mixers.base import Assignment, Mixer
from xatl.ops.simple_gla import chunk_simple_gla, simple_gla_step

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None



class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU output gate, RMS statistics per group of `group_size` channels, computed
    in float32 at least: norm(y) * silu(z) when `norm_before_gate`, else norm(y * silu(z))
    (transformers' `MambaRMSNormGated`)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float, norm_before_gate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        acc = torch.promote_types(dtype, torch.float32)
        hidden_states, gate = hidden_states.to(acc), F.silu(gate.to(acc))
        if not self.norm_before_gate:
            hidden_states = hidden_states * gate
        groups = hidden_states.unflatten(-1, (-1, self.group_size))  # (..., G, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        hidden_states = self.weight * groups.flatten(-2)
        if self.norm_before_gate:
            hidden_states = hidden_states * gate
        return hidden_states.to(dtype)


class Mamba2Mixer(Mixer):
    """Mamba-2 token mixer with a fixed-size state {"conv": (B, conv_dim, conv_kernel - 1),
    "ssm": (B, num_heads, state_size, head_dim)}.

    Args:
        config: the model config; uses `hidden_size`, `attention_out_bias` (the bias of
            `out_proj`, so that W_O's bias maps) and `mixer_options["mamba2"]`:
            num_heads, head_dim: heads of the scan (inner size = num_heads * head_dim).
            state_size: N, the size of B and C per group.
            n_groups: groups sharing B and C (`num_heads` must be a multiple); also the groups of
                the output norm.
            conv_kernel, use_conv_bias: width and bias of the causal convolution.
            chunk_size: tokens per chunk of the chunked scan.
            time_step_min, time_step_max, time_step_floor: range of the initial step sizes.
            norm_eps: epsilon of the gated RMSNorm.
            norm_before_gate: norm(y) * silu(z) (default true; see the module docstring) or
                norm(y * silu(z)), transformers' `Mamba2Mixer`, for its checkpoints.
        layer_idx: index of the layer.

    `use_kernels` (default True) lets CUDA inputs run mamba_ssm / causal-conv1d kernels where
    installed; set it to False to force the PyTorch path.
    """

    name = "mamba2"
    output_projection = "out_proj"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_options[self.name]  # resolved (and checked) by the config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = options["num_heads"]
        self.head_dim = options["head_dim"]
        self.state_size = options["state_size"]
        self.n_groups = options["n_groups"]
        self.conv_kernel = options["conv_kernel"]
        self.chunk_size = options["chunk_size"]
        self.time_step_min = options["time_step_min"]
        self.time_step_max = options["time_step_max"]
        self.time_step_floor = options["time_step_floor"]
        self.inner_size = self.num_heads * self.head_dim
        self.conv_dim = self.inner_size + 2 * self.n_groups * self.state_size
        self.use_kernels = True

        # [z (inner), xBC (conv_dim), dt (num_heads)]
        self.in_proj = nn.Linear(self.hidden_size, self.inner_size + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim,
            padding=self.conv_kernel - 1, bias=options["use_conv_bias"],
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(
            self.inner_size, self.inner_size // self.n_groups, options["norm_eps"], options["norm_before_gate"]
        )
        self.out_proj = nn.Linear(self.inner_size, self.hidden_size, bias=config.attention_out_bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    def forward(self, hidden_states, *, position_ids=None, position_embeddings=None, attention_mask=None, state=None,
                use_cache=False):
        # position_ids are not used: the convolution and the decays carry order.
        batch, length, _ = hidden_states.shape
        decoding = length == 1 and state is not None
        z, x, B, C, dt, conv_state = self._ssm_inputs(hidden_states, attention_mask, state, use_cache)
        A = -torch.exp(self.A_log.to(dt.dtype))  # (H,), < 0

        # 4. the scan, then the skip D x
        initial = None if state is None else state["ssm"]
        if decoding:
            y, ssm_state = simple_gla_step(
                self._per_head(C)[:, 0], self._per_head(B)[:, 0], x[:, 0] * dt[:, 0, :, None],
                dt[:, 0] * A, initial, scale=1.0,
            )
            y = y[:, None]  # (B, 1, H, P)
        else:
            y, ssm_state = self._scan(x, dt, A, B, C, initial, use_cache)
        y = y.to(dt.dtype) + x.to(dt.dtype) * self.D.to(dt.dtype)[:, None]  # (B, T, H, P)

        # 5. gated norm (in float32 at least) and output projection
        y = self.norm(y.reshape(batch, length, self.inner_size), z)
        out = self.out_proj(y.to(hidden_states.dtype))
        return out, ({"conv": conv_state, "ssm": ssm_state} if use_cache else None)

    def _ssm_inputs(self, hidden_states, attention_mask, state, use_cache):
        """Steps 1-3 of the forward: z (B, T, inner); x (B, T, H, P); B, C (B, T, G, N);
        dt (B, T, H) in float32 (float64 for float64 inputs); the convolution's state after these tokens."""
        batch, length, _ = hidden_states.shape
        keep = None if attention_mask is None else attention_mask[:, -length:, None].to(hidden_states.dtype)

        # 1. input projection; padding enters as zeros (in_proj has no bias)
        if keep is not None:
            hidden_states = hidden_states * keep
        z, xbc, dt = self.in_proj(hidden_states).split([self.inner_size, self.conv_dim, self.num_heads], dim=-1)

        # 2. causal depthwise convolution over [x, B, C], then SiLU
        xbc, conv_state = shared.conv_silu(
            xbc, self.conv1d, None if state is None else state["conv"], decoding=length == 1 and state is not None,
            use_cache=use_cache, use_kernel=self.use_kernels,
        )  # (B, T, conv_dim)
        group_size = self.n_groups * self.state_size
        x, B, C = xbc.split([self.inner_size, group_size, group_size], dim=-1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)  # (B, T, H, P)
        B = B.reshape(batch, length, self.n_groups, self.state_size)  # (B, T, G, N)
        C = C.reshape(batch, length, self.n_groups, self.state_size)  # (B, T, G, N)

        # 3. step sizes dt > 0 (decay exp(dt A) in (0, 1)); padding gets dt = 0: no write, no decay
        acc = torch.promote_types(dt.dtype, torch.float32)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        if keep is not None:
            dt = dt * keep.to(acc)
        return z, x, B, C, dt, conv_state

    def _scan(self, x, dt, A, B, C, initial_state, output_final_state):
        """The chunked SSD over T tokens: y (B, T, H, P) and the final state (B, H, N, P) or None."""
        if self._kernel_applies(x):
            y, final_state = mamba_chunk_scan_combined(
                x, dt, A, B, C, self.chunk_size,
                initial_states=None if initial_state is None else initial_state.transpose(-1, -2),
                return_final_states=True,
            )  # the kernel's states are (B, H, P, N), in C's dtype; ours (B, H, N, P) in float32
            return y, (final_state.transpose(-1, -2).float() if output_final_state else None)
        return chunk_simple_gla(
            self._per_head(C), self._per_head(B), x * dt[..., None], dt * A,
            scale=1.0, initial_state=initial_state, output_final_state=output_final_state,
            chunk_size=self.chunk_size,
        )

    def _per_head(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, T, G, N) -> (B, T, H, N): head h reads group h // (H / G)."""
        return groups.repeat_interleave(self.num_heads // self.n_groups, dim=2)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return shared.kernel_applies(x, self.use_kernels, mamba_chunk_scan_combined, "Mamba-2")

    def reset_parameters(self) -> None:
        heads, device = self.num_heads, self.A_log.device
        # A = -exp(A_log) spread over [-16, -1]: heads that forget at different rates
        init.copy_(self.A_log, torch.empty(heads, device=device).uniform_(1, 16).log())
        # dt log-uniform in [time_step_min, time_step_max], floored; dt_bias = softplus⁻¹(dt)
        init.copy_(self.dt_bias, shared.time_step_bias(
            heads, self.time_step_min, self.time_step_max, self.time_step_floor, device
        ))
        init.ones_(self.D)
        init.ones_(self.norm.weight)
        shared.reset_conv_(self.conv1d)

    def init_from_attention(self, attention, config, *, include_qkv):
        """`out_proj` from W_O; with `include_qkv`, as in Mamba-in-the-Llama, the x / B / C rows of
        `in_proj` from V / K / Q, and a convolution that passes the current token through.

        The donor's rotary embedding has no counterpart here, and SiLU follows the convolution,
        so at init C_t·B_s = silu(q_t)·silu(k_s) without rotation: a linear-attention score with
        the SiLU feature map, weighted by dt_s and the decay between s and t. The pass-through
        convolution (last tap 1, others and bias 0) keeps x, B, C the donor's v, k, q of the same
        token; a random one would blend each with its three predecessors. z and dt keep their
        init. `in_proj` has no bias, so a donor's q/k/v biases (Qwen2) are dropped.
        """
        self._check_transferable(config, include_qkv)
        assignments = [Assignment("out_proj.weight", attention["o_proj.weight"], "copied", ["o_proj.weight"])]
        if "o_proj.bias" in attention:
            assignments.append(Assignment("out_proj.bias", attention["o_proj.bias"], "copied", ["o_proj.bias"]))
        if not include_qkv:
            return assignments

        def per_head(weight):  # (Hkv * P, hidden) -> (H * P, hidden)
            return shared.repeat_kv_heads(weight, config.num_key_value_heads, config.num_attention_heads)

        weight = self.in_proj.weight.detach().clone()
        x_start = self.inner_size
        b_start = x_start + self.inner_size
        c_start = b_start + self.n_groups * self.state_size
        weight[x_start:b_start] = per_head(attention["v_proj.weight"])
        weight[b_start:c_start] = per_head(attention["k_proj.weight"])
        weight[c_start : c_start + self.n_groups * self.state_size] = attention["q_proj.weight"]
        note = (
            "rows [z | x | B | C | dt]: x from v_proj, B from k_proj (key/value heads repeated), "
            "C from q_proj; z and dt rows keep their init"
        )
        dropped = [name for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias") if name in attention]
        if dropped:
            note += f"; {', '.join(dropped)} dropped (in_proj has no bias)"
        sources = ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
        assignments.append(Assignment("in_proj.weight", weight, "initialised", sources, note))

        return assignments + shared.pass_through_conv(self.conv1d)

    def _check_transferable(self, config, include_qkv: bool) -> None:
        attention_width = config.num_attention_heads * config.head_dim
        if self.inner_size != attention_width:
            raise ValueError(
                f"W_O cannot map onto out_proj: mamba2 options num_heads * head_dim ({self.inner_size}) "
                f"must equal num_attention_heads * head_dim ({attention_width})"
            )
        wanted = {"num_heads": config.num_attention_heads, "head_dim": config.head_dim,
                  "state_size": config.head_dim, "n_groups": config.num_attention_heads}
        given = {"num_heads": self.num_heads, "head_dim": self.head_dim,
                 "state_size": self.state_size, "n_groups": self.n_groups}
        wrong = [f"{key}={given[key]} (needs {value})" for key, value in wanted.items() if given[key] != value]
        if include_qkv and wrong:
            raise ValueError(f"Q/K/V cannot map onto mamba2 with options {', '.join(wrong)}")
