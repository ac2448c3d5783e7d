"""llama2.c checkpoints: the legacy (version-0) `.bin` export of karpathy/llama2.c.

Layout, little-endian: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len; a negative vocab_size means the classifier is stored apart from the token
embedding), then float32 arrays, row-major (out, in), in the order of `_layout` below.

llama2.c applies RoPE to interleaved pairs (2i, 2i+1) of each head; `XatlForCausalLM` rotates
halves, so wq/wk rows are permuted per head on load, which leaves the logits unchanged.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from xatl.donors.mapping import Family, InterleavedToHalves
from xatl.donors.spec import DonorError

HEADER = struct.Struct("<7i")
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
VERSIONED_MAGIC = 0x616B3432  # "ak42", the first int32 of llama2.c's version 1 and later exports
PICKLE_STARTS = (b"PK\x03\x04", b"\x80")  # a zip (torch.save) or a bare pickle


def read_header(path: Path) -> dict:
    """The header as a dict of `FIELDS`; raises `DonorError` unless `path` is a legacy llama2.c
    checkpoint whose size matches its header."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    values = HEADER.unpack(head) if len(head) == HEADER.size else ()
    if values and values[0] == VERSIONED_MAGIC:
        raise DonorError(
            f"{path} is a llama2.c version-{values[1]} export; only the legacy version-0 export is "
            "supported (llama2.c: python export.py --version 0)"
        )
    header = dict(zip(FIELDS, values))
    if values and _plausible(header):
        expected = HEADER.size + 4 * sum(math.prod(shape) for _, shape in _layout(header))
        if path.stat().st_size == expected:
            return header
        problem = f"its header {values} implies {expected} bytes, the file has {path.stat().st_size}"
    elif values:
        problem = f"its header {values} describes no model"
    else:
        problem = f"{len(head)} bytes, shorter than the header"
    if head.startswith(PICKLE_STARTS):
        raise DonorError(
            f"{path} looks like a PyTorch pickle, not a llama2.c checkpoint; xatl never unpickles "
            "(it can run arbitrary code): convert it to safetensors in a Hugging Face directory"
        )
    raise DonorError(f"{path} is not a llama2.c checkpoint (or is truncated): {problem}")


def _plausible(h: dict) -> bool:
    positive = all(h[name] > 0 for name in FIELDS if name != "vocab_size") and h["vocab_size"] != 0
    return (
        positive
        and h["dim"] % h["n_heads"] == 0
        and h["n_heads"] % h["n_kv_heads"] == 0
        and (h["dim"] // h["n_heads"]) % 2 == 0
    )


def _layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Arrays in file order; a `{}` name holds all layers stacked on dim 0."""
    dim, hidden, layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    head_dim = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_dim
    return [
        ("tok_embeddings.weight", (vocab, dim)),
        ("layers.{}.attention_norm.weight", (layers, dim)),
        ("layers.{}.attention.wq.weight", (layers, dim, dim)),
        ("layers.{}.attention.wk.weight", (layers, kv_dim, dim)),
        ("layers.{}.attention.wv.weight", (layers, kv_dim, dim)),
        ("layers.{}.attention.wo.weight", (layers, dim, dim)),
        ("layers.{}.ffn_norm.weight", (layers, dim)),
        ("layers.{}.feed_forward.w1.weight", (layers, hidden, dim)),
        ("layers.{}.feed_forward.w2.weight", (layers, dim, hidden)),
        ("layers.{}.feed_forward.w3.weight", (layers, hidden, dim)),
        ("norm.weight", (dim,)),
        ("freqs_cos", (h["seq_len"], head_dim // 2)),
        ("freqs_sin", (h["seq_len"], head_dim // 2)),
        *([("output.weight", (vocab, dim))] if h["vocab_size"] < 0 else []),
    ]


def read_tensors(path: Path, header: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The arrays under llama2.c's own (model.py) names, one per layer."""
    size = path.stat().st_size // 4
    flat = torch.from_file(str(path), shared=False, size=size, dtype=torch.float32)[len(FIELDS):]
    offset = 0
    for name, shape in _layout(header):
        numel = math.prod(shape)
        array = flat[offset:offset + numel].view(shape)
        offset += numel
        if "{}" in name:
            for layer in range(shape[0]):
                yield name.format(layer), array[layer]
        else:
            yield name, array


def read_config(header: dict) -> dict:
    dim, heads = header["dim"], header["n_heads"]
    return {
        "vocab_size": abs(header["vocab_size"]),
        "hidden_size": dim,
        "intermediate_size": header["hidden_dim"],
        "num_hidden_layers": header["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": header["n_kv_heads"],
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "mlp_type": "gated",
        "norm_type": "rmsnorm",
        "norm_eps": 1e-5,
        "position_embedding_type": "rotary",
        "max_position_embeddings": header["seq_len"],
        "rope_theta": 10000.0,
        "tie_word_embeddings": header["vocab_size"] > 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


_LAYER = "model.layers.{}."
WEIGHT_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention_norm.weight": _LAYER + "input_layernorm.weight",
    "layers.{}.attention.wq.weight": InterleavedToHalves(_LAYER + "mixer.q_proj.weight", "num_attention_heads"),
    "layers.{}.attention.wk.weight": InterleavedToHalves(_LAYER + "mixer.k_proj.weight", "num_key_value_heads"),
    "layers.{}.attention.wv.weight": _LAYER + "mixer.v_proj.weight",
    "layers.{}.attention.wo.weight": _LAYER + "mixer.o_proj.weight",
    "layers.{}.ffn_norm.weight": _LAYER + "post_attention_layernorm.weight",
    "layers.{}.feed_forward.w1.weight": _LAYER + "mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": _LAYER + "mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": _LAYER + "mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "freqs_cos": None,  # RoPE table, recomputed by the model
    "freqs_sin": None,
}

FAMILY = Family("llama2c", read_config, WEIGHT_MAP)
