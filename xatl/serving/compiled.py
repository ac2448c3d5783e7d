"""The decode step compiled with `torch.compile`, compiled and warmed up off the request path.

On a CPU a small model's decode step is dominated by per-op overhead, which inductor removes: its
C++ wrapper calls the kernels without a Python frame per op, and freezing turns the weights into
constants it prepacks for oneDNN/MKL (faster one-row matrix products; the packed copies take as
much memory again as the weights). Measured on one core of an AMD EPYC (random-width512 GLA, 512
tokens of context; bench/results/generation/compile): fp32 25.8 → 16.9 ms per token, bf16
23.6 → 11.4 ms. int8 (dynamic quantisation) stays eager: dynamo cannot trace the quantised
linear's packed weights (a TorchScript object) and breaks the graph at each of them, which made the
step slower (8.9 → 15.5 ms). "auto" compiles where it paid: fp32 and bf16 on a CPU.

Compiling costs tens of seconds (on 2 cores: ~35-65 s the first time, ~9 s from inductor's cache).
`StepCompiler` pays it at load on a thread of its own: the engine decodes eagerly meanwhile and
switches to the compiled step once it has run on warm-up sequences (one row, then two rows of
different lengths, so that the shapes the batch takes later reuse the compiled code).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import torch

from xatl.serving.batch import DecodeBatch

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")

#: precisions whose compiled step was faster than the eager one on a CPU (see the module's docstring)
_PAYS_ON_CPU = ("fp32", "bf16")


def compile_backend(compile: bool | str | None, precision: str, device: torch.device) -> str | None:
    """The `torch.compile` backend for the decode step, or None to run it eagerly.

    `compile`: "auto" (inductor where it pays: fp32 and bf16 on a CPU that has a C++ compiler for
    inductor's code; elsewhere eager — no GPU measurement yet), "on"/True (inductor),
    "off"/False/None, or a backend's name ("eager", ...).
    """
    if compile in (None, False, "off"):
        return None
    if compile == "auto":
        pays = torch.device(device).type == "cpu" and precision in _PAYS_ON_CPU
        return "inductor" if pays and _has_cpp_compiler() else None
    if compile in (True, "on"):
        return "inductor"
    if not isinstance(compile, str) or not compile:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, a bool or a backend's name, "
                         f"got {compile!r}")
    return compile


def _has_cpp_compiler() -> bool:
    """Inductor writes C++ for the CPU: without a compiler (the slim API image) compiling would fail."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def _lower_this_threads_priority() -> None:
    """Let requests served meanwhile go first: on Linux a thread has its own nice value, and the C++
    compilers inductor starts from this thread inherit it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: compile at the usual priority
        pass


class StepCompiler:
    """Compiles `batch`'s decode step on a background thread, warms it up on sequences of its own
    and then puts it in place of the eager step.

    `status`: "compiling", "compiled" or "failed" (the engine then stays eager; the error is logged);
    `seconds`: how long compiling and warming up took.
    """

    def __init__(self, batch: DecodeBatch, backend: str, vocab_size: int):
        self.batch = batch
        self.backend = backend
        self.vocab_size = vocab_size
        self.status = "compiling"
        self.seconds: float | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xatl-compile", daemon=True)

    def start(self) -> StepCompiler:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling has ended (either way); returns whether the compiled step is in use."""
        self._done.wait(timeout)
        return self.status == "compiled"

    def _run(self) -> None:
        start = time.perf_counter()
        _lower_this_threads_priority()
        try:
            step = self.batch.compiled_step(self.backend)
            self._warm_up(step)
            self.batch.use_step(step)  # from the engine's next step on
            self.status = "compiled"
            self.seconds = time.perf_counter() - start
            logger.info("decode step compiled (%s) and warmed up in %.1f s", self.backend, self.seconds)
        except Exception as error:  # an eager engine still serves every request
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
            self.seconds = time.perf_counter() - start
            logger.exception("compiling the decode step failed; decoding stays eager")
        finally:
            self._done.set()

    def _warm_up(self, step) -> None:
        """Run `step` the ways the engine will, so that no request meets a first compilation: one
        row, then rows of different lengths (a padding mask where states grow), then rows of one
        length (no mask); each twice, since states made by eager prefill and by the compiled step
        differ in what dynamo guards on."""
        for lengths in ((4, 7), (5, 5)):
            warm = DecodeBatch(self.batch.model)
            warm.use_step(step)
            for length in lengths:
                prompt = torch.arange(1, length + 1)[None] % self.vocab_size  # (1, length)
                _, states = warm.prefill(prompt)
                warm.add(states, length)
                for _ in range(2):
                    warm.step(torch.ones(warm.size, dtype=torch.long))


__all__ = ["COMPILE_MODES", "StepCompiler", "compile_backend"]
