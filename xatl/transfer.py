"""Cross-architecture transfer: build the target model from a donor's skeleton and a mixer plan,
then set its tensors from the donor according to a transfer mode, and report every tensor's origin.

Modes (the paper's, plus Mamba-in-the-Llama's attention-to-mixer initialisation):
    none             everything random: the from-scratch baseline with the same architecture
    embeddings-only  token (and position) embeddings and the LM head
    xatl-no-oproj    + every norm, MLP and final norm; layers that keep attention get it whole
    xatl             + each mixer's output projection from the attention's W_O
    xatl+qkv         + each mixer's input projections from Q/K/V (mixer-specific, see its
                     `init_from_attention`)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from xatl.config import XatlConfig
from xatl.donors.spec import Donor
from xatl.model import XatlForCausalLM

TRANSFER_MODES = ("none", "embeddings-only", "xatl-no-oproj", "xatl", "xatl+qkv")
#: every entry point's default (`xatl.convert`, `xatl convert`, the pipeline, a job spec): the lowest
#: loss for mamba2, GLA and retention in bench/results/xatl_vs_scratch; Mamba does better with "xatl"
DEFAULT_TRANSFER = "xatl+qkv"

_EMBEDDINGS = re.compile(r"^(model\.embed_tokens\.|model\.embed_positions\.|lm_head\.)")
_SKELETON = re.compile(r"^(model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|mlp)\.|model\.norm\.)")
_MIXER = re.compile(r"^model\.layers\.(\d+)\.mixer\.(.+)$")


def build_target_config(
    donor_config: XatlConfig,
    mixer: str,
    attention_layers: list[int] | tuple[int, ...] = (),
    mixer_options: dict | None = None,
) -> XatlConfig:
    """The donor's skeleton with `mixer` in every layer except `attention_layers`."""
    layers = donor_config.num_hidden_layers
    bad = [i for i in attention_layers if not 0 <= i < layers]
    if bad:
        raise ValueError(
            f"attention layer index {bad[0]} is out of range: the donor has {layers} layers (0..{layers - 1})"
        )
    if len(set(attention_layers)) != len(attention_layers):
        raise ValueError(f"attention layers repeat an index: {list(attention_layers)}")
    plan = ["attention" if i in attention_layers else mixer for i in range(layers)]
    settings = donor_config.to_dict()
    for key in ("layer_mixers", "mixer_options", "architectures", "model_type", "transformers_version"):
        settings.pop(key, None)
    return XatlConfig(**settings, layer_mixers=plan, mixer_options=mixer_options)  # options checked there


@dataclass
class TensorOrigin:
    name: str
    shape: list[int]
    numel: int
    # "copied" (bit-identical to one donor tensor), "initialised" (derived from donor tensors),
    # "set" (a fixed value chosen for the transfer, no donor source: e.g. a pass-through conv),
    # "random" (the mixer's own initialisation) or "tied" (shares another tensor)
    origin: str
    donor_tensors: list[str] = field(default_factory=list)  # canonical donor names
    donor_sources: list[str] = field(default_factory=list)  # as named in the donor checkpoint
    note: str = ""


@dataclass
class TransferReport:
    mode: str
    donor: dict
    target: dict
    tensors: list[TensorOrigin]

    def summary(self) -> dict:
        counted = [t for t in self.tensors if t.origin != "tied"]
        total = sum(t.numel for t in counted)
        by_origin = {o: sum(t.numel for t in counted if t.origin == o)
                     for o in ("copied", "initialised", "set", "random")}
        return {
            "parameters": total,
            **{f"{o}_parameters": n for o, n in by_origin.items()},
            "fraction_copied": by_origin["copied"] / total,
            "fraction_transferred": (by_origin["copied"] + by_origin["initialised"]) / total,
        }

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "donor": self.donor,
            "target": self.target,
            "summary": self.summary(),
            "tensors": [vars(t) for t in self.tensors],
        }


@torch.no_grad()
def transfer_weights(donor: Donor, model: XatlForCausalLM, mode: str) -> TransferReport:
    """Set `model`'s tensors from `donor` as `mode` says; return the report of every tensor."""
    if mode not in TRANSFER_MODES:
        raise ValueError(f"unknown transfer mode {mode!r}; choose one of {', '.join(TRANSFER_MODES)}")
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tied_names(model)
    assigned: dict[str, TensorOrigin] = {}

    def assign(name: str, value: torch.Tensor, origin: str, donor_names: list[str], note: str = ""):
        target = params[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {name}: the model has {tuple(target.shape)}, "
                f"the donor gives {tuple(value.shape)} (from {', '.join(donor_names)})"
            )
        target.copy_(value)
        sources = [donor.origins.get(n, n) for n in donor_names]
        assigned[name] = TensorOrigin(name, list(target.shape), target.numel(), origin, donor_names, sources, note)

    # 1. the shared skeleton: embeddings, norms, MLPs, final norm, head
    for name in params:
        shared = _EMBEDDINGS.match(name) and mode != "none"
        shared = shared or (_SKELETON.match(name) and mode in ("xatl-no-oproj", "xatl", "xatl+qkv"))
        if shared and name not in tied:
            if name not in donor.state_dict:
                raise ValueError(f"the donor has no tensor {name} that the target skeleton needs")
            assign(name, donor.state_dict[name], "copied", [name])

    # 2. the mixers: attention layers whole, linear mixers as their mode allows
    if mode in ("xatl-no-oproj", "xatl", "xatl+qkv"):
        for layer_idx, layer in enumerate(model.model.layers):
            is_attention = model.config.layer_mixers[layer_idx] == "attention"
            if not is_attention and mode == "xatl-no-oproj":
                continue
            attention = donor.attention_weights(layer_idx)
            prefix = f"model.layers.{layer_idx}.mixer."
            for a in layer.mixer.init_from_attention(attention, model.config, include_qkv=mode == "xatl+qkv"):
                kind = a.kind if a.sources else "set"  # nothing came from the donor
                assign(prefix + a.param, a.value, kind, [prefix + s for s in a.sources], a.note)

    # 3. what is left is random (its own init), or tied to a tensor reported above
    tensors = []
    for name, p in params.items():
        if name in tied:
            tensors.append(TensorOrigin(name, list(p.shape), p.numel(), "tied", [], [], f"tied to {tied[name]}"))
        else:
            tensors.append(assigned.get(name) or TensorOrigin(name, list(p.shape), p.numel(), "random"))
    return TransferReport(
        mode=mode,
        donor={"source": donor.source, "model_type": donor.model_type,
               "parameters": sum(t.numel() for t in {id(t): t for t in donor.state_dict.values()}.values()),
               **({"quantization": donor.quantization} if donor.quantization else {})},
        target={"layer_mixers": list(model.config.layer_mixers), "mixer_options": model.config.mixer_options},
        tensors=tensors,
    )


def _tied_names(model: XatlForCausalLM) -> dict[str, str]:
    """Parameter names that share storage with an earlier one (the tied LM head)."""
    seen: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied
