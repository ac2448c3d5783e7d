"""Text in, fixed-length token blocks out: the data side of training and evaluation.

Sources are local: `.txt` files (one document each), `.jsonl` files (one document per line, text in
a field), directories and globs of those, and folders written by `datasets.save_to_disk`; or, for
callers with their own reader, a zero-argument callable returning an iterable of texts.

Documents are tokenised with the model's tokenizer and joined into one stream, each document
wrapped in the tokenizer's own BOS/EOS (Llama style: `<s> … </s>`; GPT-2 style, where BOS is EOS:
`… <|endoftext|>`), so the model always sees where one ends. The stream is cut into blocks of
`block_size` tokens; consecutive blocks share one token (the last input of a block is the first of
the next), so with the labels shifted inside the model every token after the first is predicted
exactly once. Everything streams: documents are read, tokenised and packed as they are consumed,
and only a bounded shuffle buffer of blocks is ever held, so a corpus larger than memory works.

The train/validation split is deterministic: by document (a hash of its text decides, so it does
not depend on file order), or by block (a hash of the block index) for corpora of one long text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
SPLITS = ("train", "validation")
SPLIT_UNITS = ("document", "block")
TOKENIZE_BATCH = 64  # documents tokenised per call (fast tokenizers parallelise within a batch)

TextSource = Sequence[str | Path] | Callable[[], Iterable[str]]


# 1. Finding and reading documents ---------------------------------------------------------------

def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def resolve_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expand directories (recursively, sorted) and globs into text files and dataset folders."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    resolved: list[Path] = []
    for given in paths:
        given = str(given)
        if glob.has_magic(given):
            matches = sorted(Path(p) for p in glob.glob(given, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {given!r}")
            resolved += [p for p in matches if is_saved_dataset(p) or p.suffix in TEXT_SUFFIXES]
            continue
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"data path {given!r} does not exist")
        if is_saved_dataset(path):
            resolved.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in TEXT_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"directory {given!r} holds no {' or '.join(TEXT_SUFFIXES)} files")
            resolved += found
        elif path.suffix in TEXT_SUFFIXES:
            resolved.append(path)
        else:
            raise ValueError(
                f"unsupported data file {given!r}: expected .txt, .jsonl, a directory of them, "
                "or a folder written by datasets' save_to_disk"
            )
    return resolved


def iter_documents(paths: Sequence[str | Path], *, text_field: str = "text") -> Iterator[str]:
    """The documents of `paths`, one at a time, in a fixed order."""
    for path in resolve_paths(paths):
        if is_saved_dataset(path):
            yield from _dataset_documents(path, text_field)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            # text mode turns CRLF into LF, as the Gutenberg files need
            yield path.read_text(encoding="utf-8")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number}: no text field {text_field!r} (use --text-field)")
            yield record[text_field]


def _dataset_documents(path: Path, text_field: str) -> Iterator[str]:
    import datasets  # heavy: imported only for dataset folders

    dataset = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read lazily
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"{path} holds splits {sorted(dataset)} but no 'train'; pass the split's folder "
                f"(e.g. {path / sorted(dataset)[0]})"
            )
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {dataset.column_names})")
    for batch in dataset.select_columns([text_field]).iter(batch_size=256):
        yield from batch[text_field]


# 2. Tokenising and packing ---------------------------------------------------------------------

def boundary_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Tokens put before and after each document, as the tokenizer defines them."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    before = [bos] if bos is not None and bos != eos else []
    after = [eos] if eos is not None else []
    return before, after


def tokenize_documents(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each text, wrapped in the tokenizer's BOS/EOS."""
    before, after = boundary_tokens(tokenizer)
    texts = iter(texts)
    while batch := list(islice(texts, TOKENIZE_BATCH)):
        # verbose=False: whole documents are longer than model_max_length on purpose
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            yield before + list(ids) + after


