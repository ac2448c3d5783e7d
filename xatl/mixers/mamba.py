"""Mamba (S6): a selective state-space mixer with a diagonal state per channel.

Per inner channel d and state index n, with step size dt_t[d] > 0 and A[d, n] < 0:

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d]
    y_t[d]    = C_t[n] · h_t[d, :] + D[d] x_t[d]

Around the scan: `in_proj` to [x, z], a short causal convolution + SiLU over x, `x_proj` from x to
[dt_low, B, C], `dt_proj` lifting dt_low to one step size per channel, the gate y * silu(z) and
`out_proj`. Parameter names and layout are those of transformers' `MambaMixer`, so checkpoints map
1:1. The scan is `xatl.ops.selective_scan` (a parallel scan on CPU, mamba_ssm's kernels on CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from xatl.mixers import shared
from xatl.mixers.base import Assignment, Mixer
from xatl.ops.selective_scan import selective_scan, selective_state_step

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
except ImportError:
    selective_scan_fn = selective_state_update = None



class MambaMixer(Mixer):
    """Mamba token mixer with a fixed-size state {"conv": (B, intermediate_size, conv_kernel - 1),
    "ssm": (B, intermediate_size, state_size)}.

    Args:
        config: the model config; uses `hidden_size` and `mixer_options["mamba"]`:
            expand: intermediate_size = expand * hidden_size (the channels of the scan).
            state_size: N, the state per channel and the size of B and C.
            time_step_rank: rank of the step-size projection (x_proj -> dt_low -> dt_proj).
            conv_kernel, use_conv_bias: width and bias of the causal convolution.
            use_bias: biases on in_proj and out_proj.
            time_step_min, time_step_max, time_step_floor: range of the initial step sizes
                (log-uniform, floored); time_step_scale, time_step_init_scheme: dt_proj's initial
                weight, uniform in ±scale/sqrt(rank) ("random") or that constant ("constant").
        layer_idx: index of the layer.

    `use_kernels` (default True) lets CUDA inputs run mamba_ssm / causal-conv1d kernels where
    installed; set it to False to force the PyTorch path.
    """

    name = "mamba"
    output_projection = "out_proj"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_options[self.name]  # resolved (and checked) by the config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = round(options["expand"] * config.hidden_size)
        self.state_size = options["state_size"]
        self.time_step_rank = options["time_step_rank"]
        self.conv_kernel = options["conv_kernel"]
        self.time_step_min = options["time_step_min"]
        self.time_step_max = options["time_step_max"]
        self.time_step_floor = options["time_step_floor"]
        self.time_step_scale = options["time_step_scale"]
        self.time_step_init_scheme = options["time_step_init_scheme"]
        self.use_kernels = True

        inner = self.intermediate_size
        self.conv1d = nn.Conv1d(
            inner, inner, self.conv_kernel, groups=inner, padding=self.conv_kernel - 1,
            bias=options["use_conv_bias"],
        )
        self.in_proj = nn.Linear(self.hidden_size, 2 * inner, bias=options["use_bias"])  # [x, z]
        self.x_proj = nn.Linear(inner, self.time_step_rank + 2 * self.state_size, bias=False)  # [dt, B, C]
        self.dt_proj = nn.Linear(self.time_step_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, self.state_size))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, self.hidden_size, bias=options["use_bias"])
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    def forward(self, hidden_states, *, position_ids=None, position_embeddings=None, attention_mask=None, state=None,
                use_cache=False):
        # position_ids are not used: the convolution and the decays carry order.
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        decoding = length == 1 and state is not None
        keep = None if attention_mask is None else attention_mask[:, -length:, None].to(dtype)  # (B, T, 1)

        # 1. gated projection; padding enters as zeros, so the convolution sees it as the zeros
        # before a sequence's start
        if keep is not None:
            hidden_states = hidden_states * keep
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, T, inner) each

        # 2. causal depthwise convolution, then SiLU
        x, conv_state = shared.conv_silu(
            x, self.conv1d, None if state is None else state["conv"], decoding=decoding, use_cache=use_cache,
            use_kernel=self.use_kernels,
        )  # (B, T, inner)

        # 3. input-dependent step sizes and B, C; padding gets dt = 0 and x = 0: the state is
        # neither written nor decayed
        dt, B, C = self.x_proj(x).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        acc = torch.promote_types(dtype, torch.float32)
        dt = F.softplus(self.dt_proj(dt).to(acc))  # (B, T, inner)
        if keep is not None:
            x, dt = x * keep, dt * keep.to(acc)
        A = -torch.exp(self.A_log.to(acc))  # (inner, N), < 0

        # 4. the scan, the skip D x and the gate silu(z)
        initial = None if state is None else state["ssm"]
        if decoding:
            y, ssm_state = self._step(initial, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], z[:, 0])
            y = y[:, None]  # (B, 1, inner)
        else:
            y, ssm_state = self._scan(x, dt, A, B, C, z, initial, use_cache)

        # 5. output projection
        out = self.out_proj(y.to(dtype))
        return out, ({"conv": conv_state, "ssm": ssm_state} if use_cache else None)

    def _scan(self, x, dt, A, B, C, z, initial_state, output_final_state):
        """Over T tokens: y (B, T, inner) and the final state (B, inner, N) or None.
        x, z (B, T, inner); dt (B, T, inner); B, C (B, T, N)."""
        # the op's layout is mamba_ssm's: (B, inner, T) and (B, N, T)
        u, delta, z = (t.transpose(1, 2) for t in (x, dt, z))
        B, C = B.transpose(1, 2), C.transpose(1, 2)
        if initial_state is None and self._kernel_applies(x):  # the kernel starts from a zero state
            u, delta, B, C, z = (t.contiguous() for t in (u, delta.to(x.dtype), B, C, z))
            y, final_state = selective_scan_fn(
                u, delta, A.float(), B, C, self.D.float(), z=z, return_last_state=True
            )
        else:
            y, final_state = selective_scan(
                u, delta, A, B, C, self.D, z=z, initial_state=initial_state, output_final_state=True
            )
        return y.transpose(1, 2), (final_state if output_final_state else None)

    def _step(self, state, x, dt, A, B, C, z):
        """One decode step: x, dt, z (B, inner); B, C (B, N); state (B, inner, N) in float32 (float64
        for float64 inputs). Returns (y (B, inner), new state); the given state is left as it was."""
        if self._kernel_applies(x):
            new_state = state.clone()  # the kernel updates the state in place
            y = selective_state_update(new_state, x, dt.to(x.dtype), A.float(), B, C, self.D.float(), z=z)
            return y, new_state
        return selective_state_step(state, x, dt, A, B, C, D=self.D, z=z)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return shared.kernel_applies(x, self.use_kernels, selective_scan_fn, "Mamba")

    def reset_parameters(self) -> None:
        inner, device = self.intermediate_size, self.A_log.device
        # S4D-real: A[d, n] = -(n + 1), every channel with the same spread of memory lengths
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=device)
        init.copy_(self.A_log, A.log().expand(inner, -1))
        init.ones_(self.D)
        # dt_proj: weight uniform in ±scale/sqrt(rank) (or that constant); bias = softplus⁻¹(dt) with
        # dt log-uniform in [time_step_min, time_step_max], floored
        bound = self.time_step_rank**-0.5 * self.time_step_scale
        if self.time_step_init_scheme == "constant":
            init.constant_(self.dt_proj.weight, bound)
        else:
            init.uniform_(self.dt_proj.weight, -bound, bound)
        init.copy_(self.dt_proj.bias, shared.time_step_bias(
            inner, self.time_step_min, self.time_step_max, self.time_step_floor, device
        ))
        shared.reset_conv_(self.conv1d)

    def init_from_attention(self, attention, config, *, include_qkv):
        """`out_proj` from W_O; with `include_qkv`, Mamba-in-the-Llama's attention-to-mixer map
        adapted to Mamba-1, where B and C are read from x (through `x_proj`) instead of from the
        layer input.

        Inner channel j stands for attention channel j mod (num_attention_heads * head_dim): with
        intermediate_size equal to that width, `out_proj` is W_O itself (copied); otherwise column
        j of `out_proj` is W_O's column j mod width divided by the number of inner channels that
        stand for it, so that channels carrying the same value add up to W_O of it (wider inner
        sizes tile W_O; narrower ones drop W_O's last columns).

        With `include_qkv`:
        - the x rows of `in_proj` are V (key/value heads repeated to every head, then tiled to the
          inner size as above), and the convolution passes the current token through (last tap 1,
          others and bias 0), so that x_t = silu(V h_t);
        - the B and C rows of `x_proj` are the least-squares maps W with W V ≈ K_N and W V ≈ Q_N
          (W = K_N V⁺ through V's pseudo-inverse), where Q_Nᵀ K_N is the best rank-N approximation
          (N = state_size) of the donor's scores summed over heads, Σ_h Q_hᵀ K_h / sqrt(head_dim):
          then C_t·B_s ≈ q_t·k_s summed over heads.
        Limits: only the part of K h and Q h that V's rows span is reached (with grouped-query
        heads V has rank num_key_value_heads * head_dim, often below hidden_size); the fit treats
        silu(V h) as V h (right for large positive inputs, half of it near 0); one rank-N score
        replaces the heads' separate softmax scores, and the rotary embedding has no counterpart.
        z, dt_proj and the dt rows of x_proj keep their init. A donor's q/k biases are dropped.
        """
        width = config.num_attention_heads * config.head_dim
        channel = torch.arange(self.intermediate_size) % width  # attention channel of each inner one
        copies = torch.bincount(channel, minlength=width).clamp(min=1)
        assignments = []
        o_proj = attention["o_proj.weight"]
        notes = []
        if "o_proj.bias" in attention and self.out_proj.bias is None:
            notes.append("o_proj.bias dropped (mamba option use_bias is false)")
        if self.intermediate_size == width:
            assignments.append(Assignment("out_proj.weight", o_proj, "copied", ["o_proj.weight"], "; ".join(notes)))
        else:
            tiled = (o_proj[:, channel] / copies[channel]).to(o_proj.dtype)
            notes.insert(0, f"inner channel j takes W_O column j mod {width}, divided by its number of copies")
            assignments.append(Assignment("out_proj.weight", tiled, "initialised", ["o_proj.weight"], "; ".join(notes)))
        if self.out_proj.bias is not None and "o_proj.bias" in attention:
            assignments.append(Assignment("out_proj.bias", attention["o_proj.bias"], "copied", ["o_proj.bias"]))
        if not include_qkv:
            return assignments

        value = self._per_head(attention["v_proj.weight"], config)[channel]  # (inner, hidden)
        in_proj = self.in_proj.weight.detach().clone()
        in_proj[: self.intermediate_size] = value
        note = "rows [x | z]: x from v_proj (key/value heads repeated, tiled to the inner size); z keeps its init"
        assignments.append(Assignment("in_proj.weight", in_proj, "initialised", ["v_proj.weight"], note))
        if self.in_proj.bias is not None and "v_proj.bias" in attention:
            bias = self.in_proj.bias.detach().clone()
            bias[: self.intermediate_size] = self._per_head(attention["v_proj.bias"][:, None], config)[channel, 0]
            assignments.append(Assignment("in_proj.bias", bias, "initialised", ["v_proj.bias"], "x part from v_proj"))

        query_map, key_map = self._score_factors(attention, config)  # (N, hidden) each
        to_value = torch.linalg.pinv(value.double())  # (hidden, inner)
        x_proj = self.x_proj.weight.detach().clone()
        rank, n = self.time_step_rank, self.state_size
        x_proj[rank : rank + n] = (key_map @ to_value).to(x_proj.dtype)
        x_proj[rank + n :] = (query_map @ to_value).to(x_proj.dtype)
        note = (
            f"rows [dt | B | C]: B, C = rank-{n} factors of the summed q·k scores through V's "
            "pseudo-inverse; dt rows keep their init"
        )
        sources = ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
        assignments.append(Assignment("x_proj.weight", x_proj, "initialised", sources, note))

        return assignments + shared.pass_through_conv(self.conv1d)

    def _score_factors(self, attention, config) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_N, K_N), each (state_size, hidden) in float64, with Q_Nᵀ K_N the best rank-N
        approximation of M = Σ_h Q_hᵀ K_h / sqrt(head_dim), so that hᵀ M h' = Σ_h q_h·k'_h."""
        query = attention["q_proj.weight"].double()
        key = self._per_head(attention["k_proj.weight"], config).double()  # (H * hd, hidden)
        scores = query.T @ key / math.sqrt(config.head_dim)  # (hidden, hidden)
        left, singular, right_t = torch.linalg.svd(scores)
        n = min(self.state_size, singular.numel())
        scale = singular[:n].sqrt()
        query_map = torch.zeros(self.state_size, config.hidden_size, dtype=torch.float64)
        key_map = torch.zeros_like(query_map)
        query_map[:n] = scale[:, None] * left[:, :n].T
        key_map[:n] = scale[:, None] * right_t[:n]
        return query_map, key_map

    @staticmethod
    def _per_head(weight: torch.Tensor, config) -> torch.Tensor:
        return shared.repeat_kv_heads(weight, config.num_key_value_heads, config.num_attention_heads)
