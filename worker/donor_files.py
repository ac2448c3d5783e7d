"""Checks of donor files, read as bytes and never loaded: llama2.c checkpoints and tokenizers,
GGUF files, safetensors files and Hugging Face model folders. Pickles are refused, never unpickled.

The llama2.c checks mirror what `xatl/donors/llama2c.py` and `llama2c_tokenizer.py` accept (they
import torch, which this module must not); tests/worker/test_files.py holds the two to agreement.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from pathlib import Path

from worker.archives import CappedReader
from worker.file_policy import FileRejected, readable_size

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PROTOCOL_OPCODE = 0x80  # PROTO: the first byte of every pickle of protocol 2 and later
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip holding data.pkl
MAX_ZIP_DIRECTORY = 64 << 20
NEVER_UNPICKLED = (
    "xatl never unpickles (it can run arbitrary code): convert the weights to safetensors and upload "
    "a Hugging Face folder without the pickle"
)

# -- llama2.c checkpoints ----------------------------------------------------------------------

LLAMA2C_HEADER = struct.Struct("<7i")
LLAMA2C_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
LLAMA2C_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's version-1 and later exports
# far above any llama2.c export, so that only nonsense is refused by them
LLAMA2C_MAXIMA = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
                  "n_kv_heads": 1 << 10, "vocab_size": 1 << 21, "seq_len": 1 << 21}


def check_llama2c_checkpoint(path: Path) -> dict:
    """The header of a legacy (version-0) llama2.c checkpoint as `{"dim", "hidden_dim", "n_layers",
    "n_heads", "n_kv_heads", "vocab_size", "seq_len", "shared_classifier"}`; `FileRejected` unless
    the header describes a model and the file has exactly the float32 weights it implies."""
    path = Path(path)
    problem, details = _llama2c_checkpoint_problem(path)
    if problem:
        refuse_pickle(path)
        raise FileRejected(f"{path.name} is not a llama2.c checkpoint: {problem}", code="invalid_llama2c")
    return details


def _llama2c_checkpoint_problem(path: Path) -> tuple[str | None, dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(LLAMA2C_HEADER.size)
    if len(head) < LLAMA2C_HEADER.size:
        return f"{size} bytes, shorter than the {LLAMA2C_HEADER.size}-byte header", {}
    values = LLAMA2C_HEADER.unpack(head)
    if values[0] == LLAMA2C_VERSIONED_MAGIC:
        return (f"a llama2.c version-{values[1]} export; only the legacy version-0 export is supported "
                "(llama2.c: python export.py --version 0)"), {}
    header = dict(zip(LLAMA2C_FIELDS, values))
    if not _plausible_llama2c(header):
        return f"its header {values} describes no model", {}
    expected = llama2c_checkpoint_bytes(header)
    if size != expected:
        return f"its header {values} implies {expected} bytes, the file has {size} (truncated?)", {}
    return None, {**header, "vocab_size": abs(header["vocab_size"]), "shared_classifier": header["vocab_size"] > 0}


def _plausible_llama2c(h: dict) -> bool:
    if not all(0 < abs(h[name]) <= LLAMA2C_MAXIMA[name] for name in LLAMA2C_FIELDS):
        return False
    if any(h[name] < 0 for name in LLAMA2C_FIELDS if name != "vocab_size"):
        return False
    return h["dim"] % h["n_heads"] == 0 and h["n_heads"] % h["n_kv_heads"] == 0 and (h["dim"] // h["n_heads"]) % 2 == 0


def llama2c_checkpoint_bytes(h: dict) -> int:
    """The size of the file a llama2.c header describes: the header, then float32 arrays."""
    dim, hidden, layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
    head_dim = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_dim
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim  # norms, wq wo, wk wv, ffn
    floats = (vocab * dim + layers * per_layer + dim + 2 * h["seq_len"] * (head_dim // 2)
              + (vocab * dim if h["vocab_size"] < 0 else 0))  # the RoPE tables; the unshared classifier
    return LLAMA2C_HEADER.size + 4 * floats


# -- llama2.c tokenizers -----------------------------------------------------------------------

PIECE_HEADER = struct.Struct("<fi")  # score, byte length
SPECIAL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
MAX_PIECES = 1 << 21
MAX_PIECE_BYTES = 1 << 16


def check_llama2c_tokenizer(path: Path) -> dict:
    """`{"vocab_size", "max_token_length"}` of a llama2.c tokenizer `.bin`; `FileRejected` unless
    the pieces parse, are UTF-8, unique, and ids 3..258 are the byte pieces <0x00>..<0xFF>."""
    path = Path(path)
    problem, details = _llama2c_tokenizer_problem(path)
    if problem:
        refuse_pickle(path)
        raise FileRejected(f"{path.name} is not a llama2.c tokenizer: {problem}", code="invalid_llama2c")
    return details


def _llama2c_tokenizer_problem(path: Path) -> tuple[str | None, dict]:
    pieces: set[str] = set()
    byte_pieces = []
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            return "shorter than its 4-byte header", {}
        offset = 4
        while entry := f.read(PIECE_HEADER.size):
            if len(entry) < PIECE_HEADER.size:
                return f"the file ends inside the piece at byte {offset}", {}
            score, length = PIECE_HEADER.unpack(entry)
            if not 0 <= length <= MAX_PIECE_BYTES or not math.isfinite(score):
                return f"the piece at byte {offset} has length {length} and score {score}", {}
            raw = f.read(length)
            if len(raw) < length:
                return f"the file ends inside the piece at byte {offset}", {}
            try:
                piece = raw.decode("utf-8").replace(" ", "▁")
            except UnicodeDecodeError:
                return f"the piece at byte {offset} is not UTF-8", {}
            if piece in pieces:
                return f"the piece {piece!r} appears twice", {}
            if SPECIAL_PIECES <= len(pieces) < SPECIAL_PIECES + 256:
                byte_pieces.append(piece)
            pieces.add(piece)
            if len(pieces) > MAX_PIECES:
                return f"more than {MAX_PIECES} pieces", {}
            offset += PIECE_HEADER.size + length
    if len(pieces) <= SPECIAL_PIECES + 256 or byte_pieces != BYTE_PIECES:
        return "ids 3..258 must be the byte pieces <0x00>..<0xFF>, followed by merged pieces", {}
    return None, {"vocab_size": len(pieces), "max_token_length": struct.unpack("<i", head)[0]}


def check_llama2c(path: Path) -> tuple[str, dict]:
    """A donor `.bin`: ("llama2c_checkpoint" | "llama2c_tokenizer", details), else `FileRejected`
    (`pickle_refused` for a torch.save file or a bare pickle)."""
    path = Path(path)
    checkpoint_problem, details = _llama2c_checkpoint_problem(path)
    if not checkpoint_problem:
        return "llama2c_checkpoint", details
    tokenizer_problem, details = _llama2c_tokenizer_problem(path)
    if not tokenizer_problem:
        return "llama2c_tokenizer", details
    # only now: a llama2.c header of dim 128 starts with the byte a pickle starts with
    refuse_pickle(path)
    raise FileRejected(
        f"{path.name} is neither a llama2.c checkpoint ({checkpoint_problem}) nor a llama2.c tokenizer "
        f"({tokenizer_problem})",
        code="invalid_llama2c",
    )


# -- pickles -----------------------------------------------------------------------------------


def pickle_problem(path: Path) -> str | None:
    """Why `path` looks like a pickle (by its first bytes; nothing is unpickled), else None."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == bytes([PICKLE_PROTOCOL_OPCODE]):
        return "starts with the pickle protocol opcode 0x80: it is a pickle"
    if head == ZIP_MAGIC:
        too_large = FileRejected(
            f"{path.name} is a zip whose directory is over {readable_size(MAX_ZIP_DIRECTORY)}: too large to check "
            f"for pickles; {NEVER_UNPICKLED}",
            code="pickle_refused",
        )
        try:
            with open(path, "rb") as raw, zipfile.ZipFile(
                CappedReader(raw, max_read=MAX_ZIP_DIRECTORY, big_read=too_large)
            ) as archive:
                names = archive.namelist()  # the directory only: nothing is decompressed
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
            return None
        pickled = [name for name in names if name.endswith(".pkl")]
        if pickled:
            return f"is a torch.save zip holding {pickled[0]}, a pickle"
    return None


