"""llama2.c tokenizer `.bin` -> a Hugging Face fast tokenizer that encodes as llama2.c does.

The file (llama2.c `tokenizer.py` export): int32 `max_token_length`, then per piece a float32
score, an int32 byte length and the UTF-8 bytes. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>` (stored as
"<unk>", "\\n<s>\\n", "\\n</s>\\n"), 3..258 the byte-fallback pieces `<0x00>`..`<0xFF>`, the rest
SentencePiece BPE pieces with spaces where SentencePiece writes "▁".

llama2.c's `encode()` prepends a space to non-empty text, maps each character to its piece (or its
UTF-8 bytes to byte pieces), then repeatedly merges the adjacent pair whose concatenation is the
piece with the highest score. A BPE model whose merges are ranked by the score of the merged piece
(as transformers' SentencePiece converters derive them) does the same, since BPE training gives a
merged piece a lower score than the merged pieces it is made of. The pipeline is transformers'
legacy Llama tokenizer's: "▁" prepended and replacing spaces, byte fallback, BOS added, decoding
"▁" back to spaces and byte pieces back to bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from xatl.donors.spec import DonorError

SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
FIRST_BYTE_ID = len(SPECIAL_PIECES)
FIRST_MERGEABLE_ID = FIRST_BYTE_ID + 256
SPACE = "▁"


def read_pieces(path: Path) -> tuple[list[str], list[float]]:
    """Pieces (specials by their usual names, spaces as "▁") and their scores."""
    data = path.read_bytes()
    pieces, scores = [], []
    offset = 4  # max_token_length: only a buffer size for llama2.c
    try:
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            if length < 0:
                raise ValueError(f"negative piece length at byte {offset}")
            raw = data[offset + 8:offset + 8 + length]
            if len(raw) < length:
                raise ValueError("the file ends inside a piece")
            pieces.append(raw.decode("utf-8").replace(" ", SPACE))
            scores.append(score)
            offset += 8 + length
    except (struct.error, ValueError) as error:
        raise DonorError(f"{path} is not a llama2.c tokenizer: {error}") from None
    _check_layout(path, pieces)
    pieces[:FIRST_BYTE_ID] = SPECIAL_PIECES
    return pieces, scores


def _check_layout(path: Path, pieces: list[str]) -> None:
    bytes_expected = [f"<0x{b:02X}>" for b in range(256)]
    if len(pieces) <= FIRST_MERGEABLE_ID or pieces[FIRST_BYTE_ID:FIRST_MERGEABLE_ID] != bytes_expected:
        raise DonorError(
            f"{path} is not a llama2.c tokenizer with byte fallback: ids {FIRST_BYTE_ID}.."
            f"{FIRST_MERGEABLE_ID - 1} must be the byte pieces <0x00>..<0xFF>"
        )
    if len(set(pieces)) != len(pieces):
        raise DonorError(f"{path} holds the same piece twice")


def bpe_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, highest-scoring piece first."""
    mergeable = {piece: i for i, piece in enumerate(pieces) if i >= FIRST_MERGEABLE_ID}
    merges = []
    for piece in sorted(mergeable, key=lambda p: (-scores[mergeable[p]], mergeable[p])):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        merges += sorted(
            ((left, right) for left, right in splits if left in mergeable and right in mergeable),
            key=lambda pair: (mergeable[pair[0]], mergeable[pair[1]]),
        )
    return merges


def build_tokenizer(pieces: list[str], scores: list[float]) -> PreTrainedTokenizerFast:
    vocab = {piece: i for i, piece in enumerate(pieces)}
    unk, bos, eos = SPECIAL_PIECES
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=bpe_merges(pieces, scores), unk_token=unk,
                   byte_fallback=True, fuse_unk=True)
    )
    # llama2.c's dummy prefix: a space before any non-empty text (even one that starts with a
    # space), spaces written as "▁", no splitting into words
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(content=" ", left=1),  # the dummy prefix
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_PIECES])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=unk, bos_token=bos, eos_token=eos,
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
        split_special_tokens=True,  # "<s>" in text is text, as for llama2.c
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path)
    if not path.is_file():
        raise DonorError(f"tokenizer file {path} does not exist")
    return build_tokenizer(*read_pieces(path))
