"""Every error leaves as OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`,
with a 4xx naming the field or the limit when the request is at fault, and never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with the status and envelope fields to answer it with."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(error, *, union_tags: tuple[str, ...] = ()) -> APIError:
    """A 400 for a pydantic `ValidationError` of a body the route parsed itself: `param` is the
    dotted path of the first field at fault (`training.steps`), without the tags of a union."""
    first = error.errors()[0]
    path = [str(part) for part in first["loc"] if part not in union_tags]
    param = ".".join(path) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=first["type"])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return JSONResponse(error_body(message, "invalid_request_error", None, "json_invalid"), status_code=400)
    # the top-level field at fault (deeper parts name union members as often as fields)
    location = [part for part in first["loc"] if part not in ("body", "query", "path")]
    param = str(location[0]) if location else None
    message = first["msg"].removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    return JSONResponse(error_body(message, "invalid_request_error", param, first["type"]), status_code=400)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code, headers=error.headers)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
