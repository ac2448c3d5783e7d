"""Request bodies over their limit are refused with 413 before they are read: from the
Content-Length header at once, or — for a body sent in chunks — as soon as what arrived passes the
limit. File uploads have their own, larger limit (`max_upload_bytes`); every other route takes at
most `max_request_bytes` (a prompt of `max_prompt_tokens` tokens is far below it)."""

from __future__ import annotations

from service.errors import error_body

MULTIPART_OVERHEAD = 1 << 20  # boundaries and the other form fields beside an upload's bytes


class BodySizeLimit:
    """ASGI middleware. `limits` maps a path prefix to its limit in bytes; others get `default`."""

    def __init__(self, app, *, default: int, limits: dict[str, int]):
        self.app, self.default, self.limits = app, default, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = next((v for prefix, v in self.limits.items() if path.startswith(prefix)), self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _refuse(send, limit)
        received, refused, started = 0, False, False

        async def counted():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # answer now; the app reads on to a disconnect and its answer is dropped
                    refused = True
                    if not started:
                        await _refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        await self.app(scope, counted, guarded_send)


def _message(limit: int) -> str:
    return f"the request body is larger than this server accepts here ({limit:,} bytes)"


async def _refuse(send, limit: int) -> None:
    import json

    body = json.dumps(error_body(_message(limit), "invalid_request_error", None, "request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
