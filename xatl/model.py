"""`XatlForCausalLM`: the donor's skeleton (embeddings, norms, MLPs, final norm, LM head) around a
per-layer plan of token mixers. Reads top-down: norm, MLP, block, cache, model, causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from xatl.config import XatlConfig
from xatl.mixers import Mixer, MixerState, get_mixer_class
from xatl.mixers.rotary import RotaryTables, rotary_tables


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: XatlConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class XatlMLP(nn.Module):
    """`gated`: down(act(gate(x)) * up(x)) (SwiGLU); `plain`: down(act(up(x))) (GPT-2, GPT-NeoX)."""

    def __init__(self, config: XatlConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class XatlDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: norm -> mixer -> residual, norm -> MLP -> residual (or both in parallel)."""

    def __init__(self, config: XatlConfig, layer_idx: int):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = make_norm(config)
        self.mixer = get_mixer_class(config.layer_mixers[layer_idx])(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = XatlMLP(config)

    def forward(self, hidden_states, position_ids=None, attention_mask=None, state=None, use_cache=False,
                position_embeddings=None):
        mixed, state = self.mixer(
            self.input_layernorm(hidden_states), position_ids=position_ids, position_embeddings=position_embeddings,
            attention_mask=attention_mask, state=state, use_cache=use_cache,
        )
        if self.parallel_residual:
            hidden_states = hidden_states + mixed + self.mlp(self.post_attention_layernorm(hidden_states))
        else:
            hidden_states = hidden_states + mixed
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, state


class XatlCache:
    """Per-layer mixer states carried between forward calls (prefill, then one token at a time).

    Duck-types what `generate()` reads of transformers' `Cache`; linear-cost layers hold a
    fixed-size state, attention layers their growing key/value cache.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list[MixerState | None] = [None] * num_layers
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = [
            None if s is None else {k: v.index_select(0, beam_idx.to(v.device)) for k, v in s.items()}
            for s in self.states
        ]

    def nbytes(self) -> int:
        """Bytes held by every state tensor."""
        return sum(t.numel() * t.element_size() for s in self.states if s for t in s.values())


class XatlPreTrainedModel(PreTrainedModel):
    config: XatlConfig
    config_class = XatlConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["XatlDecoderLayer"]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # Every init here goes through transformers.initialization (tensors loaded by from_pretrained
        # are skipped), so no module needs the custom-code shortcut that skips modules without
        # parameters of their own, such as a mixer whose parameters all live in its Linear children.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        # Children are initialised first (Linear, Embedding, norms: transformers' defaults), then
        # each mixer applies its own scheme on top.
        if isinstance(module, Mixer):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class XatlModel(XatlPreTrainedModel):
    def __init__(self, config: XatlConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(XatlDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: XatlCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`hidden_states` (with `output_hidden_states`) holds the embeddings and every layer's
        output before the final norm: `num_hidden_layers + 1` tensors of (B, T, hidden_size)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden_states.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = XatlCache(self.config.num_hidden_layers)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, past, batch, length, hidden_states.device)
        hidden_states = self.add_positions(hidden_states, position_ids)

        position_embeddings = self.rotary_tables(position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            hidden_states, state = layer(
                hidden_states, position_ids=position_ids, position_embeddings=position_embeddings,
                attention_mask=attention_mask, state=state, use_cache=use_cache,
            )
            if use_cache:
                cache.states[i] = state
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        if use_cache:
            cache.seen_tokens += length
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )

    def rotary_tables(self, position_ids: torch.Tensor) -> RotaryTables:
        """cos and sin of `position_ids` (B, T) for each rotary the layers' mixers use, computed once
        for all of them."""
        return rotary_tables(position_ids, sorted({layer.mixer.rotary for layer in self.layers} - {None}))

    def add_positions(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Learned position embeddings added to the token embeddings; rotary is applied in the mixers."""
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        return hidden_states

    @staticmethod
    def _position_ids(attention_mask, past: int, batch: int, length: int, device) -> torch.LongTensor:
        if attention_mask is None:
            return torch.arange(past, past + length, device=device)[None].expand(batch, -1)
        # left padding: positions count real tokens only
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -length:]


class XatlForCausalLM(XatlPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Linear-cost layers keep a recurrent state that cannot be rolled back token by token.
    _is_stateful = True

    def __init__(self, config: XatlConfig):
        super().__init__(config)
        self.model = XatlModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own XatlCache on the first forward with use_cache

    @property
    def mixers(self) -> list[Mixer]:
        """Each layer's mixer, whose state contract (`pad_state`, `concat_states`, `select_state`)
        batches that layer's states."""
        return [layer.mixer for layer in self.model.layers]

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: XatlCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are shifted inside (HF convention); -100 marks positions without loss."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )

    def decode_step(
        self,
        input_ids: torch.LongTensor,
        states: list[MixerState | None],
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: RotaryTables | None = None,
    ) -> tuple[torch.Tensor, list[MixerState | None]]:
        """Advance every row by its tokens: the one step the serving engine runs, for a prompt's
        prefill (states all None, or a chunk after earlier ones) and for decoding (T = 1).

        Args:
            input_ids: (B, T).
            states: each layer's state after the earlier tokens (None: a fresh sequence).
            position_ids: (B, T) absolute positions of these tokens.
            attention_mask: (B, S) real token slots of the growing states (left padding is 0),
                these T included; None when no row is padded. Fixed-size states take no mask.
            position_embeddings: `self.model.rotary_tables(position_ids)`, computed here when not
                given (the engine computes them before a compiled step: see `rotary_tables`).
        Returns:
            the next-token logits of each row's last position (B, V) and each layer's new state.
        """
        if position_embeddings is None:
            position_embeddings = self.model.rotary_tables(position_ids)
        hidden_states = self.model.add_positions(self.model.embed_tokens(input_ids), position_ids)  # (B, T, hidden)
        new_states = []
        for layer, state in zip(self.model.layers, states):
            hidden_states, state = layer(
                hidden_states,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask if layer.mixer.state_grows else None,
                state=state,
                use_cache=True,
            )
            new_states.append(state)
        hidden_states = self.model.norm(hidden_states[:, -1])  # (B, hidden_size)
        return self.lm_head(hidden_states), new_states  # (B, V)


__all__ = ["XatlCache", "XatlForCausalLM", "XatlModel", "XatlPreTrainedModel"]
