"""`GET /v1/models`: every model folder under the models directory, by folder name."""

from fastapi import APIRouter

from service.deps import RegistryDep
from service.errors import APIError
from service.registry import ModelNotFound
from service.schemas.models import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[ModelCard(id=f.name, created=f.created) for f in registry.folders()])


@router.get("/{model}")
async def retrieve_model(model: str, registry: RegistryDep) -> ModelCard:
    try:
        folder = registry.folder(model)
    except ModelNotFound:
        raise APIError(404, f"the model {model!r} does not exist", param="model", code="model_not_found") from None
    return ModelCard(id=folder.name, created=folder.created)
