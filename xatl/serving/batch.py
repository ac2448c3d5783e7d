"""The running sequences of a model as one batch: their mixer states stacked on dim 0, one
`decode_step` of the model for all of them per token, rows joining after their own prefill and
leaving at any step.

The batch never reads a state: each layer's mixer joins rows (`pad_state`, `concat_states`) and
keeps them (`select_state`) through the mixer state contract. Linear-cost mixers hold a fixed-size
state per row; a growing state (attention's cache in a hybrid) holds one slot per token, and rows of
different lengths share it left-padded, with a mask saying which slots are real and explicit
positions per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xatl.mixers.base import MixerState
from xatl.model import XatlForCausalLM
from xatl.quantization import Int8Linear


def state_nbytes(state: MixerState | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.values())


#: compiled variants of a model's decode step (one row, rows, states from prefill or step: 3 seen)
VARIANTS_PER_MODEL = 8


class DecodeBatch:
    """Mixer states of the running sequences and the forward that advances them all one token.

    Args:
        model: the model to run, through its `decode_step`.
    """

    def __init__(self, model: XatlForCausalLM):
        self.model = model
        self.mixers = model.mixers
        self.grows = [mixer.state_grows for mixer in self.mixers]
        self.states: list[MixerState | None] = [None] * len(self.mixers)
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) next position of each row
        self.mask = torch.zeros(0, 0, dtype=torch.bool)  # (B, S) real token slots of growing states
        self.device = model.device
        self._step_forward = model.decode_step

    def compile(self, backend: str = "inductor") -> None:
        """Compile the decode step now; the first steps pay for the compilation (see
        `xatl.serving.compiled`, whose `StepCompiler` pays it off the request path instead)."""
        self.use_step(self.compiled_step(backend))

    def compiled_step(self, backend: str = "inductor"):
        """The model's decode step under `torch.compile` (compiled at its first calls), dynamic shapes
        since rows join and leave and attention caches grow."""
        # inductor's C++ wrapper calls the kernels without a Python frame per op; freezing makes the
        # weights constants that it prepacks for oneDNN/MKL (xatl.serving.compiled has the figures),
        # but inductor fails to lower int8 weights frozen, so those stay plain inputs;
        # one compile thread: no pool of compiler processes to outlive a server stopped mid-compile
        int8 = any(isinstance(module, Int8Linear) for module in self.model.modules())
        options = {"cpp_wrapper": True, "freezing": not int8, "compile_threads": 1} if backend == "inductor" else {}
        # this model's variants kept apart from other models' (dynamo otherwise keeps those of every
        # model of the process together: `decode_step` is one function, with one recompile limit)...
        # ...so that guarding the model's modules checks nothing another variant could differ in:
        # skipped, they took ~1 ms of a 10 ms int8 step on an AVX2 machine, evaluated at every step.
        # The engine never changes its model once it serves.
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return torch.compile(self.model.decode_step, backend=backend, dynamic=True, options=options,
                             recompile_limit=VARIANTS_PER_MODEL, isolate_recompiles=True)

    def use_step(self, step) -> None:
        """Decode with `step` (the model's `decode_step` or a compiled one) from the next step on."""
        self._step_forward = step

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    # ---- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, states: list[MixerState | None] | None = None, start: int = 0
    ) -> tuple[torch.Tensor, list[MixerState | None]]:
        """Process one prompt (1, T) in the parallel/chunked form of every mixer, or its next chunk:
        `states` are those after its first `start` tokens (None: a fresh prompt).

        Returns the logits of the last position (1, V) and the per-layer states after these tokens.
        """
        length = input_ids.shape[1]
        position_ids = torch.arange(start, start + length, device=self.device)[None]  # (1, T)
        states = [None] * len(self.mixers) if states is None else states
        return self.model.decode_step(input_ids.to(self.device), states, position_ids)

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed each row its next token (B,); returns the next-token logits (B, V)."""
        mask = None
        if any(self.grows):
            self.mask = F.pad(self.mask, (0, 1), value=True)  # the new token's column: real for all
            mask = None if bool(self.mask.all()) else self.mask.to(self.device)
        position_ids = self.positions[:, None].to(self.device)  # (B, 1)
        # the rotary tables outside the step: inputs of a compiled step, not recomputed inside it
        tables = self.model.model.rotary_tables(position_ids)
        logits, self.states = self._step_forward(
            token_ids[:, None].to(self.device), self.states, position_ids, mask, tables)
        self.positions += 1
        return logits

    # ---- rows join and leave -------------------------------------------------------------------

    def add(self, states: list[MixerState | None], length: int) -> int:
        """Append a prefilled sequence of `length` tokens as the last row; returns its index."""
        if self.size == 0:
            self.states = states
            self.mask = torch.ones(1, length, dtype=torch.bool)
        else:
            columns = self.mask.shape[1]
            width = max(columns, length)  # growing states: left-pad the shorter side to this
            self.states = [
                mixer.concat_states([mixer.pad_state(old, width - columns), mixer.pad_state(new, width - length)])
                for mixer, old, new in zip(self.mixers, self.states, states)
            ]  # (B + 1, ...)
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
        # token slots that are padding for every remaining row are dropped
        first_real = int(mask.any(0).long().argmax())
        self.mask = mask[:, first_real:]
        device_index = index.to(self.device)
        self.states = [
            mixer.select_state(state, device_index, first_real) for mixer, state in zip(self.mixers, self.states)
        ]

    # ---- memory ----------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the batch's states now (attention padding included)."""
        return sum(state_nbytes(s) for s in self.states)

    def sequence_state_bytes(self, states: list[MixerState | None], length: int) -> tuple[int, int]:
        """One sequence's state after `length` tokens, from its prefill states:
        (bytes that stay fixed, bytes added per further token by growing states)."""
        fixed = per_token = 0
        for i, state in enumerate(states):
            if self.grows[i]:
                per_token += state_nbytes(state) // length
            else:
                fixed += state_nbytes(state)
        return fixed, per_token

