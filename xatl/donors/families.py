"""The donor families, keyed by the `model_type` of the donor's config."""

from __future__ import annotations

from xatl.donors import gpt2, gpt_neox, llama, llama2c
from xatl.donors.mapping import Family
from xatl.donors.spec import DonorError

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (gpt2.FAMILY, gpt_neox.FAMILY, llama.LLAMA, llama.QWEN2, llama.MISTRAL, llama2c.FAMILY)
}


def get_family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise DonorError(
            f"unknown donor model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
