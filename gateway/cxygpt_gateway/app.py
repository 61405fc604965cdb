"""The gateway app: create_app() builds every part once, from the settings, and hands each the few it uses; the
lifespan starts and stops what does I/O."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

from cxygpt_profiles import ProfileTable, load_table

from .admission.auth import KeyStore
from .admission.demand import sample_demand, sample_period
from .admission.pipeline import Admission
from .admission.ratelimit import RateLimiter, open_windows
from .admission.request import RELAYED, cut
from .director import Director
from .discovery.base import Discovery
from .discovery.wake import Waker
from .errors import GatewayError
from .exchange.answers import Answers
from .logs import RequestLog
from .metrics import GatewayMetrics
from .routes import health, limits, openai
from .routing.registry import Registry
from .servers.asgi import GatewayApp
from .servers.connections import ConnectionCounts, ConnectionLimits
from .settings import GatewaySettings
from .upstream.client import EngineClient
from .upstream.engine_metrics import EngineLoadScraper
from .upstream.health import HealthChecker
from .upstream.pool import UpstreamPool
from .upstream.relay import Relayer

log = logging.getLogger("cxygpt.gateway")


@dataclass(frozen=True)
class Gateway:
    """The parts create_app built, every one from the start: what the lifespan starts and stops, the servers bind,
    and tests look into. No part is handed this; each got what it uses."""
    settings: GatewaySettings
    registry: Registry
    keys: KeyStore
    metrics: GatewayMetrics
    discovery: Discovery
    connections: ConnectionCounts
    limiter: RateLimiter
    pool: UpstreamPool
    engines: EngineClient
    health_checker: HealthChecker | None   # static backends only: discovery says who is ready otherwise
    waker: Waker
    request_log: RequestLog
    answers: Answers
    director: Director


def make_discovery(settings: GatewaySettings, table: ProfileTable) -> Discovery:
    if settings.kubernetes:
        from .discovery.kubernetes import KubernetesDiscovery
        return KubernetesDiscovery(namespaces=settings.namespaces, kubeconfig=settings.kubeconfig,
                                   gateway_service=settings.gateway_service)
    from .discovery.static import StaticDiscovery
    return StaticDiscovery(settings.models, table)


def build(settings: GatewaySettings, table: ProfileTable, discovery: Discovery | None = None) -> Gateway:
    """Every part, wired: the registry reports degradation into the metrics, which read the registry at scrape time."""
    connections = ConnectionCounts(ConnectionLimits(settings.max_connections, settings.max_connections_per_client,
                                                    settings.health_connections))
    registry: Registry  # made below; the metrics read it only when scraped
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
                        gateways=settings.gateway_replicas, max_adapters=settings.max_adapters_per_model)
    keys = KeyStore.from_file(settings.keys_file)
    discovery = discovery or make_discovery(settings, table)
    limiter = RateLimiter(open_windows(settings.redis_url), on_storage_error=metrics.ratelimit_storage_errors.inc)
    pool = UpstreamPool()
    engines = EngineClient(pool, tokenize_concurrency=settings.tokenize_concurrency)
    waker = Waker(discovery, on_result=lambda model, result: metrics.wakes.labels(model, result).inc())
    request_log = RequestLog(enabled=settings.log_requests)
    answers = Answers(metrics, request_log)
    admission = Admission(settings, keys, registry, limiter, engines, waker, metrics.tokenize_calls)
    relayer = Relayer(pool, metrics, request_log, limiter, health_checked=not settings.kubernetes)
    health_checker = None if settings.kubernetes else HealthChecker(registry, engines, settings.health_interval_s)
    return Gateway(settings=settings, registry=registry, keys=keys, metrics=metrics, discovery=discovery,
                   connections=connections, limiter=limiter, pool=pool, engines=engines, health_checker=health_checker,
                   waker=waker, request_log=request_log, answers=answers,
                   director=Director(admission, relayer, answers))


def create_app(settings: GatewaySettings, *, table: ProfileTable | None = None,
               discovery: Discovery | None = None) -> GatewayApp:
    """Everything that can be wrong in the configuration fails here, before the server listens."""
    table = table or load_table()
    if settings.force_profile:
        try:
            table.get(settings.force_profile)
        except KeyError:
            raise ValueError(f"FORCE_PROFILE={settings.force_profile!r} is not one of "
                             f"{', '.join(table.names)}") from None
    gw = build(settings, table, discovery)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = gw.registry
        await gw.discovery.start(registry)
        tasks = [asyncio.create_task(sample_demand(lambda: registry.routes.values(),
                                                   sample_period(settings.demand_window_s)))]
        if gw.health_checker is not None:
            await gw.health_checker.check_once()
            tasks.append(asyncio.create_task(gw.health_checker.run()))
        if settings.engine_metrics_interval_s > 0:
            scraper = EngineLoadScraper(registry, gw.engines, settings.engine_metrics_interval_s)
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
            gw.pool.close()
            gw.request_log.close()

    app = GatewayApp(title="CxyGPT gateway", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                     description="One OpenAI-compatible endpoint in front of every self-hosted model.")
    app.director = gw.director
    app.state.gateway = gw  # for tests and tools that look in; no route reads it
    install_docs(app)
    app.include_router(openai.router(gw.registry, gw.keys))
    app.include_router(limits.router(gw.registry, gw.keys))
    app.include_router(health.router(gw.registry, gw.metrics.registry))
    install_error_handlers(app, gw.answers)
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


SERVED = ", ".join([*(f"POST {path}" for path in RELAYED), "GET /v1/models", "GET /v1/models/{model}",
                    "GET /v1/limits", "GET /healthz", "GET /readyz", "GET /metrics", "GET /docs"])


def install_error_handlers(app: FastAPI, answers: Answers) -> None:
    def error_response(error: GatewayError) -> Response:
        """A request the gateway answers itself: counted, logged, the OpenAI error body."""
        answers.count(error, model="-", request_id=None, key_id=None, degraded=False)
        return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(GatewayError(400, str(error.errors()[:3])[:1000], code="invalid_request",
                                           reason="invalid_request"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = str(error.detail)
        if error.status_code == 404:  # OpenAI's words for a path it does not serve, and what this one serves
            message = f"Invalid URL ({request.method} {cut(request.url.path, 200)}): this gateway serves {SERVED}"
        body = GatewayError(error.status_code, message, code=None).body()
        return Response(body, status_code=error.status_code, headers=error.headers, media_type="application/json")
