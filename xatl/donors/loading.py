"""Read a donor from where it lives: a local Hugging Face directory (safetensors only), a hub id,
a GGUF file (or a folder holding one, see `xatl.donors.gguf_file`), or a llama2.c `.bin` checkpoint
with its tokenizer `.bin`.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`, ...) are refused and never opened: unpickling
runs whatever code the file holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from xatl.config import XatlConfig
from xatl.donors import gguf_file, llama2c
from xatl.donors.families import get_family
from xatl.donors.llama2c_tokenizer import load_tokenizer as load_llama2c_tokenizer
from xatl.donors.mapping import Family, map_weights
from xatl.donors.spec import Donor, DonorError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt"]
REFUSE_PICKLES = (
    "which xatl never opens because unpickling can run arbitrary code: convert them to safetensors "
    "first (for a checkpoint you trust: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out))"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_donor(source: str, *, tokenizer: str | None = None, dtype: torch.dtype | str | None = None) -> Donor:
    """Read `source` into a `Donor`. `tokenizer`: the tokenizer `.bin` of a llama2.c checkpoint, or
    a tokenizer directory / hub id to use instead of the one beside a Hugging Face or GGUF donor.
    `dtype`: cast floating tensors to it (default: keep the checkpoint's; GGUF: float32)."""
    dtype = _as_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (found := gguf_file.find_gguf(path)) is not None:
            return _from_gguf(found, tokenizer, dtype)
        return _from_directory(path, str(path), tokenizer, dtype)
    if path.is_file():
        if path.suffix == gguf_file.SUFFIX or gguf_file.is_gguf(path):
            return _from_gguf(path, tokenizer, dtype)
        if path.suffix == ".safetensors" or path.name == "config.json":
            raise DonorError(f"{path} is one file of a model: pass the directory that holds it")
        if path.suffix in PICKLE_SUFFIXES and path.suffix != ".bin":  # .bin: llama2.c's suffix too
            raise DonorError(f"{path} is a pickle checkpoint, {REFUSE_PICKLES}")
        return _from_llama2c(path, tokenizer, dtype)
    if path.suffix == gguf_file.SUFFIX:  # not a hub id either
        raise DonorError(f"GGUF file {source} does not exist")
    if _HUB_ID.fullmatch(source):
        return _from_directory(_download(source), source, tokenizer, dtype)
    raise DonorError(f"donor {source} does not exist")


# -- Hugging Face directories -------------------------------------------------------------------


def _from_directory(path: Path, source: str, tokenizer: str | None, dtype) -> Donor:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DonorError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise DonorError(f"{config_file} is not valid JSON: {error}") from None
    family = get_family(hf_config.get("model_type"))
    config = _build_config(family, hf_config, config_file)
    files = _safetensors_files(path)
    state, origins = map_weights(family, _cast(_read_safetensors(files), dtype), config)
    config.dtype = state["model.embed_tokens.weight"].dtype
    return Donor(config, state, _hf_tokenizer(tokenizer or path), family.model_type, source, origins)


def _safetensors_files(path: Path) -> list[Path]:
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / INDEX_FILE).is_file():
        try:
            shards = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as error:
            raise DonorError(f"{path / INDEX_FILE} is not a safetensors index: {error!r}") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise DonorError(f"{path} lacks shard(s) {', '.join(missing)} named by {INDEX_FILE}")
        return [path / name for name in shards]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DonorError(f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}), {REFUSE_PICKLES}")
    raise DonorError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as error:
            raise DonorError(f"cannot read {file}: {error}") from None
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _hf_tokenizer(location: str | Path) -> PreTrainedTokenizerBase | None:
    path = Path(location)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None  # a donor directory without a tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except (OSError, ValueError) as error:
        raise DonorError(f"cannot load the tokenizer from {location}: {error}") from None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # the hub client's many kinds: offline, HTTP, proxy, unknown repo, bad id
        raise DonorError(
            f"donor {repo_id} is no local path, and downloading it from the Hugging Face Hub failed: "
            f"{type(error).__name__}: {error}"
        ) from None


# -- GGUF ----------------------------------------------------------------------------------------


def _from_gguf(path: Path, tokenizer: str | None, dtype) -> Donor:
    info = gguf_file.read_info(path)  # refuses an architecture xatl has no family for, before dequantising
    hf_config, hf_state = gguf_file.read_hf_model(info)
    family = get_family(hf_config.model_type)
    config = _build_config(family, hf_config.to_dict(), path)
    names = gguf_file.gguf_names(info, hf_state, config.num_hidden_layers)
    state, origins = map_weights(family, _cast(iter(hf_state.items()), dtype), config)
    config.dtype = state["model.embed_tokens.weight"].dtype
    tok = _hf_tokenizer(tokenizer) if tokenizer is not None else gguf_file.read_tokenizer(info)
    return Donor(config, state, tok, family.model_type, str(path), gguf_file.annotate_origins(origins, names, info),
                 quantization=info.quantization(config.dtype))


# -- llama2.c ------------------------------------------------------------------------------------


def _from_llama2c(path: Path, tokenizer: str | None, dtype) -> Donor:
    header = llama2c.read_header(path)
    family = get_family("llama2c")
    config = _build_config(family, header, path)
    state, origins = map_weights(family, _cast(llama2c.read_tensors(path, header), dtype), config)
    config.dtype = state["model.embed_tokens.weight"].dtype
    tok = None
    if tokenizer is not None:
        tok = load_llama2c_tokenizer(tokenizer)
        if len(tok) != config.vocab_size:
            raise DonorError(
                f"tokenizer {tokenizer} has {len(tok)} pieces but {path} a vocabulary of {config.vocab_size}"
            )
        tok.model_max_length = config.max_position_embeddings
    return Donor(config, state, tok, family.model_type, str(path), origins)


# -- shared --------------------------------------------------------------------------------------


def _build_config(family: Family, donor_config: dict, where: Path) -> XatlConfig:
    try:
        return XatlConfig(**family.read_config(donor_config))
    except KeyError as missing:
        raise DonorError(f"{where} lacks the field {missing} that a {family.model_type} donor needs") from None
    except DonorError:
        raise
    except (ValueError, TypeError) as error:  # XatlConfig's own checks
        raise DonorError(f"{where} describes no model xatl can build: {error}") from None


def _cast(tensors: Iterator[tuple[str, torch.Tensor]], dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise DonorError(f"dtype must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
    return resolved
