"""Files built on the fly for tests/worker/test_files.py: llama2.c checkpoints and tokenizers,
safetensors files, model folders, archives with whatever members a test wants, armed pickles."""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zipfile
from pathlib import Path

from worker.donor_files import llama2c_checkpoint_bytes

# dim 8, hidden 16, 1 layer, 2 heads, 1 kv head, vocab 260 (shared classifier), seq_len 4
TINY_LLAMA2C = (8, 16, 1, 2, 1, 260, 4)
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def llama2c_checkpoint(path: Path, header=TINY_LLAMA2C, size_change: int = 0) -> Path:
    """A llama2.c checkpoint of zeros; `size_change` bytes added (or cut) after the weights."""
    try:
        size = llama2c_checkpoint_bytes(dict(zip(FIELDS, header)))
    except ZeroDivisionError:  # a header of nonsense: the header alone
        size = 28
    path.write_bytes(struct.pack("<7i", *header) + bytes(max(size - 28 + size_change, 0)))
    return path


def llama2c_tokenizer_bytes(extra_pieces=(" a", "b", " ab")) -> bytes:
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256)), *extra_pieces]
    encoded = [piece.encode("utf-8") for piece in pieces]
    body = b"".join(struct.pack("<fi", -float(i), len(raw)) + raw for i, raw in enumerate(encoded))
    return struct.pack("<i", max(map(len, encoded))) + body


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]] | None = None, *, header_length: int | None = None,
                      cut: int = 0) -> bytes:
    """A safetensors file of zeros: {name: (dtype, shape)}; `header_length` overrides the length
    prefix, `cut` drops bytes from the end."""
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    tensors = tensors if tensors is not None else {"w": ("F32", [2, 3]), "b": ("F16", [3])}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        nbytes = sizes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + bytes(offset)
    return data[: len(data) - cut]


def model_folder_files(model_type: str = "llama", **extra: bytes) -> dict[str, bytes]:
    """The files of a minimal Hugging Face model folder, plus `extra` (name: content)."""
    return {"config.json": json.dumps({"model_type": model_type}).encode(), "model.safetensors": safetensors_bytes(),
            **extra}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_tar(path: Path, files: dict[str, bytes], *, prefix: str = "", special: list[tarfile.TarInfo] = ()) -> Path:
    """A tar (gzipped for .tar.gz/.tgz) of `files` under `prefix`, then the `special` members."""
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in special:
            archive.addfile(info, io.BytesIO(bytes(info.size)) if info.size else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", size: int = 0,
               pax: dict | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    info.pax_headers = pax or {}
    return info


def make_zip(path: Path, files: dict[str, bytes], *, prefix: str = "", mode_bits: dict[str, int] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of `files` under `prefix`; `mode_bits` sets a member's Unix mode (a symlink: 0o120777)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(prefix + name)
            info.compress_type = compression
            if mode_bits and name in mode_bits:
                info.external_attr = mode_bits[name] << 16
            archive.writestr(info, data)
    return path


class PlantsMarker:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class CountingStream:
    """An endless upload: `read(n)` returns up to `n` bytes of `piece` and counts what it gave."""

    def __init__(self, piece: bytes = b"a" * 65536):
        self.piece, self.given = piece, 0

    def read(self, n: int = -1) -> bytes:
        data = self.piece[: n if 0 < n < len(self.piece) else len(self.piece)]
        self.given += len(data)
        return data
