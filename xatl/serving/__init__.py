"""Serving a model with constant memory per stream: the continuous-batching engine, sampling,
incremental detokenisation and per-request figures."""

from xatl.serving.engine import (
    AsyncGenerationStream,
    Engine,
    EngineStats,
    GenerationEvent,
    GenerationStream,
)
from xatl.serving.figures import RequestFigures, peak_memory_bytes
from xatl.serving.precision import PRECISIONS, apply_precision, weight_bytes
from xatl.serving.sampling import SamplingParams, sample_next_tokens
from xatl.serving.text import IncrementalDetokenizer, StopMatcher

__all__ = [
    "AsyncGenerationStream",
    "Engine",
    "EngineStats",
    "GenerationEvent",
    "GenerationStream",
    "PRECISIONS",
    "IncrementalDetokenizer",
    "RequestFigures",
    "SamplingParams",
    "StopMatcher",
    "apply_precision",
    "peak_memory_bytes",
    "sample_next_tokens",
    "weight_bytes",
]
