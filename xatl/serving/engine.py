"""The generation engine: many requests over one model, each in its own state slot, decoded together.

Requests are submitted from any thread (or coroutine) and come back as streams of events. Each
iteration of the engine's loop, on its own thread or driven by the caller:
1. drops requests whose consumer went away, so their slots are free for this very step,
2. admits waiting requests up to `max_batch_size`: prefills each prompt in the parallel/chunked form
   into its state and samples its first token; at most `prefill_chunk` prompt tokens per iteration,
   so a long prompt is prefilled over several iterations and the running requests wait at most one
   chunk for each of their tokens (no head-of-line blocking),
3. runs one batched decode step for every running request, then samples, detokenises and checks
   stop conditions per request; finished requests leave the batch.

For linear-cost mixers a slot's state has the same size at token 100,000 as at token 10; layers
that keep attention (hybrids) grow a key/value cache for their own layers only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xatl.loader import load_model
from xatl.model import XatlForCausalLM
from xatl.serving.batch import DecodeBatch
from xatl.serving.compiled import StepCompiler, compile_backend
from xatl.serving.figures import RequestFigures, peak_memory_bytes
from xatl.serving.precision import (
    LOAD_DTYPES,
    apply_precision,
    check_precision,
    model_precision,
    use_bf16_kernel,
    use_fp32_kernel,
)
from xatl.serving.sampling import SamplingParams, sample_next_tokens
from xatl.serving.text import IncrementalDetokenizer, StopMatcher

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GenerationEvent:
    """One generated token of a request, as text.

    Args:
        text: the new text, possibly "" (an incomplete character, or text held back because it may
            begin a stop sequence).
        token_id: the token generated; None on an error or a cancellation.
        time: `time.perf_counter()` when the engine produced it.
        finish_reason: on the last event only: "stop" (end-of-sequence token or stop sequence),
            "length" (max_new_tokens), "cancelled" or "error".
        figures: on the last event only.
        error: the message, when finish_reason is "error".
    """

    text: str
    token_id: int | None
    time: float
    finish_reason: str | None = None
    figures: RequestFigures | None = None
    error: str | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests in the decode batch
    waiting: int  # submitted, not yet prefilled
    state_bytes: int  # held by the batch's states (attention padding included)
    decode_step: str = "eager"  # "eager", "compiling" (eager meanwhile), "compiled" or "failed" (eager)
    compile_seconds: float | None = None  # compiling and warming up the decode step took, once ended


class GenerationStream:
    """The events of one request, in order, ending with one that has a `finish_reason`.

    Iterate it to read them (blocking); `cancel()` abandons the request: its slot is freed at the
    engine's next step.
    """

    def __init__(self, drive: Callable[[], object] | None = None):
        self._events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._drive = drive  # an engine without a thread is stepped by its reader

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: GenerationEvent) -> None:
        self._events.put(event)

    def __iter__(self) -> Iterator[GenerationEvent]:
        while True:
            if self._drive is None:
                event = self._events.get()
            else:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    self._drive()
                    continue
            yield event
            if event.finish_reason is not None:
                return


class AsyncGenerationStream(GenerationStream):
    """A stream read from an asyncio event loop: the engine thread hands events to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    def push(self, event: GenerationEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def __iter__(self):
        raise TypeError("an AsyncGenerationStream is read with `async for`")

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if event.finish_reason is not None:
                return


class _Sequence:
    """A request inside the engine: its prompt, sampling state, text state and timings."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stream: GenerationStream, tokenizer):
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = stream
        self.generator = params.make_generator()
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopMatcher(params.stop)
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.state_fixed_bytes = 0
        self.state_bytes_per_token = 0

    def advance(self, token: int, eos_token_ids: frozenset[int], device: torch.device) -> GenerationEvent:
        """Take the next token; the event says what text it adds and whether the request ends."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.completion_tokens += 1
        self.last_token = token
        eos = token in eos_token_ids and not self.params.ignore_eos
        text, hit_stop = self.stop.feed("" if eos else self.detokenizer.add(token))
        at_limit = self.completion_tokens >= self.params.max_new_tokens
        if not hit_stop and (eos or at_limit):  # the end: the last characters and held-back text
            rest, hit_stop = self.stop.feed(self.detokenizer.flush())
            text += rest if hit_stop else rest + self.stop.flush()
        if hit_stop or eos:
            return self.finish(text, token, "stop", device, now)
        if at_limit:
            return self.finish(text, token, "length", device, now)
        return GenerationEvent(text, token, now)

    def finish(
        self, text: str, token: int | None, reason: str, device: torch.device,
        now: float | None = None, error: str | None = None,
    ) -> GenerationEvent:
        now = now or time.perf_counter()
        first = self.first_token_at
        decode_s = now - first if first is not None else 0.0
        # the last token is sampled, never fed back, so the state holds one token less
        length = len(self.prompt_ids) + max(self.completion_tokens - 1, 0)
        figures = RequestFigures(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.completion_tokens,
            ttft_s=(first if first is not None else now) - self.submitted,
            e2e_s=now - self.submitted,
            tokens_per_s=(self.completion_tokens - 1) / decode_s if decode_s > 0 else None,
            state_bytes=self.state_fixed_bytes + self.state_bytes_per_token * length,
            peak_memory_bytes=peak_memory_bytes(device),
        )
        return GenerationEvent(text, token, now, finish_reason=reason, figures=figures, error=error)


class _Prefill:
    """A prompt being prefilled chunk by chunk: its states after its first `done` tokens."""

    def __init__(self, sequence: _Sequence):
        self.sequence = sequence
        self.states = None
        self.done = 0


class Engine:
    """Continuous-batching generation for one `XatlForCausalLM`.

    Args:
        model: the model (any mixer plan), in eval mode on its device.
        tokenizer: its transformers tokenizer.
        max_batch_size: requests decoded together; more wait for a free slot.
        background: run the loop on a daemon thread started at the first submission; otherwise
            whoever reads a stream drives the engine (`step()`), as a command-line tool does.
        compile: compile the decode step with `torch.compile`: "auto" (where it paid: bf16 on a
            CPU), "on"/True (inductor), "off"/False, or a backend's name. Compiling runs at
            load on a thread of its own (`xatl.serving.compiled`): requests are decoded eagerly
            until the compiled step is warm, so none of them waits for it. Prefill stays eager.
        prefill_chunk: prompt tokens prefilled per iteration, between decode steps of the running
            requests (None: every waiting prompt whole, at once).
        precision: "fp32", "bf16" or "int8" weights (see `xatl.serving.precision`), the model
            converted in place; None keeps the model as it is.
    """

    def __init__(
        self, model: XatlForCausalLM, tokenizer, *, max_batch_size: int = 64, background: bool = True,
        compile: bool | str = False, prefill_chunk: int | None = 512, precision: str | None = None,
    ):
        if not isinstance(model, XatlForCausalLM):
            raise ValueError(f"the engine runs XatlForCausalLM models, got {type(model).__name__}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 (or None), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if precision is not None:
            model = apply_precision(model, precision)
        self.precision = model_precision(model)
        # xatl's matrix products for a decode step on a CPU, where its kernels are built
        if model.device.type == "cpu" and self.precision == "bf16":
            use_bf16_kernel(model)
        elif model.device.type == "cpu" and self.precision == "fp32":
            use_fp32_kernel(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.background = background
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._batch = DecodeBatch(model)
        backend = compile_backend(compile, self.precision, model.device)
        self._compiler = None if backend is None else StepCompiler(self._batch, backend, model.config.vocab_size)
        self._running: list[_Sequence] = []  # row i of the batch is _running[i]
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: _Prefill | None = None  # the prompt being prefilled, chunk by chunk
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._state_bytes = 0
        if self._compiler is not None:
            self._compiler.start()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        precision: str | None = None, **kwargs,
    ) -> Engine:
        """Load a model folder (as `xatl convert` or `save_pretrained` writes it) and its tokenizer,
        with `xatl.loader.load_model` (device None: its rule, a GPU where there is one).
        `precision`: "fp32", "bf16" or "int8" weights (None: `dtype`, else the saved dtype)."""
        if precision is not None:
            if dtype is not None:
                raise ValueError("give precision or dtype, not both")
            dtype = LOAD_DTYPES[check_precision(precision)]
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, precision=precision, **kwargs)

    # ---- submitting ------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a text prompt, with the tokenizer's special tokens (a BOS, for most)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Queue a request; read its events from the returned stream."""
        stream = GenerationStream(None if self.background else self.step)
        return self._enqueue(prompt_ids, params, stream)

    def submit_async(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncGenerationStream:
        """Queue a request from a coroutine; read its events with `async for`."""
        if not self.background:
            raise ValueError("submit_async needs an engine with background=True")
        return self._enqueue(prompt_ids, params, AsyncGenerationStream(asyncio.get_running_loop()))

    def generate(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[GenerationEvent]:
        """Events of one request, for scripts: `for event in engine.generate("Once", params)`."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        yield from self.submit(prompt_ids, params)

    def _enqueue(self, prompt_ids, params, stream):
        prompt_ids = self._check_prompt(prompt_ids, params)
        sequence = _Sequence(prompt_ids, params, stream, self.tokenizer)
        with self._work:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(sequence)
            if self.background and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="xatl-engine", daemon=True)
                self._thread.start()
            self._work.notify()
        return stream

    def _check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        prompt_ids = [int(t) for t in prompt_ids]
        config = self.model.config
        if not prompt_ids:
            raise ValueError("the prompt is empty (and the tokenizer adds no BOS token)")
        if min(prompt_ids) < 0 or max(prompt_ids) >= config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size})")
        total = len(prompt_ids) + params.max_new_tokens
        if config.position_embedding_type == "learned" and total > config.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's max_position_embeddings ({config.max_position_embeddings})"
            )
        return prompt_ids

    # ---- the loop ------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        waiting = len(self._waiting) + (self._prefilling is not None)
        compiler = self._compiler
        return EngineStats(running=len(self._running), waiting=waiting, state_bytes=self._state_bytes,
                           decode_step="eager" if compiler is None else compiler.status,
                           compile_seconds=None if compiler is None else compiler.seconds)

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Block until the compiled decode step is in use (or compiling failed, or there is none:
        then False), for benchmarks that measure the compiled step only."""
        return self._compiler is not None and self._compiler.wait(timeout)

    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit waiting ones, decode one token for all.
        Returns whether requests remain."""
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()
        self._state_bytes = self._batch.nbytes()
        return bool(self._running or self._waiting or self._prefilling)

    def close(self, reason: str = "the engine was closed") -> None:
        """Stop the loop; requests still queued or running end with an error event saying `reason`."""
        with self._work:
            self._closed = True
            self._work.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._work:
            prefilling = [self._prefilling.sequence] if self._prefilling is not None else []
            left, self._waiting = [*self._running, *prefilling, *self._waiting], deque()
            self._prefilling = None
        self._fail(left, reason)
        self._batch.keep([])
        self._running = []

    def _loop(self) -> None:
        while True:
            with self._work:
                while not (self._closed or self._waiting or self._running or self._prefilling):
                    self._work.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # never let the thread die: every request would hang
                logger.exception("engine step failed")

    def _drop_cancelled(self) -> None:
        with self._work:
            cancelled = [s for s in self._waiting if s.stream.cancelled]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        if self._prefilling is not None and self._prefilling.sequence.stream.cancelled:
            cancelled.append(self._prefilling.sequence)
            self._prefilling = None
        keep = [i for i, s in enumerate(self._running) if not s.stream.cancelled]
        if len(keep) < len(self._running):
            cancelled += [s for s in self._running if s.stream.cancelled]
            self._batch.keep(keep)
            self._running = [self._running[i] for i in keep]
        for sequence in cancelled:
            sequence.stream.push(sequence.finish("", None, "cancelled", self._batch.device))

    def _admit(self) -> None:
        """Prefill waiting prompts into free slots, `prefill_chunk` tokens of them at the most; a
        prompt that does not fit goes on at the next iteration from where it stopped."""
        budget = self.prefill_chunk or float("inf")
        while budget > 0:
            if self._prefilling is None:
                if len(self._running) >= self.max_batch_size:
                    return
                with self._work:
                    if not self._waiting:
                        return
                    self._prefilling = _Prefill(self._waiting.popleft())
            prefill, sequence = self._prefilling, self._prefilling.sequence
            length = len(sequence.prompt_ids)
            size = int(min(budget, length - prefill.done))
            try:
                chunk = torch.tensor([sequence.prompt_ids[prefill.done : prefill.done + size]])
                logits, prefill.states = self._batch.prefill(chunk, prefill.states, start=prefill.done)
                prefill.done += size
                budget -= size
                if prefill.done < length:
                    return  # the budget is spent: the rest of this prompt at the next iteration
                token = int(sample_next_tokens(logits, [sequence.params], [sequence.generator])[0])
            except Exception as error:
                logger.exception("prefill failed")
                self._prefilling = None
                self._fail([sequence], error)
                continue
            self._prefilling = None
            sequence.state_fixed_bytes, sequence.state_bytes_per_token = self._batch.sequence_state_bytes(
                prefill.states, length
            )
            if not self._emit(sequence, token):
                self._batch.add(prefill.states, length)
                self._running.append(sequence)

    def _decode(self) -> None:
        tokens = torch.tensor([s.last_token for s in self._running])
        try:
            logits = self._batch.step(tokens)
            next_tokens = sample_next_tokens(
                logits, [s.params for s in self._running], [s.generator for s in self._running]
            ).tolist()
        except Exception as error:
            logger.exception("decode step failed")
            self._fail(self._running, error)
            self._batch.keep([])
            self._running = []
            return
        keep = [i for i, (s, token) in enumerate(zip(self._running, next_tokens)) if not self._emit(s, token)]
        self._batch.keep(keep)
        self._running = [self._running[i] for i in keep]

    def _emit(self, sequence: _Sequence, token: int) -> bool:
        """Push the event of `token`; returns whether the request has finished."""
        event = sequence.advance(token, self.eos_token_ids, self._batch.device)
        sequence.stream.push(event)
        return event.finish_reason is not None

    def _fail(self, sequences: list[_Sequence], error: BaseException | str) -> None:
        """End `sequences` with an error event: a failure's type and message, or a plain reason."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        for sequence in sequences:
            sequence.stream.push(sequence.finish("", None, "error", self._batch.device, error=message))


def _eos_token_ids(model: XatlForCausalLM, tokenizer) -> frozenset[int]:
    ids = model.config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)
