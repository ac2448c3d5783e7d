"""The FastAPI application: `create_app(settings)`. Run it with `xatl serve`, or with
`uvicorn --factory service.main:create_app` (settings then come from the environment)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.config import Settings
from service.deps import StreamLimiter, require_api_key
from service.errors import install_error_handlers
from service.keys import read_stored_key
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.routes import completions, health, metrics, models
from service.routes.docs import install_docs


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = ModelRegistry(
        settings.resolved_models_dir, capacity=settings.loaded_models, device=settings.device,
        max_batch_size=settings.max_batch_size, torch_threads=settings.torch_threads, compile=settings.compile,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        registry.close()  # stop the engines' threads

    app = FastAPI(title="xatl", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.api_keys = settings.api_keys or [k for k in [read_stored_key(settings.data_dir)] if k]
    app.state.registry = registry
    app.state.metrics = Metrics(registry)
    app.state.limiter = StreamLimiter(settings.max_concurrent_streams)
    install_error_handlers(app)

    app.include_router(health.router)
    install_docs(app)
    guarded = [Depends(require_api_key)]
    for router in (models.router, completions.router, metrics.router):
        app.include_router(router, dependencies=guarded)
    return app
