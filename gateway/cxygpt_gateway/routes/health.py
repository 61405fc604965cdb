"""Liveness, readiness (a backend is routable) and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from ..routing.registry import Registry
from . import json_response


def router(registry: Registry, metrics: CollectorRegistry) -> APIRouter:
    routes = APIRouter(tags=["health"])

    @routes.get("/healthz", summary="The process serves HTTP")
    async def healthz():
        return json_response({"status": "ok"})

    @routes.get("/readyz", summary="Ready when at least one model has a routable backend")
    async def readyz():
        routable = [r.name for r in registry.routable()]
        return json_response({"ready": bool(routable), "models": routable}, 200 if routable else 503)

    @routes.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return routes
