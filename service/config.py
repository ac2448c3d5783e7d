"""Service settings, from the environment (prefix `XATL_`) or from `xatl serve`'s options.

The job system's settings (`worker.config.WorkerSettings`: the data directory, database, Redis,
import roots, leases) are the service's too, under the same names. The data directory
(`--data-dir`, env `XATL_HOME`, default `./data`) holds the stored API key, the database, uploads,
jobs and, by default, the models (`models/` under it: each folder there is a servable model). It is
not `XATL_DATA_DIR`, which names the data sets that tests and benchmarks read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from worker.config import WorkerSettings


class Settings(WorkerSettings):
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False,  # never in a log line that prints the settings
        description="Bearer keys accepted by every route but /health (comma-separated)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_prompt_tokens: int = Field(16384, ge=1, description="longest prompt accepted, in tokens")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request body but uploads (413 over it)")
    shutdown_drain_seconds: float = Field(30.0, ge=0, description="on SIGINT/SIGTERM, how long running streams "
                                          "may finish before they end with an error event")
    max_tokens: int = Field(4096, ge=1, description="largest `max_tokens` a request may ask for")
    max_concurrent_streams: int = Field(256, ge=1, description="requests in flight at once (more get 429)")
    max_batch_size: int = Field(64, ge=1, description="requests one engine decodes together; others wait")
    loaded_models: int = Field(2, ge=1, description="models kept loaded (least recently used idle ones leave)")
    device: str = "cpu"
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="compile each model's decode step (torch.compile) at load, on a thread of its own "
        "(requests are decoded eagerly until it is ready): auto = where it paid (bf16 on a CPU with a C++ "
        "compiler), on, off")
    precision: Literal["fp32", "bf16", "int8"] | None = Field(
        None, description="weights of every served model: fp32, bf16 or int8 (CPU, the linear "
        "layers' weights int8, activations float); default: as saved")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: all cores but one)")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value):
        """Earlier versions took a bool: true/false still mean on/off."""
        words = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
        if isinstance(value, bool):
            return "on" if value else "off"
        return words.get(value.lower(), value) if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
