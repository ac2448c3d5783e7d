"""Donors: read a pretrained transformer into the canonical `Donor` description."""

from xatl.donors.spec import Donor, DonorError

__all__ = ["Donor", "DonorError", "load_donor"]


def load_donor(source: str, *, tokenizer: str | None = None, dtype=None) -> Donor:
    """Read a donor from a local Hugging Face directory (safetensors only), a hub id, a GGUF file
    (or a folder holding one; dequantised to float), or a llama2.c `.bin` checkpoint (with
    `tokenizer` naming its tokenizer `.bin`)."""
    from xatl.donors.loading import load_donor as _load

    return _load(source, tokenizer=tokenizer, dtype=dtype)
