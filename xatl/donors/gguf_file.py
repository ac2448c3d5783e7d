"""GGUF donors: llama.cpp's single-file format, usually quantised, read through transformers' GGUF
reader (the `gguf` package), which dequantises every tensor to float.

transformers rebuilds the Hugging Face model the file describes (config, weights, tokenizer); its
state dict then goes through the family's weight map like any Hugging Face donor. What this module
adds around that reader:

- the architectures xatl takes, as a table: a file of any other architecture is refused by name,
  before anything is dequantised;
- the file's quantisation (`general.file_type` and the type of each tensor), kept for the transfer
  report, and every origin named by its GGUF tensor (`blk.0.attn_q.weight (Q4_1)`);
- checks where transformers would quietly read something else: RoPE scaling in the metadata, and
  tensors of the file that land nowhere in the model (transformers drops them).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from xatl.donors.spec import DonorError

MAGIC = b"GGUF"
SUFFIX = ".gguf"
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # gguf-split's shards: model-00001-of-00003.gguf

# GGUF `general.architecture` -> gguf-py's name of the tensor-name table. These are the families xatl
# takes that transformers also reads from GGUF (llama.cpp writes Mistral as "llama"; transformers
# tells it apart by `general.name`). GPT-NeoX has no GGUF reader in transformers.
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "gpt2": "GPT2"}


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic, whatever its suffix."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def find_gguf(directory: Path) -> Path | None:
    """The one `.gguf` file of a folder without a `config.json`; None when it holds none."""
    found = sorted(p for p in directory.iterdir() if p.suffix == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:5])
        raise DonorError(f"{directory} holds {len(found)} GGUF files ({names}): pass the one to convert")
    return found[0] if found else None


@dataclass
class GGUFInfo:
    """What xatl reads from a GGUF file itself, before transformers reads the rest."""

    path: Path
    architecture: str
    file_type: str | None  # llama.cpp's name of the file's dominant type, e.g. "MOSTLY_Q4_1"
    tensor_types: dict[str, str]  # GGUF tensor name -> its type ("Q4_1", "F32", ...)
    has_tokenizer: bool

    def quantization(self, dtype) -> dict:
        """The summary that goes into the transfer report; `dtype`: what the tensors became."""
        return {
            "format": "gguf",
            "file": self.path.name,
            "file_type": self.file_type,
            "tensor_types": dict(Counter(self.tensor_types.values()).most_common()),
            "dequantised_to": str(dtype).removeprefix("torch."),
        }


def read_info(path: Path) -> GGUFInfo:
    """Architecture, quantisation and tensor types of a GGUF file; refuses what xatl cannot convert."""
    import gguf

    if _SPLIT.search(path.name):
        raise DonorError(f"{path} is one part of a split GGUF model: merge the parts first "
                         "(llama.cpp: llama-gguf-split --merge FIRST_PART OUT.gguf)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as error:  # what a truncated or corrupt file raises
        raise DonorError(f"cannot read {path} as GGUF: {type(error).__name__}: {error}") from None
    fields = reader.fields

    def field(key: str):
        return fields[key].contents() if key in fields else None

    architecture = field("general.architecture")
    if architecture not in ARCHITECTURES:
        raise DonorError(
            f"{path} holds a GGUF model of architecture {architecture!r}; xatl converts GGUF donors of "
            f"architectures {', '.join(ARCHITECTURES)} (the families it takes that transformers reads "
            "from GGUF): for another, convert the original checkpoint as a Hugging Face directory"
        )
    scaling = field(f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise DonorError(f"{path}: RoPE scaling of type {scaling!r} is not supported (only unscaled RoPE)")
    file_type = field("general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:  # a newer llama.cpp's type this gguf-py does not know
        file_type = str(file_type)
    return GGUFInfo(
        path=path,
        architecture=architecture,
        file_type=file_type,
        tensor_types={t.name: t.tensor_type.name for t in reader.tensors},
        has_tokenizer="tokenizer.ggml.model" in fields,
    )


def read_hf_model(info: GGUFInfo):
    """(transformers config, state dict in float32) as transformers reads the file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = str(info.path.parent), info.path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    except (ValueError, OSError, KeyError, ImportError, NotImplementedError, RuntimeError) as error:
        raise DonorError(f"transformers cannot read {info.path}: {type(error).__name__}: {error}") from None
    return config, model.state_dict()


def read_tokenizer(info: GGUFInfo):
    from transformers import AutoTokenizer

    if not info.has_tokenizer:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name)
    except (ValueError, OSError, KeyError) as error:
        raise DonorError(f"cannot load the tokenizer of {info.path}: {error}") from None


def gguf_names(info: GGUFInfo, hf_names, num_layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> the GGUF tensor it was read from; raises when a tensor of the
    file has no Hugging Face counterpart (transformers would drop it without a word)."""
    import gguf

    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[info.architecture]), num_layers)
    names = {}
    for hf_name in hf_names:
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name in info.tensor_types:
            names[hf_name] = gguf_name
    unused = sorted(set(info.tensor_types) - set(names.values()))
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise DonorError(f"tensor(s) {shown} of {info.path} have no place in the {info.architecture} model "
                         "transformers reads from it")
    return names


def annotate_origins(origins: dict[str, str], names: dict[str, str], info: GGUFInfo) -> dict[str, str]:
    """Origins that name the GGUF tensor and its type before the Hugging Face name it was read as:
    `blk.0.attn_q.weight (Q4_1, dequantised) as model.layers.0.self_attn.q_proj.weight`."""
    annotated = {}
    for canonical, origin in origins.items():
        hf_name, rest = re.match(r"([^\s\[]+)(.*)", origin).groups()
        gguf_name = names.get(hf_name)
        if gguf_name is None:
            annotated[canonical] = origin
        else:
            kind = info.tensor_types[gguf_name]
            how = "" if kind in ("F32",) else ", dequantised"
            annotated[canonical] = f"{gguf_name} ({kind}{how}) as {hf_name}{rest}"
    return annotated