def refuse_pickle(path: Path, shown_as: str | None = None) -> None:
    problem = pickle_problem(path)
    if problem:
        raise FileRejected(f"{shown_as or path.name} {problem}; {NEVER_UNPICKLED}", code="pickle_refused")


# -- GGUF --------------------------------------------------------------------------------------


def check_gguf(path: Path) -> dict:
    """`{"version", "tensor_count", "metadata_kv_count"}` of a GGUF file (its magic and header only)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        refuse_pickle(path)
        raise FileRejected(f"{path.name} is not a GGUF file: it does not start with 'GGUF'", code="invalid_gguf")
    version = struct.unpack_from("<I", head, 4)[0] if len(head) >= 8 else None
    if version not in (1, 2, 3):
        raise FileRejected(f"{path.name}: unsupported GGUF version {version} (expected 1 to 3)", code="invalid_gguf")
    counts = struct.Struct("<II" if version == 1 else "<QQ")
    if len(head) < 8 + counts.size:
        raise FileRejected(f"{path.name} is a truncated GGUF file ({len(head)} bytes)", code="invalid_gguf")
    tensors, metadata = counts.unpack_from(head, 8)
    return {"version": version, "tensor_count": tensors, "metadata_kv_count": metadata}


# -- safetensors -------------------------------------------------------------------------------

MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def check_safetensors(path: Path, shown_as: str | None = None) -> dict:
    """`{"tensors": n}`; `FileRejected` unless the header is sane JSON and its tensors tile the data
    exactly, as the safetensors library requires (so a truncated file is refused here)."""
    path = Path(path)
    name = shown_as or path.name

    def refuse(problem: str) -> FileRejected:
        return FileRejected(f"{name} is not a valid safetensors file: {problem}", code="invalid_safetensors")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise refuse(f"{size} bytes, shorter than the 8-byte header length")
        header_bytes = struct.unpack("<Q", prefix)[0]
        if header_bytes > MAX_SAFETENSORS_HEADER:
            raise refuse(f"a header length of {header_bytes} bytes, over the limit of {MAX_SAFETENSORS_HEADER}")
        if 8 + header_bytes > size:
            raise refuse(f"a header length of {header_bytes} bytes in a file of {size} (truncated?)")
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    data_bytes = size - 8 - header_bytes
    spans = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise refuse("__metadata__ must map names to strings")
            continue
        spans.append((*_tensor_span(tensor, info, data_bytes, refuse), tensor))
    position = 0
    for begin, end, tensor in sorted(spans):
        if begin != position:
            raise refuse(f"tensor {tensor!r} starts at byte {begin} of the data, not at {position} where the previous "
                         "one ends (tensors overlap or leave a gap)")
        position = end
    if position != data_bytes:
        raise refuse(f"{data_bytes - position} bytes follow the last tensor")
    return {"tensors": len(spans)}


def _tensor_span(tensor: str, info, data_bytes: int, refuse) -> tuple[int, int]:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BITS:
        raise refuse(f"tensor {tensor!r} has no known dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise refuse(f"tensor {tensor!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))
            and offsets[0] <= offsets[1]):
        raise refuse(f"tensor {tensor!r} has data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_bytes:
        raise refuse(f"tensor {tensor!r} ends at byte {end} of the data, which has {data_bytes} (truncated?)")
    if math.prod(shape) * DTYPE_BITS[info["dtype"]] != 8 * (end - begin):
        raise refuse(f"tensor {tensor!r} of shape {shape} and dtype {info['dtype']} does not fill {end - begin} bytes")
    return begin, end


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- Hugging Face model folders ----------------------------------------------------------------

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20  # config.json and the shard index are small


def check_hf_folder(folder: Path) -> dict:
    """`{"model_type", "files", "tensors"}` of a Hugging Face model folder: `config.json` with a
    `model_type`, `model.safetensors` (or the shards its index names), every safetensors file sane,
    and no pickle anywhere. Files behind links are read like any other: confining a folder given by
    path to the import roots is the caller's job."""
    folder = Path(folder)
    files = sorted(
        Path(root, name).relative_to(folder).as_posix()
        for root, _, names in os.walk(folder)
        for name in names
    )
    for relative in files:  # pickles first: a folder of pytorch_model.bin should hear why
        if relative.lower().endswith(PICKLE_SUFFIXES):
            raise FileRejected(f"{relative} in the model folder is a pickle checkpoint; {NEVER_UNPICKLED}",
                               code="pickle_refused")
        if not relative.endswith(".safetensors"):  # a header length's first byte may be 0x80
            refuse_pickle(folder / relative, relative)
    config = _read_json(folder, "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FileRejected("config.json of the model folder has no model_type", code="invalid_model_folder")
    if SINGLE_WEIGHTS in files:
        weights = [SINGLE_WEIGHTS]
    elif WEIGHTS_INDEX in files:
        index = _read_json(folder, WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FileRejected(f"{WEIGHTS_INDEX} has no weight_map of tensor names to files",
                               code="invalid_model_folder")
        weights = sorted(set(weight_map.values()))
        missing = [name for name in weights if name not in files]
        if missing:
            raise FileRejected(f"the model folder lacks {', '.join(missing[:3])}, named by {WEIGHTS_INDEX}",
                               code="invalid_model_folder")
    else:
        raise FileRejected(f"the model folder has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX} (safetensors weights)",
                           code="invalid_model_folder")
    tensors = 0
    for relative in files:
        if relative.endswith(".safetensors"):
            tensors += check_safetensors(folder / relative, relative)["tensors"]
    return {"model_type": config["model_type"], "files": files, "tensors": tensors}


def _read_json(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        raise FileRejected(f"the model folder has no {name}: not a Hugging Face model folder",
                           code="invalid_model_folder")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise FileRejected(f"{name} is over {readable_size(MAX_JSON_BYTES)}", code="invalid_model_folder")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FileRejected(f"{name} is not valid JSON: {error}", code="invalid_model_folder") from None
