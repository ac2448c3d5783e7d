"""What runs leave on disk, and how it appears: file names, atomic writes and publishing, the
model card. Torch-free, so that the service and the worker can read artifacts without it.

A reader must never see half of anything: a file is written beside its final name and renamed
over it (`write_atomic`), and a model folder is built under a hidden temporary name in the
destination's parent and renamed into place (`publish`) — a rename within one file system is
atomic, so a registry listing the parent sees the folder whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

TRANSFER_REPORT = "transfer_report.json"
METRICS_FILE = "metrics.jsonl"
MODEL_CARD = "README.md"
LOSS_CURVE = "loss_curve.png"
RESULT_FILE = "result.json"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(partial, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def write_json_atomic(path: str | Path, value) -> Path:
    return write_atomic(path, json.dumps(value, indent=1) + "\n")


def read_json(path: str | Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def staging_dir(destination: str | Path) -> Path:
    """A fresh hidden folder beside `destination`, to build what `publish` will move there."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    return staging


def publish(source: str | Path, destination: str | Path, *, copy: bool = False) -> Path:
    """Make the folder `source` appear at `destination` in one step.

    `source` is moved (or, with `copy`, copied first into a staging folder beside `destination`,
    so that the final step is a rename on the destination's file system). An existing
    `destination` is an error: published models are not overwritten.
    """
    source, destination = Path(source), Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists already")
    if copy or source.parent.resolve() != destination.parent.resolve():
        staging = staging_dir(destination)
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if not copy:
            shutil.rmtree(source)
        source = staging
    os.rename(source, destination)  # atomic; fails (not overwrites) if destination appeared meanwhile
    return destination


def remove_tree(path: str | Path) -> None:
    """Remove a published folder so that readers never see it half-deleted: rename it to a hidden
    name first, then delete."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.deleted"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_transfer_report(model_dir: str | Path) -> dict:
    """The transfer report saved beside a converted model (as `xatl convert` writes it)."""
    path = Path(model_dir) / TRANSFER_REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {model_dir} a directory written by `xatl convert`?")
    return json.loads(path.read_text())


#: what a transfer report says of a tensor: "copied" (bit-identical to a donor tensor), "initialised"
#: (derived from donor tensors), "set" (a fixed value with no donor source) or "random"
TENSOR_ORIGINS = ("copied", "initialised", "set", "random")


def read_tensor_origins(model_dir: str | Path) -> dict[str, str]:
    """`{tensor name: origin}` from the transfer report beside a converted model.

    The one place that knows the report's layout (`{"tensors": [{"name", "origin", ...}, ...]}`).
    Tied tensors (the LM head tied to the embeddings) are left out: they share the parameter of
    the tensor they are tied to, which is reported under its own name.
    """
    path = Path(model_dir) / TRANSFER_REPORT
    tensors = read_transfer_report(model_dir).get("tensors")
    if not isinstance(tensors, list):
        raise ValueError(f"{path}: expected a 'tensors' list")
    origins = {entry["name"]: entry["origin"] for entry in tensors if entry["origin"] != "tied"}
    unknown = set(origins.values()) - set(TENSOR_ORIGINS)
    if unknown:
        raise ValueError(f"{path}: unknown origin(s) {sorted(unknown)}")
    return origins


#: what `saved_precision` names the float dtypes of config.json
_DTYPE_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}


def saved_precision(model_dir: str | Path) -> str | None:
    """The precision a model folder's weights are saved in, from its config.json: "int8" (xatl's
    `quantization_config`), "fp32" or "bf16" (its dtype; another float dtype by its name); None
    without a config."""
    config = read_json(Path(model_dir) / "config.json")
    if not isinstance(config, dict):
        return None
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        return quantization.get("weights", "int8") if quantization.get("quant_method") == "xatl" else \
            str(quantization.get("quant_method"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return _DTYPE_PRECISIONS.get(dtype, dtype)


def model_card(*, name: str, base_model: str | None, tags: list[str], datasets: list[str], summary: str,
               figures: dict | None = None) -> str:
    """A Hugging Face model card: YAML front matter, then what the model is and what was measured."""
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines.append("library_name: transformers")
    lines.append("tags:")
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    if datasets:
        lines.append("datasets:")
        lines += [f"- {json.dumps(d)}" for d in datasets]
    lines += ["---", "", f"# {name}", "", summary.strip(), ""]
    if figures:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in figures.items()]
        lines.append("")
    lines += ["Load it with transformers after `import xatl` (which registers the `xatl` model type):", "",
              "```python", "import xatl", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


__all__ = [
    "LOSS_CURVE", "METRICS_FILE", "MODEL_CARD", "RESULT_FILE", "TENSOR_ORIGINS", "TRANSFER_REPORT", "model_card",
    "publish", "read_json", "read_tensor_origins", "read_transfer_report", "remove_tree", "saved_precision",
    "staging_dir", "write_atomic", "write_json_atomic",
]
