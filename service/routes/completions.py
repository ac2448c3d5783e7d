"""`POST /v1/completions`, compatible with OpenAI's: the whole completion, or (`stream: true`)
server-sent events `data: {chunk}` ending with `data: [DONE]`; `usage` (with
`stream_options.include_usage`, a last chunk that carries it) and an `xatl` block with the
request's figures. An error after the stream has started arrives as `data: {"error": {...}}`.

The engine runs on its own thread; this route only hands requests to it and relays its events,
so the event loop is never blocked by the model. torch is imported when the first request comes.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.deps import LimiterDep, MetricsDep, RegistryDep, SettingsDep, StreamLimiter
from service.errors import APIError, error_body
from service.metrics import Metrics
from service.registry import ModelNotFound, ModelRegistry
from service.schemas.completions import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
    XatlFigures,
)

router = APIRouter(tags=["completions"])

CLIENT_CLOSED_REQUEST = 499  # nobody reads this status: the client has gone
PREFIX_CHARS_PER_TOKEN = 8  # text averages 3-5 characters a token: a prefix this long shows a prompt far too long


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, registry: RegistryDep, settings: SettingsDep,
    metrics: MetricsDep, limiter: LimiterDep,
) -> Completion | StreamingResponse | Response:
    # 1. limits that need no model
    if body.max_new_tokens > settings.max_tokens:
        raise APIError(400, f"max_tokens ({body.max_new_tokens}) exceeds this server's limit of {settings.max_tokens} "
                       "(max_tokens)", param="max_tokens", code="max_tokens_exceeded")

    # 2. the model (loaded on first use), the sampling parameters and the prompt's tokens
    engine = await _engine(registry, body.model)
    params = _sampling_params(body)
    prompt_ids = await run_in_threadpool(_prompt_ids, engine, body.prompt, settings.max_prompt_tokens)

    # 3. a slot, then the engine; no await between fetching the engine and submitting to it, so
    # that the registry cannot unload it in between
    limiter.acquire()
    try:
        engine = await _engine(registry, body.model)
        submitted = time.perf_counter()
        stream = engine.submit_async(prompt_ids, params)
    except ValueError as error:
        limiter.release()
        raise APIError(400, str(error), param="prompt") from None
    except BaseException:
        limiter.release()
        raise
    metrics.prompt_tokens.labels(body.model).inc(len(prompt_ids))
    run = _CompletionRun(body.model, stream, submitted, metrics, limiter)
    if body.stream:
        return StreamingResponse(
            run.server_sent_events(body.include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await run.collect(request)


async def _engine(registry: ModelRegistry, name: str):
    try:
        return await registry.engine(name)
    except ModelNotFound:
        raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found") from None


def _sampling_params(body: CompletionRequest):
    from xatl.serving import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=body.max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=body.stop_sequences,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None


def _prompt_ids(engine, prompt, limit: int) -> list[int]:
    """One prompt's token ids: a string, or token ids; a list holding one of them is accepted too.
    A text far over the limit is refused from its beginning, without tokenising all of it."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str) and len(prompt) > (limit + 1) * PREFIX_CHARS_PER_TOKEN:
        if len(engine.encode(prompt[: (limit + 1) * PREFIX_CHARS_PER_TOKEN])) > limit:
            _too_long(f"more than {limit}", limit)
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if len(ids) > limit:
        _too_long(str(len(ids)), limit)
    return ids


def _too_long(count: str, limit: int):
    raise APIError(400, f"the prompt has {count} tokens, over this server's limit of {limit} (max_prompt_tokens)",
                   param="prompt", code="max_prompt_tokens_exceeded")


class _CompletionRun:
    """One request's events as they come: metrics observed, the slot released at the end."""

    def __init__(self, model: str, stream, submitted: float, metrics: Metrics, limiter: StreamLimiter):
        self.model = model
        self.stream = stream
        self.submitted = submitted
        self.metrics = metrics
        self.limiter = limiter
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.finish_reason: str | None = None

    async def events(self):
        previous = None
        try:
            async for event in self.stream:
                if event.token_id is not None:
                    self.metrics.generation_tokens.labels(self.model).inc()
                    if previous is None:
                        self.metrics.time_to_first_token.labels(self.model).observe(event.time - self.submitted)
                    else:
                        self.metrics.inter_token_latency.labels(self.model).observe(event.time - previous)
                    previous = event.time
                if event.finish_reason is not None:
                    self.finish_reason = event.finish_reason
                    self.metrics.e2e_latency.labels(self.model).observe(event.figures.e2e_s)
                yield event
        finally:
            self.stream.cancel()  # the client went away (a no-op once the request has finished)
            self.limiter.release()
            self.metrics.requests.labels(self.model, self.finish_reason or "cancelled").inc()

    async def server_sent_events(self, include_usage: bool):
        async with aclosing(self.events()) as events:
            async for event in events:
                if event.finish_reason in ("error", "cancelled"):
                    message = event.error or "the request was cancelled by the server"
                    yield _sse(error_body(message, "server_error", code="generation_failed"))
                    break
                if event.text or event.finish_reason:
                    chunk = self._chunk([_choice(event.text, event.finish_reason)], event if event.figures else None)
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                if event.finish_reason and include_usage:
                    yield _sse(self._chunk([], event, usage=True))
        yield "data: [DONE]\n\n"

    async def collect(self, request: Request) -> Completion | Response:
        pieces = []
        async with aclosing(self.events()) as events:
            async for event in events:
                pieces.append(event.text)
                if event.finish_reason is None and await request.is_disconnected():
                    return Response(status_code=CLIENT_CLOSED_REQUEST)  # leaving the loop frees the slot
        if event.finish_reason in ("error", "cancelled"):
            raise APIError(500, event.error or "the request was cancelled by the server", type="server_error",
                           code="generation_failed")
        figures = event.figures
        return Completion(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChoice(text="".join(pieces), finish_reason=event.finish_reason)],
            usage=_usage(figures), xatl=_figures(figures),
        )

    def _chunk(self, choices: list[dict], final_event=None, usage: bool = False) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": choices}
        if usage:
            chunk["usage"] = _usage(final_event.figures).model_dump()
        if final_event is not None:
            chunk["xatl"] = _figures(final_event.figures).model_dump()
        return chunk


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _usage(figures) -> Usage:
    return Usage(prompt_tokens=figures.prompt_tokens, completion_tokens=figures.completion_tokens,
                 total_tokens=figures.prompt_tokens + figures.completion_tokens)


def _figures(figures) -> XatlFigures:
    return XatlFigures(ttft_s=figures.ttft_s, e2e_s=figures.e2e_s, tokens_per_s=figures.tokens_per_s,
                       state_bytes=figures.state_bytes, peak_memory_bytes=figures.peak_memory_bytes)


#: characters that JSON leaves raw but Python's `str.splitlines` (and so httpx's `iter_lines`) breaks lines at;
#: generated text holds them now and then, which cut an event in two for such clients
_LINE_BREAKERS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: dict) -> str:
    # JSON escapes every other line break; these three it keeps raw, and only inside strings: escape them
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKERS)}\n\n"
