"""The decode step compiled with `torch.compile`, compiled and warmed up off the request path.

Inductor removes the per-op Python overhead of a small model's decode step (its C++ wrapper calls
the kernels without a Python frame per op) and, with frozen weights, prepacks them for oneDNN/MKL
(the packed copies take as much memory again as the weights). Measured side by side on one core
(random-width512 GLA, bench/results/generation/compile), compiled / eager tokens/s:

| precision | AMD EPYC, AVX512-BF16 and VNNI | AMD EPYC, AVX2 only |
|---|---|---|
| bf16, xatl's kernel (frozen) | 1.43-1.58x | 1.59-1.74x |
| bf16, torch's linear (frozen) | 1.25-1.30x (an earlier run: 1.17-1.18x) | 1.46-1.48x |
| int8, xatl's kernel (weights not frozen) | 1.56-1.72x (two runs) | 2.04-2.20x |
| int8, torch's `_weight_int8pack_mm` | fails to lower: stays eager | fails to lower (an older run: 1.54-1.72x) |
| fp32, xatl's kernel (frozen) | not measured | 1.39-1.49x |
| fp32, torch's linear (frozen) | 1.12-1.24x (an earlier run: 0.94-0.98x) | 1.21-1.31x |

(AVX2 column: the step as it is since the rotary tables became its inputs and its modules' guards
were skipped, `xatl.serving.batch`; the AVX512 one before.) So "auto" compiles bf16 and int8 on a
CPU. fp32 stays eager: where the memory is fast it is bound by reading 209 MB of weights a step, one
run with AVX512 measured it no faster (before xatl's fp32 kernel; with it, AVX2 measured 1.39-1.49x,
AVX512 is still to measure), and compiling it takes the longest (93-178 s). The int8 layers
(`xatl.quantization.Int8Linear`) compile with their weights as plain inputs: frozen, inductor fails
to lower torch's int8 kernel (torch 2.13); with AVX512, and in the latest AVX2 run, it fails to
lower that kernel at all, and the step stays eager, as it does whenever compiling fails. xatl's own
int8 kernel (`xatl.kernels`) is an op inductor calls as it is.

Compiling costs tens of seconds to minutes (62-128 s on 2 shared cores with AVX512, 134-159 s with
AVX2 alone). `StepCompiler` pays it at load on a thread of its own: the engine decodes eagerly
meanwhile and switches to the compiled step once it has run on warm-up sequences (one row, then
rows of different lengths, so that the shapes the batch takes later reuse the compiled code).
Requests served meanwhile share the cores and the GIL with the compiler: a first request to a bf16
model took 33 s for 32 tokens instead of 2.6 s (AVX512), one to an int8 model 30 s instead of 1.2 s
(AVX2); with the thread switch interval shortened while compiling (`_ShortSwitchInterval`), 5.5 s
(bench/results/generation/compile/avx2/while-compiling), the compilation 7-45% longer.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time

import torch

from xatl.serving.batch import DecodeBatch

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")

#: precisions whose compiled step was faster than the eager one on a CPU (see the module's docstring)
_PAYS_ON_CPU = ("bf16", "int8")


def compile_backend(compile, precision: str, device: torch.device):
    """The `torch.compile` backend for the decode step, or None to run it eagerly.

    `compile`: "auto" (inductor where it paid: bf16 and int8, on a CPU that has a C++ compiler for
    inductor's code; elsewhere eager — no GPU measurement yet), "on"/True (inductor),
    "off"/False/None, or a backend: its name ("eager", ...) or the backend itself (a callable).
    """
    if compile in (None, False, "off"):
        return None
    if compile == "auto":
        pays = torch.device(device).type == "cpu" and precision in _PAYS_ON_CPU
        return "inductor" if pays and _has_cpp_compiler() else None
    if compile in (True, "on"):
        return "inductor"
    if callable(compile):  # a dynamo backend itself (a function of the graph and its example inputs)
        return compile
    if not isinstance(compile, str) or not compile:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, a bool, a backend's name or a backend, "
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


#: Python's thread switch interval while a step compiles (its default: 5 ms); see `_ShortSwitchInterval`
SWITCH_INTERVAL_WHILE_COMPILING_S = 5e-5


class _ShortSwitchInterval:
    """Python's thread switch interval shortened while any compiler runs, restored after the last.

    Each torch op releases the GIL while its kernel runs and takes it back after; with a compiler
    tracing and generating code on another thread, taking it back waited up to the switch interval,
    for each of the hundreds of ops of an eager decode step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0
        self._previous: float | None = None  # the interval to restore, while any compiler runs

    def __enter__(self):
        with self._lock:
            if self._running == 0:
                self._previous = sys.getswitchinterval()
                sys.setswitchinterval(min(self._previous, SWITCH_INTERVAL_WHILE_COMPILING_S))
            self._running += 1

    def __exit__(self, *exc):
        with self._lock:
            self._running -= 1
            if self._running == 0:
                sys.setswitchinterval(self._previous)


_SHORT_SWITCH_INTERVAL = _ShortSwitchInterval()


class StepCompiler:
    """Compiles `batch`'s decode step on a background thread, warms it up on sequences of its own
    and then puts it in place of the eager step.

    `status`: "compiling", "compiled" or "failed" (the engine then stays eager; the error is logged);
    `seconds`: how long compiling and warming up took.
    """

    def __init__(self, batch: DecodeBatch, backend, vocab_size: int):
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
            with _SHORT_SWITCH_INTERVAL:  # requests decoded meanwhile get the GIL back soon after each op
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


__all__ = ["COMPILE_MODES", "SWITCH_INTERVAL_WHILE_COMPILING_S", "StepCompiler", "compile_backend"]
