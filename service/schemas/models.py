"""`/v1/models` bodies, as OpenAI's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "xatl"
    precision: str | None = Field(None, description="the weights it is served with: fp32, bf16 or int8 — as saved "
                                  "(a job's `precision`, `xatl quantize`), unless the server was started with a "
                                  "precision, which wins")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
