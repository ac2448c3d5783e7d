"""`GET /v1/models`: every model folder under the models directory, by folder name;
`DELETE /v1/models/{model}`: remove a model a job made."""

import os
import shutil
import uuid

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import RegistryDep, StoreDep
from service.errors import APIError
from service.registry import ModelNotFound
from service.schemas.jobs import Deleted
from service.schemas.models import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[_card(f, registry) for f in registry.folders()])


@router.get("/{model}")
async def retrieve_model(model: str, registry: RegistryDep) -> ModelCard:
    try:
        folder = registry.folder(model)
    except ModelNotFound:
        raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found") from None
    return _card(folder, registry)


def _card(folder, registry) -> ModelCard:
    return ModelCard(id=folder.name, created=folder.created, precision=registry.served_precision(folder))


@router.delete("/{model}")
async def delete_model(model: str, registry: RegistryDep, store: StoreDep) -> Deleted:
    """Only models made by jobs: others were put in the models folder by hand, and are removed there."""
    try:
        folder = registry.folder(model)
    except ModelNotFound:
        raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found") from None
    if await run_in_threadpool(store.get_model, model) is None:
        raise APIError(403, f"the model {model!r} was not made by a job; remove its folder from the models "
                       "directory instead", param="model", code="model_not_deletable")
    user = await run_in_threadpool(store.model_in_use, model)
    if user is not None:
        raise APIError(409, f"the model {model!r} is used by the unfinished job {user['id']}", param="model",
                       code="model_in_use")
    if not registry.unload(model):
        raise APIError(409, f"the model {model!r} is generating; try again when its requests have finished",
                       param="model", code="model_in_use")
    # out of the listing in one step (a hidden name), then deleted (xatl.artifacts would import torch)
    doomed = folder.path.with_name(f".{model}.{uuid.uuid4().hex[:8]}.deleted")
    os.rename(folder.path, doomed)
    await run_in_threadpool(store.delete_model, model)
    await run_in_threadpool(shutil.rmtree, doomed, True)
    return Deleted(id=model, object="model")
