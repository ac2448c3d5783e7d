"""What every donor family declares, and the one routine that applies it.

A family is a `model_type`, a function from the donor's config dict to `XatlConfig` keyword
arguments, and a weight map: a table from checkpoint names to canonical names (those of
`XatlForCausalLM`), with `{}` standing for the layer index (torchtune/litgpt style). A table value is

- a canonical name template: the tensor is renamed;
- `None`: a buffer the checkpoint carries that the model recomputes (causal masks, `inv_freq`);
- a transform: one checkpoint tensor becomes one or more canonical tensors (fused Q/K/V split,
  Conv1D transposed, interleaved RoPE rows permuted).

`map_weights` applies the table, refuses any checkpoint name the table does not know, then checks
the result against the canonical layout of the config (`spec.canonical_shapes`): every tensor the
model needs is present, none is extra, every shape fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from xatl.config import XatlConfig
from xatl.donors.spec import DonorError, canonical_shapes

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_UNKNOWN = object()  # a checkpoint name the weight map does not know


class Transform:
    """One checkpoint tensor -> canonical tensors. Subclasses set `targets` (name templates) and
    implement `split`, returning, per target, the tensor and how it was taken from the source."""

    targets: tuple[str, ...]

    def split(self, tensor: torch.Tensor, config: XatlConfig) -> list[tuple[torch.Tensor, str]]:
        raise NotImplementedError


@dataclass(frozen=True)
class Transposed(Transform):
    """GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)."""

    target: str

    @property
    def targets(self):
        return (self.target,)

    def split(self, tensor, config):
        return [(tensor.t().contiguous(), " transposed")]


@dataclass(frozen=True)
class SplitThirds(Transform):
    """A fused [q | k | v] tensor (GPT-2 `c_attn`): thirds along `dim`, transposed when the
    source is a Conv1D weight (in, 3 * out)."""

    q: str
    k: str
    v: str
    dim: int
    transpose: bool = False

    @property
    def targets(self):
        return (self.q, self.k, self.v)

    def split(self, tensor, config):
        size = tensor.shape[self.dim]
        if size % 3:
            raise ValueError(f"dimension {self.dim} ({size}) is not three equal parts")
        third = size // 3
        out = []
        for i, part in enumerate(tensor.split(third, dim=self.dim)):
            where = f"[{i * third}:{(i + 1) * third}]" if self.dim == 0 else f"[:, {i * third}:{(i + 1) * third}]"
            if self.transpose:
                out.append((part.t().contiguous(), f"{where} transposed"))
            else:
                out.append((part.contiguous(), where))
        return out


@dataclass(frozen=True)
class SplitPerHead(Transform):
    """GPT-NeoX `query_key_value`: rows interleaved per head as (heads, 3, head_dim), so each head's
    q, k and v rows are adjacent; take part 0, 1, 2 of every head."""

    q: str
    k: str
    v: str

    @property
    def targets(self):
        return (self.q, self.k, self.v)

    def split(self, tensor, config):
        heads, head_dim = config.num_attention_heads, config.head_dim
        if tensor.shape[0] != 3 * heads * head_dim:
            raise ValueError(f"expected {3 * heads * head_dim} rows (3 x {heads} heads x {head_dim})")
        per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])  # (H, 3, hd, [in])
        return [
            (per_head[:, i].reshape(heads * head_dim, *tensor.shape[1:]).contiguous(),
             f" rows as (heads={heads}, 3, head_dim={head_dim})[:, {i}]")
            for i in range(3)
        ]


@dataclass(frozen=True)
class InterleavedToHalves(Transform):
    """Rows of a q/k projection that feeds RoPE on interleaved pairs (2i, 2i+1), reordered per head
    so that rotate-half RoPE computes the same thing: within each head, even rows then odd rows
    (the permutation of transformers' Llama conversion script)."""

    target: str
    heads_field: str  # "num_attention_heads" for q, "num_key_value_heads" for k

    @property
    def targets(self):
        return (self.target,)

    def split(self, tensor, config):
        heads, head_dim = getattr(config, self.heads_field), config.head_dim
        if tensor.shape[0] != heads * head_dim or head_dim % 2:
            raise ValueError(f"expected {heads} heads x {head_dim} rows")
        rows = tensor.reshape(heads, head_dim // 2, 2, *tensor.shape[1:])  # (H, hd/2, pair, [in])
        permuted = rows.transpose(1, 2).reshape(tensor.shape).contiguous()  # (H * hd, [in])
        return [(permuted, " rows permuted per head from interleaved pairs to halves")]


WeightMap = dict[str, "str | Transform | None"]


@dataclass(frozen=True)
class Family:
    """A donor family: its `model_type`, config reader and weight map.

    `base_prefix` is the prefix of the base model's tensors ("transformer." for GPT-2); checkpoints
    saved from the base model class (the hub's `gpt2`) lack it, and are read as if they had it.
    """

    model_type: str
    read_config: Callable[[dict], dict]  # donor config dict -> XatlConfig kwargs
    weight_map: WeightMap
    base_prefix: str = ""


def map_weights(
    family: Family, tensors: Iterator[tuple[str, torch.Tensor]], config: XatlConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical state dict and origins (canonical name -> checkpoint tensor and transform)."""
    state, origins, unknown = {}, {}, []
    for name, tensor in tensors:
        rule, layer = _lookup(family, name)
        if rule is _UNKNOWN:
            unknown.append(name)
            continue
        if rule is None:
            continue
        if isinstance(rule, str):
            parts = [(rule, tensor, "")]
        else:
            try:
                pieces = rule.split(tensor, config)
            except (RuntimeError, ValueError) as error:
                raise DonorError(
                    f"tensor {name} of shape {tuple(tensor.shape)} does not fit the config: {error}"
                ) from None
            parts = [(target, piece, how) for target, (piece, how) in zip(rule.targets, pieces)]
        for template, piece, how in parts:
            canonical = template.format(layer)
            if canonical in state:
                raise DonorError(f"tensors {origins[canonical]} and {name} both give {canonical}")
            state[canonical] = piece
            origins[canonical] = f"{name}{how}"
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DonorError(f"unknown tensor(s) in the {family.model_type} checkpoint: {shown}")
    _tie_head(state, origins, config)
    _check_against_layout(state, origins, config)
    return state, origins


def _lookup(family: Family, name: str):
    """(table value, layer index) for a checkpoint name, or (_UNKNOWN, None)."""
    candidates = [name]
    if family.base_prefix and not name.startswith(family.base_prefix):
        candidates.append(family.base_prefix + name)
    for candidate in candidates:
        match = _LAYER_INDEX.search(candidate)
        template = _LAYER_INDEX.sub(".{}.", candidate, count=1) if match else candidate
        if template in family.weight_map:
            return family.weight_map[template], (match.group(1) if match else None)
    return _UNKNOWN, None


def _tie_head(state: dict, origins: dict, config: XatlConfig) -> None:
    """A tied head is the embedding; a checkpoint that also stores it must store the same values."""
    if not config.tie_word_embeddings or "model.embed_tokens.weight" not in state:
        return
    embedding = state["model.embed_tokens.weight"]
    stored = state.get("lm_head.weight")
    if stored is not None and not torch.equal(stored, embedding):
        raise DonorError(
            f"the config ties the LM head to the embeddings, but {origins['lm_head.weight']} "
            "differs from them"
        )
    state["lm_head.weight"] = embedding
    origins["lm_head.weight"] = f"{origins['model.embed_tokens.weight']} (tied)"


def _check_against_layout(state: dict, origins: dict, config: XatlConfig) -> None:
    expected = canonical_shapes(config)
    missing = [name for name in expected if name not in state]
    if missing:
        raise DonorError(f"the checkpoint lacks tensor(s) the config needs: {', '.join(missing[:5])}")
    extra = [origins[name] for name in state if name not in expected]
    if extra:
        raise DonorError(
            f"tensor(s) {', '.join(extra[:5])} have no place in the model the config describes "
            "(a bias the config turns off?)"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise DonorError(
                f"tensor {origins[name]} has shape {tuple(state[name].shape)}, but the config needs "
                f"{tuple(shape)} for {name}"
            )


# -- reading donor config dicts ------------------------------------------------------------------


def rope_settings(config: dict, *, default_partial: float = 1.0) -> dict:
    """`rope_theta` and `partial_rotary_factor` from either config layout: transformers 5's
    `rope_parameters`, or the older top-level `rope_theta` / `rope_scaling` (GPT-NeoX:
    `rotary_emb_base` / `rotary_pct`). Scaled RoPE (linear, dynamic, YaRN, llama3) is refused."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise DonorError(f"RoPE scaling of type {rope_type!r} is not supported (only unscaled RoPE)")
    theta = params.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0)))
    partial = params.get(
        "partial_rotary_factor",
        config.get("partial_rotary_factor", config.get("rotary_pct", default_partial)),
    )
    return {"rope_theta": float(theta), "partial_rotary_factor": float(partial)}


def special_token_ids(config: dict, vocab_size: int) -> dict:
    """bos/eos/pad ids, without those outside the vocabulary (old configs carry `pad_token_id: -1`,
    which an embedding's `padding_idx` would read as the last token)."""

    def in_vocab(token_id):
        if isinstance(token_id, list):  # several eos ids
            return [i for i in token_id if 0 <= i < vocab_size] or None
        return token_id if token_id is not None and 0 <= token_id < vocab_size else None

    return {key: in_vocab(config.get(key)) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def refuse(config: dict, family: str, settings: dict) -> None:
    """Raise naming the first `setting: value` whose value differs from what `family` supports."""
    for key, supported in settings.items():
        if config.get(key, supported) != supported:
            raise DonorError(
                f"{family} donors with {key}={config[key]!r} are not supported: xatl's attention "
                f"implements only {key}={supported!r}"
            )
