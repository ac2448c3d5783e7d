"""`/v1/completions` bodies, as OpenAI's, with an `xatl` block beside `usage`.

Fields OpenAI defines that this server does not implement are accepted only at their neutral
value (so clients that always send them keep working) and refused otherwise, naming the field.
Unknown fields are refused too, as OpenAI does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationInfo, field_validator

MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# OpenAI fields this server does not implement, and the values that mean "not used"
NEUTRAL_VALUES = {
    "n": (1,),
    "best_of": (None, 1),
    "echo": (False,),
    "logprobs": (None,),
    "suffix": (None,),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "logit_bias": (None, {}),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    # strict: `true` is no token id and `"3"` no max_tokens (JSON's own types, as OpenAI's API reads them)
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension: sample among the k most likely tokens (a k "
                              "past the vocabulary keeps every token)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64, description="makes sampling reproducible")
    ignore_eos: bool = Field(False, description="extension: generate past the end-of-sequence token")
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator(*NEUTRAL_VALUES)
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if value not in NEUTRAL_VALUES[info.field_name]:
            raise ValueError("not supported by this server (leave it at its default)")
        return value

    @field_validator("prompt", "stop")
    @classmethod
    def _unicode_text(cls, value):
        """JSON can carry a lone UTF-16 surrogate (`"\\ud800"`), which is no text a tokenizer can read."""
        for text in [value] if isinstance(value, str) else value or []:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise ValueError(f"holds a lone surrogate (\\u{ord(text[error.start]):04x}) at character "
                                     f"{error.start}: not valid Unicode text") from None
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if "" in stops:
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def max_new_tokens(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class XatlFigures(BaseModel):
    """What the request cost: time to first token, decode speed, state memory."""

    ttft_s: float
    e2e_s: float
    tokens_per_s: float | None
    state_bytes: int
    peak_memory_bytes: int


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    xatl: XatlFigures | None = None
