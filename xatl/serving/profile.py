"""A model's decoding profile: tokens/s and state bytes after prompts of given lengths, measured
with the engine as the service decodes. For a linear-cost model the state is the same at every
context; for attention it grows with it, and so does the time of each step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xatl.serving.engine import Engine
from xatl.serving.sampling import SamplingParams


@torch.no_grad()
def decode_profile(model, tokenizer, contexts: Sequence[int], *, decode_tokens: int = 32,
                   seed: int = 0) -> list[dict]:
    """One row per context: `{"context", "tokens_per_s", "state_bytes", "ttft_s"}`.

    The prompt is `context` token ids drawn at random from the vocabulary (the cost of a step does
    not depend on which tokens they are), then `decode_tokens` tokens are decoded greedily past
    any end-of-sequence token.
    """
    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be at least 2 (a rate needs two tokens), got {decode_tokens}")
    engine = Engine(model, tokenizer, max_batch_size=1, background=False)
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_new_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    warm_up = torch.randint(0, model.config.vocab_size, (min(contexts, default=8),), generator=generator).tolist()
    for _ in engine.generate(warm_up, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)):
        pass  # first calls pay for allocation and kernel selection, not the steady state measured below
    rows = []
    for context in contexts:
        if context < 1:
            raise ValueError(f"contexts must be positive, got {context}")
        limit = model.config.max_position_embeddings
        if model.config.position_embedding_type == "learned" and context + decode_tokens > limit:
            rows.append({"context": context, "skipped": f"beyond the model's {limit} learned positions"})
            continue
        prompt = torch.randint(0, model.config.vocab_size, (context,), generator=generator).tolist()
        *_, last = engine.generate(prompt, params)
        if last.figures is None:
            raise RuntimeError(f"decoding after {context} tokens failed: {last.error}")
        rows.append({"context": context, "tokens_per_s": last.figures.tokens_per_s,
                     "state_bytes": last.figures.state_bytes, "ttft_s": last.figures.ttft_s})
    engine.close()
    return rows


__all__ = ["decode_profile"]
