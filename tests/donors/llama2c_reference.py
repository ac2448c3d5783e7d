"""Direct ports of llama2.c (karpathy/llama2.c run.c) for the tests: the tokenizer's `encode()`,
the forward pass with RoPE on interleaved pairs, and writers of its two file formats."""

from __future__ import annotations

import struct
from pathlib import Path

import torch


def read_tokenizer(path: Path) -> tuple[list[bytes], list[float]]:
    data = path.read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def write_tokenizer(path: Path, pieces: list[bytes], scores: list[float]) -> None:
    records = b"".join(struct.pack("<fi", s, len(p)) + p for p, s in zip(pieces, scores))
    path.write_bytes(struct.pack("<i", max(map(len, pieces))) + records)


def encode(pieces: list[bytes], scores: list[float], text: str, bos: bool = True) -> list[int]:
    """run.c `encode()`: dummy prefix, code points or their bytes (+3), then best-score merges."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])
    for char in text:
        raw = char.encode("utf-8")
        tokens += [lookup[raw]] if raw in lookup else [byte + 3 for byte in raw]
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best_score, best_id, best_index = scores[merged], merged, i
        if best_index == -1:
            return tokens
        tokens[best_index:best_index + 2] = [best_id]


def write_checkpoint(path: Path, header: tuple[int, ...], arrays: list[torch.Tensor]) -> None:
    """Legacy export: 7 int32, then the float32 arrays in order."""
    path.write_bytes(struct.pack("<7i", *header) + b"".join(a.float().contiguous().numpy().tobytes() for a in arrays))


def forward(weights: dict[str, torch.Tensor], tokens: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """run.c `forward()` over a whole sequence (T,) -> logits (T, vocab), float64."""
    w = {k: v.double() for k, v in weights.items()}
    length, dim = len(tokens), w["tok_embeddings"].shape[1]
    head_dim = dim // n_heads
    x = w["tok_embeddings"][tokens]  # (T, dim)

    def rmsnorm(v, weight):
        return weight * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5)

    # RoPE on pairs (2i, 2i+1) of each head: angle pos * 10000^(-2i/head_dim)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(v, heads):
        pairs = v.view(length, heads, head_dim // 2, 2)  # (T, H, hd/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).view(length, heads, head_dim)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer in range(w["wq"].shape[0]):
        h = rmsnorm(x, w["rms_att"][layer])
        q = rope(h @ w["wq"][layer].T, n_heads)  # (T, H, hd)
        k = rope(h @ w["wk"][layer].T, n_kv_heads)  # (T, Hkv, hd)
        v = (h @ w["wv"][layer].T).view(length, n_kv_heads, head_dim)
        group = n_heads // n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (T, H, hd)
        scores = torch.einsum("thd,shd->hts", q, k) / head_dim**0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.einsum("hts,shd->thd", attention, v).reshape(length, dim)
        x = x + out @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        x = x + (torch.nn.functional.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = rmsnorm(x, w["rms_final"])
    return x @ w.get("wcls", w["tok_embeddings"]).T
