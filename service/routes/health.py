"""`GET /health`: the process answers. No API key needed (for load balancers and compose)."""

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}
