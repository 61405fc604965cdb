"""The gateway app: create_app() wires settings, discovery, admission and relay; the lifespan owns clients."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from cxygpt_profiles import ProfileTable, load_table
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

from .admission.auth import KeyStore
from .admission.ratelimit import RateLimiter, open_windows
from .connections import ConnectionCounts, ConnectionLimits
from .discovery.base import Discovery
from .enginemetrics import EngineLoadScraper
from .errors import GatewayError
from .exchange import AsgiExchange, count_rejection
from .logs import RequestLog
from .metrics import GatewayMetrics
from .relay import serve
from .routes import health, limits, openai
from .registry import Registry
from .settings import GatewaySettings
from .healthcheck import HealthChecker
from .upstream import Upstream
from .demand import sample_demand, sample_period
from .wake import Waker

log = logging.getLogger("cxygpt.gateway")


@dataclass
class Gateway:
    """The app's services; routes and admission reach them through app.state.gateway."""
    settings: GatewaySettings
    table: ProfileTable
    registry: Registry
    keys: KeyStore
    metrics: GatewayMetrics
    discovery: Discovery
    connections: ConnectionCounts
    limiter: RateLimiter | None = None
    upstream: Upstream | None = None
    health_checker: HealthChecker | None = None
    waker: Waker | None = None
    request_log: RequestLog = field(default_factory=lambda: RequestLog(enabled=False))


HOT_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
             "/v1/embeddings": "embeddings"}


class GatewayApp(FastAPI):
    """FastAPI for the app factory, docs and every other route; the two relayed POST routes are served
    straight from here (same admission, relay and error answers as the gateway's own server, server.py),
    skipping the routing, dependency and middleware layers that cost ~20 % of the gateway's CPU per request
    (measured, BENCHMARKS.md)."""

    async def __call__(self, scope, receive, send) -> None:
        kind = HOT_PATHS.get(scope.get("path")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        ex = AsgiExchange(scope, receive, send)
        try:
            await serve(self.state.gateway, ex, kind)
        finally:
            ex.close()


def make_discovery(settings: GatewaySettings, table: ProfileTable) -> Discovery:
    if settings.kubernetes:
        from .discovery.kubernetes import KubernetesDiscovery
        return KubernetesDiscovery(namespaces=settings.namespaces, kubeconfig=settings.kubeconfig,
                                   gateway_service=settings.gateway_service)
    from .discovery.static import StaticDiscovery
    return StaticDiscovery(settings.models, table)


def create_app(settings: GatewaySettings, *, table: ProfileTable | None = None,
               discovery: Discovery | None = None) -> FastAPI:
    """Everything that can be wrong in the configuration fails here, before the server listens."""
    table = table or load_table()
    if settings.force_profile:
        try:
            table.get(settings.force_profile)
        except KeyError:
            raise ValueError(f"FORCE_PROFILE={settings.force_profile!r} is not one of {', '.join(table.names)}") from None
    # the metrics read the registry at scrape time; the registry reports degradation into the metrics
    connections = ConnectionCounts(ConnectionLimits(settings.max_connections, settings.max_connections_per_client,
                                                    settings.health_connections))
    metrics = GatewayMetrics(lambda: registry.routes.values(), lambda: registry.gateways, lambda: connections.total)

    def on_degrade(model: str, degraded: bool, why: str) -> None:
        if degraded:
            metrics.degrade_transitions.labels(model).inc()
        log.warning("model %s %s: %s", model, "degraded" if degraded else "recovered", why,
                    extra={"fields": {"event": "degrade", "model": model, "degraded": degraded}})

    registry = Registry(table, single_user=settings.single_user, force_profile=settings.force_profile,
                        auto_degrade=settings.auto_degrade, degrade_window_s=settings.degrade_window_s,
                        routing_policy=settings.routing.policy, routing_epsilon=settings.routing.epsilon,
                        on_degrade=on_degrade, demand_window_s=settings.demand_window_s,
                        gateways=settings.gateway_replicas)
    gw = Gateway(settings=settings, table=table, registry=registry,
                 keys=KeyStore.from_file(settings.keys_file), metrics=metrics,
                 discovery=discovery or make_discovery(settings, table), connections=connections,
                 request_log=RequestLog(enabled=settings.log_requests))
    gw.waker = Waker(gw.discovery, on_result=lambda model, result: metrics.wakes.labels(model, result).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw.limiter = RateLimiter(open_windows(settings.redis_url),
                                 on_storage_error=gw.metrics.ratelimit_storage_errors.inc)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=30, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            gw.upstream = Upstream(session, tokenize_concurrency=settings.tokenize_concurrency)
            await gw.discovery.start(registry)
            tasks = [asyncio.create_task(sample_demand(lambda: registry.routes.values(),
                                                       sample_period(settings.demand_window_s)))]
            if not settings.kubernetes:
                gw.health_checker = HealthChecker(registry, gw.upstream, settings.health_interval_s)
                await gw.health_checker.check_once()
                tasks.append(asyncio.create_task(gw.health_checker.run()))
            if settings.engine_metrics_interval_s > 0:
                scraper = EngineLoadScraper(registry, session, settings.engine_metrics_interval_s)
                tasks.append(asyncio.create_task(scraper.run()))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await gw.waker.close()
                await gw.discovery.stop()
                gw.upstream.pool.close()
                gw.request_log.close()

    app = GatewayApp(title="CxyGPT gateway", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                     description="One OpenAI-compatible endpoint in front of every self-hosted model.")
    app.state.gateway = gw
    install_docs(app)
    app.include_router(openai.router)
    app.include_router(limits.router)
    app.include_router(health.router)
    install_error_handlers(app)
    return app


# Swagger UI and ReDoc as fastapi-offline ships them (pinned): /docs works on a cluster with no internet
DOCS_ASSETS = importlib.resources.files("fastapi_offline") / "static"


def install_docs(app: FastAPI) -> None:
    app.mount("/docs/assets", StaticFiles(directory=str(DOCS_ASSETS)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/assets/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/docs/assets/favicon.png", with_google_fonts=False)


SERVED = ", ".join([*(f"POST {path}" for path in HOT_PATHS), "GET /v1/models", "GET /v1/models/{model}",
                    "GET /v1/limits", "GET /healthz", "GET /readyz", "GET /metrics", "GET /docs"])


def error_response(request: Request, error: GatewayError) -> Response:
    """A request the gateway answers itself: counted, logged, the OpenAI error body."""
    count_rejection(request.app.state.gateway, error, model="-", request_id=None, key_id=None, degraded=False)
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError):
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(request, GatewayError(400, str(error.errors()[:3]), code="invalid_request",
                                            reason="invalid_request"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = str(error.detail)
        if error.status_code == 404:  # OpenAI's words for a path it does not serve, and what this one serves
            message = f"Invalid URL ({request.method} {request.url.path}): this gateway serves {SERVED}"
        body = GatewayError(error.status_code, message, code=None).body()
        return Response(body, status_code=error.status_code, headers=error.headers, media_type="application/json")
