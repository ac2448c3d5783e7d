"""The OpenAPI schema says what the service does: FastAPI documents a 422 for every route with
parameters, which this service never sends (a bad request is a 400 in OpenAI's envelope), and none
of the errors it does send, nor its server-sent event streams. `describe_service(app)` rewrites the
generated schema once: no 422, the envelope for 400/401/404/409/413/429/500 where a route can send
them, and `text/event-stream` beside JSON where a route streams."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
WHY = {
    400: "a bad request: `param` names the field", 401: "no key, or a wrong one",
    403: "the model was not made by a job (remove its folder instead)", 404: "no such model, job or file",
    409: "a conflict: a taken name, a reused idempotency key, a file or model in use",
    413: "the request body is over this server's limit", 429: "the server is at its limit of concurrent streams",
    500: "the engine failed",
}
OPEN_PATHS = ("/health",)  # every other route needs the key
STREAMS = {("/v1/completions", "post"), ("/v1/jobs/{job_id}/events", "get")}
TEXT = {"type": "string"}
SSE_EVENT = {  # one server-sent event: its `data` is a JSON object (a chunk, a job event, an error) or [DONE]
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "JSON, or `[DONE]` at the end"}},
}
OTHER_CONTENT = {  # routes whose 200 is not JSON
    ("/metrics", "get"): {"text/plain": {"schema": TEXT}},
    ("/v1/jobs/{job_id}/artifacts/{name}", "get"): {
        "application/x-ndjson": {"schema": TEXT}, "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"type": "object"}}, "text/markdown": {"schema": TEXT}},
}


def _errors(path: str, method: str) -> list[int]:
    codes = {400, 413}
    if path not in OPEN_PATHS:
        codes.add(401)
    if "{" in path or path == "/v1/completions" or (path, method) in (("/v1/jobs", "post"),):
        codes.add(404)
    if (path, method) in (("/v1/jobs", "post"), ("/v1/files/{file_id}", "delete"), ("/v1/models/{model}", "delete")):
        codes.add(409)
    if path == "/v1/completions":
        codes |= {429, 500}
    if path == "/v1/models/{model}" and method == "delete":
        codes.add(403)
    return sorted(codes)


def describe_service(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for generated in ("HTTPValidationError", "ValidationError"):
            components.pop(generated, None)
        components["ErrorResponse"] = ENVELOPE
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code in _errors(path, method):
                    responses[str(code)] = {"description": WHY[code], "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
                if (path, method) in OTHER_CONTENT:
                    responses["200"] = {"description": "OK", "content": OTHER_CONTENT[(path, method)]}
                if (path, method) in STREAMS:
                    ok = responses.setdefault("200", {"description": "OK"}).setdefault("content", {})
                    ok["text/event-stream"] = {"schema": SSE_EVENT}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


__all__ = ["describe_service"]
