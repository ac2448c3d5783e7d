"""The model card of a pipeline's model: its summary (base, mixers, transfer, training, precision)
and its figures (parameters, validation loss, decode speed and state), from the spec and result."""

from __future__ import annotations

from pathlib import Path

from xatl.artifacts import model_card


def pipeline_card(spec, result) -> str:
    """README.md of the model a pipeline publishes: what was done to which base, and its figures.
    `spec`: its `xatl.pipeline.PipelineSpec`, `result`: its `PipelineResult` (not imported: the
    pipeline imports this module)."""
    convert = spec.convert
    base = convert.donor if convert is not None else spec.base_model
    mixer = convert.mixer if convert is not None else None
    tags = ["xatl", "linear-attention", "cross-architecture-transfer"] + ([mixer] if mixer else [])
    if convert is not None:
        summary = (f"A linear-cost conversion of `{_source_name(base)}`: attention replaced by `{mixer}` mixers"
                   + (f" except in layers {list(convert.attention_layers)}" if convert.attention_layers else "")
                   + f", weights transferred with `{convert.transfer}`")
    else:
        summary = f"`{_source_name(base)}` trained further"
    if result.attention_transfer:
        at = result.attention_transfer
        summary += (f", its mixers then fitted to the donor's attention layer by layer for {at['steps']} steps "
                    f"({at['tokens']:,} tokens)")
    if result.train:
        summary += f", then trained for {result.train['steps']} steps ({result.train['tokens']:,} tokens)"
    if spec.precision != "fp32":
        summary += f", saved with {spec.precision} weights (the figures are float32's where not named)"
    figures = {"weights": _WEIGHTS[spec.precision]}
    if result.transfer:
        figures["parameters"] = result.transfer.get("parameters")
        figures["fraction transferred from the donor"] = result.transfer.get("fraction_transferred")
    if result.evaluation:
        for key in ("valid_loss", f"valid_loss_{spec.precision}", "base_valid_loss", "gap"):
            if key in result.evaluation:
                figures[key.replace("_", " ") + " (nats/token)"] = result.evaluation[key]
    for row in (result.profile or {}).get("model", []):
        if "tokens_per_s" in row:
            figures[f"decode tokens/s at {row['context']} tokens"] = row["tokens_per_s"]
            figures[f"state bytes at {row['context']} tokens"] = row["state_bytes"]
    hub_id = None if Path(base).exists() else base  # the card's base_model names a hub model, not a file
    return model_card(name=spec.name or "xatl model", base_model=hub_id, tags=tags,
                      datasets=list(spec.datasets), summary=summary + ".", figures=figures)


_WEIGHTS = {"fp32": "fp32 (float32)", "bf16": "bf16 (bfloat16)",
            "int8": "int8 (linear layers int8 with a float32 scale per row; embeddings and norms float32; CPU)"}


def _source_name(source: str) -> str:
    """A hub id as it is; a local path by its name alone (a reader elsewhere has no such path)."""
    return Path(source).name if Path(source).exists() else source
