"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from lmforge.serve.deps import ServerState, get_state

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """200 while the process is alive (a liveness probe)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: ServerState = Depends(get_state)) -> JSONResponse:
    """200 once the engine is loaded and while not draining; 503 otherwise (a readiness probe)."""
    stats = state.engine.health()
    if state.draining or stats.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not stats.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
