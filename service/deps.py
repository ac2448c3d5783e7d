"""Dependencies of the routes, as `Annotated` types: settings, model registry, metrics, the
concurrency limit, and the API key check that guards every route but /health."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.errors import APIError
from service.metrics import Metrics
from service.registry import ModelRegistry
from worker.store import JobStore


class StreamLimiter:
    """Counts requests in flight; one over `limit` is refused with 429."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(
                429, f"the server is at its limit of {self.limit} concurrent streams (max_concurrent_streams); "
                "retry later", type="rate_limit_error", code="max_concurrent_streams",
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_limiter(request: Request) -> StreamLimiter:
    return request.app.state.limiter


def get_store(request: Request) -> JobStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LimiterDep = Annotated[StreamLimiter, Depends(get_limiter)]
StoreDep = Annotated[JobStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    keys: list[str] = request.app.state.api_keys
    challenge = {"WWW-Authenticate": "Bearer"}
    if not keys:
        raise APIError(401, "no API key is configured on this server: set XATL_API_KEYS or start it with "
                       "`xatl serve`, which makes one", code="invalid_api_key", headers=challenge)
    if credentials is None:
        raise APIError(401, "missing API key: send it as `Authorization: Bearer <key>`",
                       code="invalid_api_key", headers=challenge)
    # digests compared in constant time, against every key: neither the key's length, nor how much of
    # it was right, nor which key matched shows in the time the answer takes
    given = _digest(credentials.credentials)
    if not any([secrets.compare_digest(given, _digest(key)) for key in keys]):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key", headers=challenge)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is a 400 naming it, as an unknown body field is."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    known, pending = set(), [route.dependant]
    while pending:  # the route's own query parameters and those of its dependencies
        dependant = pending.pop()
        known |= {param.alias for param in dependant.query_params}
        pending += dependant.dependencies
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise APIError(400, f"unknown query parameter {unknown[0]!r}; this route takes {sorted(known) or 'none'}",
                       param=unknown[0], code="unknown_parameter")
