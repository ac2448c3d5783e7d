"""The contract every token mixer keeps, so that the model, the transfer and the engine can treat
attention, Mamba, Mamba-2, retention and GLA alike.

A mixer maps `(B, T, hidden_size) -> (B, T, hidden_size)`. Its recurrent state is a dict of tensors
with the batch on dim 0; for every linear-cost mixer each tensor has a fixed size, whatever the
number of tokens seen (attention's key/value cache is the one that grows).

The state contract: states are opaque to everyone but their mixer. Whoever batches sequences (the
serving engine) joins rows with `concat_states` after `pad_state` (growing states are left-padded
to one width), and keeps rows with `select_state`; it never reads a state's layout. Options come
resolved in `config.mixer_options[name]` (see `xatl.mixer_options`); mixers check them no more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from xatl.config import XatlConfig
    from xatl.mixers.rotary import RotaryTables

MixerState = dict[str, torch.Tensor]


@dataclass
class Assignment:
    """One tensor of a mixer set from the donor's attention weights.

    `kind` is "copied" when `value` is bit-identical to the single donor tensor in `sources`,
    "initialised" when it is derived from them (sliced, expanded for grouped-query heads, composed).
    """

    param: str  # name relative to the mixer, e.g. "out_proj.weight"
    value: torch.Tensor
    kind: str  # "copied" | "initialised"
    sources: list[str]  # attention tensor names relative to the layer's attention, e.g. "o_proj.weight"
    note: str = ""


class Mixer(nn.Module):
    """Base class of the token mixers. Subclasses set `name` and implement the methods below."""

    name: ClassVar[str]
    #: parameter of the mixer that plays W_O's role (copied in `xatl` transfer mode)
    output_projection: ClassVar[str]
    #: whether the state grows with the tokens seen (attention's cache: one column per token, left
    #: padding masked) or keeps one size (every linear-cost mixer)
    state_grows: ClassVar[bool] = False

    @property
    def rotary(self) -> tuple[int, float] | None:
        """(rotary_dim, rope_theta) of the rotary embedding on q and k, or None for a mixer without."""
        return None

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        position_embeddings: RotaryTables | None = None,
        attention_mask: torch.Tensor | None = None,
        state: MixerState | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, MixerState | None]:
        """
        Args:
            hidden_states: (B, T, hidden_size), already normalised.
            position_ids: (B, T) absolute positions of these tokens (for rotary mixers).
            position_embeddings: the rotary tables of these positions, computed once for every
                layer (`xatl.mixers.rotary.rotary_tables`); a rotary mixer computes its own when
                they lack its `rotary`.
            attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding, over every
                token seen so far, these T included (S = tokens in `state` + T); None = no padding.
            state: this layer's state after the earlier tokens; None starts a fresh sequence.
            use_cache: return the state after the last of these tokens.
        Returns:
            (output (B, T, hidden_size), new state or None)
        """
        raise NotImplementedError

    # ---- the state contract: how batches of states are built (the serving engine's only view) ----

    def pad_state(self, state: MixerState, columns: int) -> MixerState:
        """`state` with `columns` empty token slots before its first token, so that rows of different
        lengths share one batch (their `attention_mask` marks the slots as padding). A fixed-size
        state has no token slots: it is returned as it is."""
        return state

    def concat_states(self, states: Sequence[MixerState]) -> MixerState:
        """The rows of `states` (padded to one width) as one batch, in this order."""
        return {key: torch.cat([state[key] for state in states]) for key in states[0]}

    def select_state(self, state: MixerState, rows: torch.Tensor, drop_columns: int = 0) -> MixerState:
        """Only `rows` (indices on dim 0, in this order), without the first `drop_columns` token slots
        (padding that no remaining row needs; fixed-size states have none)."""
        return {key: tensor.index_select(0, rows) for key, tensor in state.items()}

    def init_from_attention(
        self, attention: dict[str, torch.Tensor], config: XatlConfig, *, include_qkv: bool
    ) -> list[Assignment]:
        """Tensors of this mixer set from a donor attention layer (`q_proj.weight`, `k_proj.weight`,
        `v_proj.weight`, `o_proj.weight`, biases where the donor has them). Always the output
        projection from `o_proj`; with `include_qkv` also the mixer's projections from Q/K/V."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Mixer-specific initialisation, written with `transformers.initialization` so that
        tensors loaded by `from_pretrained` are left alone. Runs after its submodules' defaults."""
