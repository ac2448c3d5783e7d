"""`convert`: donor in, linear-cost model out — config, safetensors, tokenizer and transfer report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from xatl.artifacts import TRANSFER_REPORT, write_json_atomic
from xatl.donors import Donor, load_donor
from xatl.mixers import DEFAULT_MIXER
from xatl.model import XatlForCausalLM
from xatl.transfer import DEFAULT_TRANSFER, TransferReport, build_target_config, transfer_weights


@dataclass
class Conversion:
    model: XatlForCausalLM
    tokenizer: PreTrainedTokenizerBase | None
    report: TransferReport
    donor: Donor


def convert(
    donor: str | Donor,
    *,
    mixer: str = DEFAULT_MIXER,
    attention_layers: list[int] | tuple[int, ...] = (),
    transfer: str = DEFAULT_TRANSFER,
    mixer_options: dict | None = None,
    tokenizer: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    out: str | Path | None = None,
) -> Conversion:
    """Build a model with the donor's skeleton and `mixer` in every layer but `attention_layers`,
    transfer weights as `transfer` says (see `xatl.transfer`), and save it to `out` if given.

    The new model takes the donor's dtype unless `dtype` is given, so that copied tensors are
    bit-identical to the donor's. `seed` fixes the random initialisation of what is not copied.
    """
    if isinstance(donor, str | Path):
        donor = load_donor(str(donor), tokenizer=tokenizer)
    config = build_target_config(donor.config, mixer, list(attention_layers), mixer_options)
    dtype = dtype or next(iter(donor.state_dict.values())).dtype
    torch.manual_seed(seed)
    model = XatlForCausalLM(config).to(dtype)
    report = transfer_weights(donor, model, transfer)
    model.eval()
    if out is not None:
        save_conversion(model, donor.tokenizer, report, out)
    return Conversion(model, donor.tokenizer, report, donor)


def save_conversion(model, tokenizer, report: TransferReport, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    write_json_atomic(out / TRANSFER_REPORT, report.to_dict())
    return out


__all__ = ["Conversion", "convert", "save_conversion"]
