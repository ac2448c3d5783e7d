"""Sampling parameters of one request, and the next-token choice for a whole batch of them.

Each row of a batch has its own parameters and its own seeded `torch.Generator`, so a request's
sampled text depends on its seed alone, never on which other requests share its decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_SEQUENCES = 4  # as OpenAI's `stop`
MIN_TEMPERATURE = 1e-4  # below it, a request decodes greedily


@dataclass(frozen=True)
class SamplingParams:
    """
    Args:
        max_new_tokens: tokens to generate at most (finish reason "length").
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens only; 0 keeps every token.
        top_p: nucleus sampling: the smallest set of most likely tokens whose mass reaches top_p.
        seed: makes sampling reproducible; None draws a fresh seed.
        stop: strings that end the completion (not included in the text; finish reason "stop").
        ignore_eos: keep generating past the end-of-sequence token (for benchmarks).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")

    @property
    def greedy(self) -> bool:
        # below this, sampling is the argmax anyway, and logits divided by a temperature such as
        # 1e-40 overflow float32 into inf and the draw into nan
        return self.temperature < MIN_TEMPERATURE

    def make_generator(self) -> torch.Generator:
        """The request's own random stream, seeded by `seed` (or by fresh entropy)."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> torch.Tensor:
    """Next token of each row of `logits` (B, V) under that row's parameters: (B,) on the CPU."""
    logits = logits.float().cpu()
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens

    # 1. temperature, then sort each row once: top-k and top-p both cut a sorted row's tail
    temperature = torch.tensor([params[i].temperature for i in rows])
    scaled = logits[rows] / temperature[:, None]  # (R, V)
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)  # (R, V)
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab)

    # 2. top-k: ranks at or past k are dropped (k = 0 keeps the whole vocabulary)
    top_k = torch.tensor([min(params[i].top_k, vocab) or vocab for i in rows])  # k past the vocabulary: all
    drop = rank[None, :] >= top_k[:, None]

    # 3. top-p: drop a token when the tokens ranked above it already hold top_p of the mass
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # top_p = 1 keeps everything, even where float rounding lifts the running mass past 1
    top_p = torch.tensor([params[i].top_p if params[i].top_p < 1.0 else float("inf") for i in rows])
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always stays
    probs = probs.masked_fill(drop, 0.0)

    # 4. draw each row with its own generator, in sorted space, then map back to token ids
    for j, i in enumerate(rows):
        choice = torch.multinomial(probs[j], 1, generator=generators[i])
        tokens[i] = sorted_ids[j, choice]
    return tokens
