"""The running sequences of a model as one batch: their mixer states stacked on dim 0, one forward
for all of them per decode step, rows joining after their own prefill and leaving at any step.

Every mixer's state is a dict of tensors with the batch on dim 0 (the mixer contract), so rows are
joined with `cat` and dropped with `index_select`, whatever the mixer. Linear-cost mixers hold a
fixed-size state per row. Attention is the one exception: its key/value cache grows along dim 2, and
rows of different lengths share it left-padded, with a mask saying which columns are real and
explicit positions per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xatl.mixers.attention import Attention
from xatl.mixers.base import MixerState
from xatl.model import XatlForCausalLM


def state_nbytes(state: MixerState | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.values())


class DecodeBatch:
    """Mixer states of the running sequences and the forward that advances them all one token.

    Args:
        model: the model to run; its layers are called one by one so that attention layers get
            the padding mask and linear-cost layers none.
    """

    def __init__(self, model: XatlForCausalLM):
        self.model = model
        self.base = model.model
        self.is_attention = [isinstance(layer.mixer, Attention) for layer in self.base.layers]
        self.learned_positions = model.config.position_embedding_type == "learned"
        self.states: list[MixerState | None] = [None] * len(self.base.layers)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) next position of each row
        self.mask = torch.zeros(0, 0, dtype=torch.bool)  # (B, S) real columns of attention caches
        self.device = model.device
        self._step_forward = self._forward

    def compile(self, backend: str = "inductor") -> None:
        """Compile the decode step's forward with `torch.compile` (dynamic shapes, since rows join and
        leave and attention caches grow). Per-token Python overhead dominates small models on a CPU;
        the first steps pay for the compilation (about a minute on a 2-core machine)."""
        # inductor's C++ wrapper calls the kernels without a Python frame per op: ~2x per step here
        options = {"cpp_wrapper": True} if backend == "inductor" else None
        self._step_forward = torch.compile(self._forward, backend=backend, dynamic=True, options=options)

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    # ---- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[MixerState | None]]:
        """Process one prompt (1, T) in the parallel/chunked form of every mixer.

        Returns the logits of the last position (1, V) and the per-layer states after the prompt.
        """
        length = input_ids.shape[1]
        position_ids = torch.arange(length, device=self.device)[None]  # (1, T)
        states: list[MixerState | None] = [None] * len(self.base.layers)
        logits = self._forward(input_ids.to(self.device), position_ids, states, attention_mask=None)
        return logits, states

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,); returns the next-token logits (B, V)."""
        mask = None
        if any(self.is_attention):
            self.mask = F.pad(self.mask, (0, 1), value=True)  # the new token's column: real for all
            mask = None if bool(self.mask.all()) else self.mask.to(self.device)
        position_ids = self.positions[:, None].to(self.device)  # (B, 1)
        logits = self._step_forward(token_ids[:, None].to(self.device), position_ids, self.states, mask)
        self.positions += 1
        return logits

    def _forward(self, input_ids, position_ids, states, attention_mask) -> torch.Tensor:
        """The model's forward, layer by layer, updating `states` in place; last-position logits."""
        hidden_states = self.base.embed_tokens(input_ids)  # (B, T, hidden_size)
        if self.learned_positions:
            hidden_states = hidden_states + self.base.embed_positions(position_ids)
        for i, layer in enumerate(self.base.layers):
            hidden_states, states[i] = layer(
                hidden_states,
                position_ids=position_ids,
                attention_mask=attention_mask if self.is_attention[i] else None,
                state=states[i],
                use_cache=True,
            )
        hidden_states = self.base.norm(hidden_states[:, -1])  # (B, hidden_size)
        return self.model.lm_head(hidden_states)  # (B, V)

    # ---- rows join and leave -------------------------------------------------------------------

    def add(self, states: list[MixerState | None], length: int) -> int:
        """Append a prefilled sequence of `length` tokens as the last row; returns its index."""
        if self.size == 0:
            self.states = states
            self.mask = torch.ones(1, length, dtype=torch.bool)
        else:
            columns = self.mask.shape[1]
            width = max(columns, length)  # attention caches: left-pad the shorter side to this
            for i, state in enumerate(states):
                old = self.states[i]
                if self.is_attention[i]:
                    old = {k: _left_pad(t, width - columns) for k, t in old.items()}
                    state = {k: _left_pad(t, width - length) for k, t in state.items()}
                self.states[i] = {k: torch.cat([old[k], state[k]]) for k in old}  # (B + 1, ...)
            new_row = F.pad(torch.ones(1, length, dtype=torch.bool), (width - length, 0), value=False)
            self.mask = torch.cat([F.pad(self.mask, (width - columns, 0), value=False), new_row])  # (B + 1, width)
        self.positions = torch.cat([self.positions, torch.tensor([length])])
        return self.size - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); the others leave the batch."""
        if rows == list(range(self.size)):
            return
        if not rows:
            self.states = [None] * len(self.states)
            self.positions = self.positions[:0]
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.positions = self.positions[index]
        mask = self.mask[index]
        # attention columns that are padding for every remaining row are dropped
        first_real = int(mask.any(0).long().argmax())
        self.mask = mask[:, first_real:]
        device_index = index.to(self.device)
        for i, state in enumerate(self.states):
            state = {k: t.index_select(0, device_index) for k, t in state.items()}
            if self.is_attention[i] and first_real:
                state = {k: t[:, :, first_real:] for k, t in state.items()}  # (B', Hkv, S - first_real, hd)
            self.states[i] = state

    # ---- memory ----------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the batch's states now (attention padding included)."""
        return sum(state_nbytes(s) for s in self.states)

    def sequence_state_bytes(self, states: list[MixerState | None], length: int) -> tuple[int, int]:
        """One sequence's state after `length` tokens, from its prefill states:
        (bytes that stay fixed, bytes added per further token by attention caches)."""
        fixed = per_token = 0
        for i, state in enumerate(states):
            if self.is_attention[i]:
                per_token += state_nbytes(state) // length
            else:
                fixed += state_nbytes(state)
        return fixed, per_token


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero columns before the cache's first token: (B, Hkv, S, hd) -> (B, Hkv, columns + S, hd)."""
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor
