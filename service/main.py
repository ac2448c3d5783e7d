"""The FastAPI application: `create_app(settings)`. Run it with `xatl serve`, or with
`uvicorn --factory service.main:create_app` (settings then come from the environment)."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service.config import Settings
from service.deps import StreamLimiter, reject_unknown_query, require_api_key
from service.errors import install_error_handlers
from service.keys import read_stored_key
from service.limits import MULTIPART_OVERHEAD, BodySizeLimit
from service.metrics import Metrics
from service.openapi import describe_service
from service.registry import ModelRegistry
from service.routes import completions, files, health, jobs, metrics, models
from service.routes.docs import install_docs
from worker.store import JobStore


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = ModelRegistry(
        settings.resolved_models_dir, capacity=settings.loaded_models, device=settings.device,
        max_batch_size=settings.max_batch_size, torch_threads=settings.torch_threads, compile=settings.compile,
        precision=settings.precision,
    )

    store = JobStore(settings.resolved_database_url)  # the schema comes from `xatl db upgrade` / `xatl serve`

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        registry.close()  # stop the engines' threads
        store.close()

    app = FastAPI(title="xatl", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(reject_unknown_query)])
    app.state.settings = settings
    app.state.api_keys = settings.api_keys or [k for k in [read_stored_key(settings.home)] if k]
    app.state.registry = registry
    app.state.metrics = Metrics(registry)
    app.state.limiter = StreamLimiter(settings.max_concurrent_streams)
    app.state.store = store
    app.state.dispatch = _dispatcher(settings)
    app.state.stopping = threading.Event()  # set when the server begins to shut down (service.server)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, default=settings.max_request_bytes,
                       limits={"/v1/files": settings.max_upload_bytes + MULTIPART_OVERHEAD})

    app.include_router(health.router)
    install_docs(app)
    guarded = [Depends(require_api_key)]
    for router in (models.router, completions.router, metrics.router, files.router, jobs.router):
        app.include_router(router, dependencies=guarded)
    describe_service(app)
    return app


def _dispatcher(settings: Settings):
    """Sends a job id to its queue (Celery, by task name: the worker's code is not imported here)."""
    celery = None

    def dispatch(job_id: str, queue: str) -> None:
        nonlocal celery
        if not settings.redis_url:
            raise RuntimeError("no Redis is configured (XATL_REDIS_URL): a worker's sweep will send the job")
        if celery is None:
            from worker.celery_app import make_celery

            celery = make_celery(settings.redis_url)
        from worker.celery_app import dispatch as send

        send(celery, job_id, queue)

    return dispatch
