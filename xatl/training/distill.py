"""Distillation from the donor: logit KL and per-layer hidden-state alignment.

The teacher is the donor itself as an all-attention `XatlForCausalLM` (same skeleton, same width
and depth as the student), run in eval mode without gradients.

- Logit KL: KL(teacher ‖ student) of the next-token distributions at temperature τ, scaled by τ²
  so its gradient does not shrink with τ; mixed with the LM loss as (1 − α)·CE + α·KL.
- Hidden-state alignment (MOHAWK stage 2, RADLADS step 1): each student layer is fed the teacher's
  input to that layer and asked to reproduce the teacher's output of that layer. Layers are aligned
  independently, so an early layer's error does not pollute the targets of later ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("kl", "hidden")


def parse_distill(spec: str | None) -> tuple[str, ...]:
    """`"kl"`, `"hidden"`, `"kl,hidden"` or empty/None for no distillation."""
    kinds = tuple(k.strip() for k in (spec or "").split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"distill: unknown kind(s) {unknown}; expected a comma list of {KINDS}")
    return kinds


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · KL(teacher ‖ student), averaged over positions. Logits (B, T, V)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, 1)  # (B*T, V)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_alignment(
    student: nn.Module, teacher_hidden: tuple[torch.Tensor, ...], position_ids: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ‖layer_i(h_i) − h_{i+1}‖² / ‖h_{i+1}‖², with h the teacher's hidden
    states (embeddings, then each layer's output). Relative, so that deep layers with a larger
    residual stream do not outweigh the first ones."""
    layers = student.model.layers
    if len(teacher_hidden) != len(layers) + 1:
        raise ValueError(
            f"teacher gives {len(teacher_hidden) - 1} layers of hidden states, student has {len(layers)}"
        )
    losses = []
    for i, layer in enumerate(layers):
        output, _ = layer(teacher_hidden[i], position_ids=position_ids)
        target = teacher_hidden[i + 1].float()
        losses.append((output.float() - target).square().sum() / target.square().sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


__all__ = ["KINDS", "hidden_alignment", "kl_divergence", "parse_distill"]
