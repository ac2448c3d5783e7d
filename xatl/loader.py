"""The one way a saved model reaches a device: evaluation, training, the teacher and the engine all
load through here, under one device rule.

The rule (`pick_device`): the device asked for, else this process's GPU under torchrun, else
`cuda` when there is one, else the CPU — where denormals are flushed, since long products of decays
underflow into them and slow CPUs severalfold. Callers that want the CPU on a GPU machine say so
(`xatl serve --device cpu`, `xatl generate --device cpu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: `requested`, else this process's GPU (one per process under torchrun),
    else cuda when available, else cpu."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        device = torch.device("cuda", dist.get_node_local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    else:
        torch.set_flush_denormal(True)
    return device


def load_model(model_dir: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               dequantize: bool = False):
    """(model in eval mode on its device, tokenizer) from a folder written by `xatl convert`,
    `xatl train`, `xatl quantize` or `save_pretrained`. `dtype`: None keeps the saved one. A folder
    saved with int8 weights (`xatl.quantization`) loads int8, on the CPU only, unless `dequantize`:
    then its linear layers hold the dequantised weights in `dtype` (float32 by default), to train."""
    from transformers import AutoTokenizer

    return _load_weights(model_dir, device, dtype, dequantize), AutoTokenizer.from_pretrained(model_dir)


def _load_weights(model_dir: str | Path, device, dtype, dequantize: bool = False):
    from transformers import AutoModelForCausalLM

    import xatl  # noqa: F401  (registers model_type "xatl" with the Auto classes, and its int8 format)
    from xatl.quantization import Int8Linear, dequantize_int8

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto")
    if dequantize:
        dequantize_int8(model, dtype or torch.float32)
    device = pick_device(device)
    if device.type != "cpu" and any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError(f"{model_dir} holds int8 weights, which run on the CPU only: load it on the CPU, or "
                         f"dequantised (a precision of fp32 or bf16)")
    return model.to(device).eval()


def load_teacher(source: str | Path, tokenizer: str | None = None, device: str | torch.device | None = None):
    """The donor as an all-attention `XatlForCausalLM` in float32, in eval mode: a saved xatl model
    folder, or any donor `xatl.donors.load_donor` reads (Hugging Face folder, llama2.c `.bin`,
    GGUF), rebuilt by converting it with attention everywhere."""
    from xatl.convert import convert

    path, device = Path(source), pick_device(device)
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "xatl":
        return _load_weights(path, device, torch.float32, dequantize=True)
    teacher = convert(str(source), tokenizer=tokenizer, mixer="attention", transfer="xatl").model
    return teacher.to(device=device, dtype=torch.float32).eval()


__all__ = ["load_model", "load_teacher", "pick_device"]