def pack_blocks(
    documents: Iterable[list[int]], block_size: int, *, keep_partial: bool = False
) -> Iterator[list[int]]:
    """Cut the joined token stream into blocks of `block_size` that overlap by one token.

    With `keep_partial`, the shorter last block is yielded too (evaluation scores every token);
    training keeps full blocks only, so every block has the same number of targets.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    buffer: list[int] = []
    for ids in documents:
        buffer.extend(ids)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[: block_size - 1]  # keep the last token as the next block's first input
    if keep_partial and len(buffer) >= 2:
        yield buffer


def _hash_fraction(key: bytes, seed: int) -> float:
    """A number in [0, 1) that depends only on `key` and `seed`."""
    digest = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64


class TextBlocks:
    """Blocks of token ids (each a LongTensor of `block_size`, the last possibly shorter with
    `keep_partial`) from a text source. Re-iterable: every `iter()` reads the source again.

    Args:
        source: paths (files, directories, globs, dataset folders), or a zero-argument callable
            returning an iterable of texts (read lazily; it may be a generator).
        tokenizer: the model's tokenizer (a transformers tokenizer).
        block_size: tokens per block.
        split: None for everything, else "train" or "validation" of a deterministic split that
            sends `valid_fraction` of the documents (or blocks, with `split_by="block"`) to
            validation.
        text_field: the field holding the text in `.jsonl` files and dataset folders.
        keep_partial: also yield the last, shorter block (for evaluation).
        seed: the split's hash key; the same seed gives the same split.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer,
        block_size: int,
        *,
        split: str | None = None,
        valid_fraction: float = 0.0,
        split_by: str = "document",
        text_field: str = "text",
        keep_partial: bool = False,
        seed: int = 0,
    ):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
        if split_by not in SPLIT_UNITS:
            raise ValueError(f"split_by must be one of {SPLIT_UNITS}, got {split_by!r}")
        if split is not None and not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1) to split, got {valid_fraction}")
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if not callable(source):
            resolve_paths(source)  # fail now, with the path in the message, not mid-training
        self.source = source
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.split = split
        self.valid_fraction = valid_fraction
        self.split_by = split_by
        self.text_field = text_field
        self.keep_partial = keep_partial
        self.seed = seed

    def texts(self) -> Iterator[str]:
        texts = self.source() if callable(self.source) else iter_documents(self.source, text_field=self.text_field)
        if self.split is None or self.split_by == "block":
            return iter(texts)
        return (t for t in texts if self._in_split(t.encode("utf-8")))

    def _in_split(self, key: bytes) -> bool:
        is_valid = _hash_fraction(key, self.seed) < self.valid_fraction
        return is_valid == (self.split == "validation")

    def __iter__(self) -> Iterator[torch.Tensor]:
        blocks = pack_blocks(
            tokenize_documents(self.texts(), self.tokenizer), self.block_size, keep_partial=self.keep_partial
        )
        for index, block in enumerate(blocks):
            if self.split is not None and self.split_by == "block":
                if not self._in_split(index.to_bytes(8, "little")):
                    continue
            yield torch.tensor(block, dtype=torch.long)


# 3. Batches for training -----------------------------------------------------------------------

def shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle with a bounded buffer (an exact shuffle when everything fits)."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class BatchStream:
    """An endless, seeded stream of batches over epochs of `blocks`, resumable at any batch.

    Each epoch walks `blocks` in a shuffled order fixed by `(seed, epoch)`; its position is the
    epoch and the number of blocks taken from it, so `load_state_dict` continues exactly.

    Args:
        blocks: a re-iterable of equal-length LongTensor blocks (`TextBlocks`, a list, ...).
        batch_size: blocks per batch (the global batch: all processes and micro-steps together).
        shuffle_buffer: blocks held for shuffling; 0 keeps the source order.
        seed: shuffle seed.
    """

    def __init__(self, blocks: Iterable[torch.Tensor], batch_size: int, *, shuffle_buffer: int = 10_000,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.offset = 0  # blocks taken from the current epoch
        self._iterator: Iterator[torch.Tensor] | None = None

    @property
    def block_size(self) -> int:
        return self.blocks.block_size if hasattr(self.blocks, "block_size") else len(next(iter(self.blocks)))

    def _epoch_blocks(self) -> Iterator[torch.Tensor]:
        blocks = iter(self.blocks)
        if self.shuffle_buffer:
            blocks = shuffled(blocks, self.shuffle_buffer, random.Random(self.seed * 1_000_003 + self.epoch))
        return islice(blocks, self.offset, None)

    def next_batch(self) -> torch.Tensor:
        """(batch_size, block_size) LongTensor."""
        batch: list[torch.Tensor] = []
        while len(batch) < self.batch_size:
            if self._iterator is None:
                self._iterator = self._epoch_blocks()
            block = next(self._iterator, None)
            if block is None:
                if self.offset == 0:
                    raise ValueError("the training data gives no full block; add text or lower the block size")
                self.epoch, self.offset, self._iterator = self.epoch + 1, 0, None
                continue
            batch.append(block)
            self.offset += 1
        return torch.stack(batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"cannot resume: the data stream was seed {state['seed']}, batch {state['batch_size']}; "
                f"now seed {self.seed}, batch {self.batch_size}"
            )
        self.epoch, self.offset, self._iterator = state["epoch"], state["offset"], None


__all__ = [
    "BatchStream",
    "TextBlocks",
    "boundary_tokens",
    "is_saved_dataset",
    "iter_documents",
    "pack_blocks",
    "resolve_paths",
    "shuffled",
    "tokenize_documents",
]
