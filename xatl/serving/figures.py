"""What a request and the process cost: time to first token, throughput, state memory, peak memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class RequestFigures:
    """Figures of one finished request.

    Args:
        prompt_tokens, completion_tokens: tokens read and generated (an end-of-sequence token counts).
        ttft_s: seconds from submission to the first generated token (queueing and prefill).
        e2e_s: seconds from submission to the last token.
        tokens_per_s: decode rate after the first token, `(completion_tokens - 1) / (last - first)`;
            None with a single token.
        state_bytes: the sequence's state at its end. Constant over the stream for linear-cost
            mixers; attention layers of a hybrid add their key/value bytes per token.
        peak_memory_bytes: the process's peak resident memory (and the accelerator's peak
            allocation when the model is on one) when the request finished.
    """

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    e2e_s: float
    tokens_per_s: float | None
    state_bytes: int
    peak_memory_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak resident set size of this process, plus the peak allocation on `device` if it is CUDA."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    if device.type == "cuda":
        peak += torch.cuda.max_memory_allocated(device)
    return peak
