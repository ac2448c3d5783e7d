"""`XatlConfig`: the donor's skeleton plus a per-layer plan of token mixers.

The skeleton fields use transformers' names (`hidden_size`, `num_key_value_heads`, ...). The plan is
`layer_mixers`, one mixer name per layer ("attention" keeps the donor's attention; "mamba2",
"mamba", "retention", "gla" replace it), and `mixer_options`, the resolved hyperparameters of each
mixer used (defaults derived from the attention shape, so that Q/K/V/O map onto the mixer).

The config is plain data: it imports nothing of xatl but `xatl.mixer_options` (torch-free, beside
it), which resolves the options once, here; the mixers read them as they are.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from xatl.mixer_options import resolve_mixer_options

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("gated", "plain")
POSITION_TYPES = ("rotary", "learned", "none")


@strict
class XatlConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: the donor's sizes.
        num_attention_heads, num_key_value_heads, head_dim: attention shape (grouped-query when
            `num_key_value_heads < num_attention_heads`); also the default shape of the mixers.
        hidden_act: activation of the MLP (`silu`, `gelu`, `gelu_new`, ...).
        mlp_type: `gated` (gate_proj/up_proj/down_proj, SwiGLU-style) or `plain` (up_proj/down_proj).
        mlp_bias: biases on the MLP projections.
        norm_type: `rmsnorm` or `layernorm` (with bias); `norm_eps` its epsilon.
        position_embedding_type: `rotary` (applied in attention), `learned` (added to the
            embeddings) or `none`.
        rope_theta, partial_rotary_factor: rotary base and the fraction of each head it rotates
            (rotate-half layout; interleaved donors are permuted on load).
        attention_bias / attention_out_bias: biases on q/k/v and on o.
        parallel_residual: `x + attn(ln1(x)) + mlp(ln2(x))` (GPT-NeoX) instead of sequential.
        layer_mixers: one mixer name per layer; `None` means attention everywhere (the donor).
        mixer_options: `{mixer_name: {option: value}}`; missing options get defaults on creation.
    """

    model_type = "xatl"

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    mlp_type: str = "gated"
    mlp_bias: bool = False
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    position_embedding_type: str = "rotary"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    attention_out_bias: bool = False
    parallel_residual: bool = False
    layer_mixers: list[str] | None = None
    mixer_options: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.layer_mixers is None:
            self.layer_mixers = ["attention"] * self.num_hidden_layers
        self._validate_skeleton()
        self.mixer_options = resolve_mixer_options(self, self.mixer_options or {})
        super().__post_init__(**kwargs)

    def _validate_skeleton(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name, allowed in (("norm_type", NORM_TYPES), ("mlp_type", MLP_TYPES),
                              ("position_embedding_type", POSITION_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.position_embedding_type == "rotary" and self.rotary_dim % 2:
            raise ValueError(f"the rotated part of each head ({self.rotary_dim}) must be even")
        if len(self.layer_mixers) != self.num_hidden_layers:
            raise ValueError(
                f"layer_mixers has {len(self.layer_mixers)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )

    @property
    def rotary_dim(self) -> int:
        """Number of leading dimensions of each head that rotary embeddings rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, name in enumerate(self.layer_mixers) if name == "attention"]


__all__ = ["XatlConfig"]
