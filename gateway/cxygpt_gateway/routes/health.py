"""Liveness, readiness (a backend is routable) and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from . import json_response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process serves HTTP")
async def healthz():
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Ready when at least one model has a routable backend")
async def readyz(request: Request):
    routable = [r.name for r in request.app.state.gateway.registry.routable()]
    return json_response({"ready": bool(routable), "models": routable}, 200 if routable else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
