"""The models the service can serve: every folder of the models directory with a `config.json`,
loaded on its first request and kept loaded (the least recently used idle ones leave when more
than `capacity` are loaded). Loading imports torch; listing does not.

Each model is served at the precision its weights are saved in (config.json: xatl's int8
`quantization_config`, else its dtype), unless the server was started with a precision
(`xatl serve --precision`, XATL_PRECISION): that one wins, for every model."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from xatl.serving import Engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFolder:
    name: str
    path: Path
    created: int  # the folder's modification time, seconds since the epoch
    precision: str | None = None  # the weights as saved: fp32, bf16, int8 (None: unreadable config)


class ModelNotFound(LookupError):
    pass


class ModelRegistry:
    """
    Args:
        models_dir: folder whose sub-folders are models, served under their folder names.
        capacity: models kept loaded at once.
        device: where models are loaded ("cpu", "cuda", ...).
        max_batch_size: each engine's decode batch.
        torch_threads: torch intra-op threads, set when a model loads; default: all cores but one.
        compile: compile each engine's decode step (see `xatl.serving.Engine`).
        precision: weights of every model, "fp32", "bf16" or "int8" (see `xatl.serving.precision`),
            over the precision each is saved in; None: each as saved.
    """

    def __init__(self, models_dir: Path, *, capacity: int = 2, device: str = "cpu",
                 max_batch_size: int = 64, torch_threads: int | None = None, compile: bool | str = "auto",
                 precision: str | None = None):
        self.models_dir = models_dir
        self.capacity = capacity
        self.device = device
        self.max_batch_size = max_batch_size
        self.torch_threads = torch_threads
        self.compile = compile
        self.precision = precision
        self._engines: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self._loading: dict[str, asyncio.Lock] = {}

    def folders(self) -> list[ModelFolder]:
        if not self.models_dir.is_dir():
            return []
        return [
            ModelFolder(path.name, path, int(path.stat().st_mtime), saved_precision(path / "config.json"))
            for path in sorted(self.models_dir.iterdir())
            if not path.name.startswith(".") and (path / "config.json").is_file()  # hidden: being published
        ]

    def served_precision(self, folder: ModelFolder) -> str | None:
        """The precision `folder`'s model is (or will be) served at: the server's, else as saved."""
        return self.precision or folder.precision

    def folder(self, name: str) -> ModelFolder:
        for folder in self.folders():
            if folder.name == name:
                return folder
        raise ModelNotFound(name)

    async def engine(self, name: str) -> Engine:
        """The engine of model `name`, loading it (off the event loop) on first use."""
        if name in self._engines:
            self._engines.move_to_end(name)
            return self._engines[name]
        folder = self.folder(name)
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:  # concurrent first requests load the model once
            if name not in self._engines:
                self._engines[name] = await run_in_threadpool(self._load, folder.path)
                logger.info("loaded model %s from %s", name, folder.path)
                self._evict_idle(keep=name)
        self._engines.move_to_end(name)
        return self._engines[name]

    def loaded(self) -> dict[str, Engine]:
        return dict(self._engines)

    def unload(self, name: str) -> bool:
        """Close the engine of `name` if it is loaded and idle; False while it has requests."""
        engine = self._engines.get(name)
        if engine is None:
            return True
        stats = engine.stats()
        if stats.running or stats.waiting:
            return False
        self._engines.pop(name).close()
        return True

    def close(self, reason: str | None = None) -> None:
        """Close every engine; requests still running end with an error event saying `reason`."""
        for engine in list(self._engines.values()):
            engine.close(reason) if reason else engine.close()
        self._engines.clear()

    def _load(self, path: Path) -> Engine:
        import torch
        from transformers.utils import logging as transformers_logging

        from xatl.serving import Engine

        transformers_logging.disable_progress_bar()  # no bars in the service's log
        # one core stays with the event loop: on 2 cores, two intra-op threads spinning against it made
        # decoding 3-30x slower than one
        torch.set_num_threads(self.torch_threads or max(1, (os.cpu_count() or 1) - 1))
        return Engine.from_pretrained(path, device=self.device, max_batch_size=self.max_batch_size,
                                      compile=self.compile, precision=self.precision)

    def _evict_idle(self, keep: str) -> None:
        for name in list(self._engines):
            if len(self._engines) <= self.capacity:
                return
            stats = self._engines[name].stats()
            if name != keep and stats.running == 0 and stats.waiting == 0:
                self._engines.pop(name).close()
                logger.info("unloaded model %s (least recently used)", name)


def saved_precision(config_file: Path) -> str | None:
    """`xatl.artifacts.saved_precision`, torch-free (importing xatl imports torch): "int8" for xatl's
    `quantization_config`, else the config's dtype as fp32 or bf16 (another by its name)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        return quantization.get("weights", "int8") if quantization.get("quant_method") == "xatl" else \
            str(quantization.get("quant_method"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
