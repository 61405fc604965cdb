"""The console's web app: pages, their live parts (server-sent events), its small JSON API and the playground's
relay."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aiohttp
import anyio
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.middleware.sessions import SessionMiddleware
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import views
from .auth import MAX_FORM_BYTES, SESSION_USER, Auth, LoginRefused, form_field
from .kube import ApiServer, Changes, Cluster
from .logs import shown_lines
from .relay import GatewayRelay, TooLarge, openai_error, read_body
from .series import latest
from .sources import Gateway, Prometheus

log = logging.getLogger("cxygpt.console")
HERE = Path(__file__).parent
VERSION = "0.1.0"
MAX_LIVE = 200               # live streams (pages and logs) open at once
MAX_LOG_FOLLOWERS = 16       # of those, engine logs followed at once (each holds a read on the API server)
LIVE_MAX_S = 600             # a live stream ends after this (the browser reconnects, and the login is checked again)
KEEPALIVE_S = 15.0
MIN_GAP_S = 1.0              # a live part is sent at most this often
SESSION_MAX_AGE_S = 12 * 3600


@dataclass
class Settings:
    gateway_url: str
    namespaces: list[str] = field(default_factory=list)
    kubeconfig: str | None = None
    gateway_service: tuple[str, str] | None = None
    prometheus_url: str | None = None
    auth: str = "none"
    token: str | None = None
    interval_s: float = 5.0
    secure_cookies: bool = False


class Console:
    """What the app's routes share: the cluster view, the gateway's, the relay and the limits on live streams."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.changes = Changes()
        self.cluster = Cluster(ApiServer(settings.kubeconfig), settings.namespaces, self.changes,
                               settings.gateway_service)
        prometheus = Prometheus(settings.prometheus_url) if settings.prometheus_url else None
        self.gateway = Gateway(settings.gateway_url, self.cluster, self.changes, settings.interval_s,
                               prometheus=prometheus)
        self.relay = GatewayRelay(settings.gateway_url)
        self.auth = Auth(settings.auth, token=settings.token, check_key=self.relay.check_key)
        self.live = 0
        self.log_followers = 0
        self._rendered: dict[str, tuple[int, str | None]] = {}
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set when it starts
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(read_bufsize=1 << 20)
        self.relay.session = self.session
        await self.cluster.start(self.session)
        self.tasks.append(asyncio.create_task(self.gateway.run(self.session)))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.cluster.stop()
        await self.session.close()

    def rendered(self, key: str, version: int, html_of: Callable[[], str | None]) -> str | None:
        """A live part as of `version`, rendered once for every page that shows it (at most MAX_LIVE kept)."""
        cached = self._rendered.get(key)
        if cached is None or cached[0] != version:
            if key not in self._rendered and len(self._rendered) >= MAX_LIVE:
                del self._rendered[next(iter(self._rendered))]
            cached = self._rendered[key] = (version, html_of())
        return cached[1]

    def problems(self) -> list[str]:
        return self.cluster.problems() + self.gateway.problems()

    def md(self, namespace: str, name: str) -> dict | None:
        return next((m for m in self.cluster.all("modeldeployments")
                     if (m["metadata"].get("namespace"), m["metadata"].get("name")) == (namespace, name)), None)


class NeedsLogin(Exception):
    pass


def create_app(settings: Settings) -> FastAPI:
    console = Console(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await console.start()
        try:
            yield
        finally:
            await console.stop()

    app = FastAPI(title="CxyGPT console", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.console = console
    # the session is a signed cookie (the signing key lives as long as the process); it holds the user's key id
    # or "token", never a key
    app.add_middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie="cxygpt_console",
                       max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=settings.secure_cookies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(version=VERSION)

    def user_of(request: Request) -> str:
        user = console.auth.user(request.session)
        if user is None:
            raise NeedsLogin()
        return user

    @app.exception_handler(NeedsLogin)
    async def needs_login(request: Request, exc: NeedsLogin):
        if request.url.path.startswith(("/api/", "/events/", "/gateway/")):
            return JSONResponse({"error": {"message": "sign in to the console first", "type": "console_error",
                                           "code": "login_required", "param": None}}, status_code=401)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    def page(request: Request, template: str, user: str, **context) -> HTMLResponse:
        now = datetime.now(UTC)
        return templates.TemplateResponse(request, template, {
            "user": user, "auth": console.auth.mode, "problems": console.problems(), "now": now, **context})

    def render(template: str, **context) -> str:
        return templates.get_template(template).render(now=datetime.now(UTC), problems=console.problems(),
                                                       **context)

    # ---------------------------------------------------------------- what each page shows, computed on demand
    def fleet_context() -> dict:
        export = console.gateway.export()
        rows = views.fleet_rows(console.cluster.all("modeldeployments"), console.gateway.limits, latest(export),
                                datetime.now(UTC))
        return {"rows": rows, "limits_known": console.gateway.limits is not None}

    def model_context(namespace: str, name: str) -> dict | None:
        md = console.md(namespace, name)
        if md is None:
            return None
        now = datetime.now(UTC)
        pods = console.cluster.all("pods")
        served = ((md.get("spec") or {}).get("model") or {}).get("name")
        limits = console.gateway.limits
        gateway = None if limits is None else (limits.get("models") or {}).get(str(served), {})
        return {"md": md, "row": views.model_row(md, gateway, latest(console.gateway.export()).get(str(served)), now),
                "replicas": views.replicas_of(md, pods, now),
                "timeline": views.timeline_of(md, console.cluster.all("events"), now),
                "vllm_command": views.vllm_command(md), "run_command": views.run_command(md, pods),
                "yaml": views.as_yaml(md)}

    def gpus_context() -> dict:
        return {"nodes": views.gpu_nodes(console.cluster.all("nodes"), console.cluster.all("modeldeployments"),
                                         console.cluster.all("pods"))}

    # ---------------------------------------------------------------- live parts
    async def live_stream(key: str, html_of: Callable[[], str | None], event: str) -> AsyncIterator[str]:
        console.live += 1
        try:
            yield "retry: 2000\n\n"
            seen, last, ends = -1, None, time.monotonic() + LIVE_MAX_S
            while time.monotonic() < ends:
                version = await console.changes.wait(seen, KEEPALIVE_S)
                if version == seen:
                    yield ": keep-alive\n\n"
                    continue
                seen = version
                html = console.rendered(key, version, html_of)
                if html is None:  # the object is gone: the page says so once and the stream ends
                    yield _sse("gone", "")
                    return
                if html != last:
                    last = html
                    yield _sse(event, html)
                await asyncio.sleep(MIN_GAP_S)
        finally:
            console.live -= 1

    def open_live(key: str, html_of: Callable[[], str | None], event: str) -> Response:
        if console.live >= MAX_LIVE:
            return JSONResponse({"error": {"message": f"{MAX_LIVE} live views are open; try again shortly",
                                           "type": "console_error", "code": "console_busy", "param": None}},
                                status_code=503, headers={"Retry-After": "5"})
        return StreamingResponse(live_stream(key, html_of, event), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- routes
    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/"):
        if not console.auth.required:
            return RedirectResponse("/", status_code=303)
        return templates.TemplateResponse(request, "login.html", {"auth": console.auth.mode, "next": _local(next),
                                                                  "error": None, "user": None, "problems": []})

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request, next: str = "/"):
        if not console.auth.required:
            return RedirectResponse("/", status_code=303)
        try:
            body = await read_body(request, MAX_FORM_BYTES)
            address = request.client.host if request.client else ""
            user = await console.auth.login(form_field(body, "credential"), address)
        except (LoginRefused, TooLarge) as e:
            status = e.status if isinstance(e, LoginRefused) else 413
            message = str(e) if isinstance(e, LoginRefused) else "the form is too large"
            return templates.TemplateResponse(request, "login.html", {
                "auth": console.auth.mode, "next": _local(next), "error": message, "user": None, "problems": []},
                status_code=status)
        request.session.clear()
        request.session[SESSION_USER] = user
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout")
    async def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/login" if console.auth.required else "/", status_code=303)

    @app.get("/", response_class=HTMLResponse)
    async def fleet(request: Request):
        return page(request, "fleet.html", user_of(request), **fleet_context(),
                    mode="Prometheus" if settings.prometheus_url else "scraped by the console")

    @app.get("/events/fleet")
    async def fleet_live(request: Request):
        user_of(request)
        return open_live("fleet", lambda: render("_fleet.html", **fleet_context()), "fleet")

    @app.get("/api/series")
    async def series(request: Request):
        user_of(request)
        return Response(orjson.dumps(console.gateway.export()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    @app.get("/models/{namespace}/{name}", response_class=HTMLResponse)
    async def model(request: Request, namespace: str, name: str):
        user = user_of(request)
        context = model_context(namespace, name)
        if context is None:
            raise HTTPException(404, f"no ModelDeployment {namespace}/{name} (in the namespaces the console watches)")
        return page(request, "model.html", user, **context)

    @app.get("/events/models/{namespace}/{name}")
    async def model_live(request: Request, namespace: str, name: str):
        user_of(request)

        def model_html():
            context = model_context(namespace, name)
            return None if context is None else render("_model.html", **context)
        return open_live(f"model {namespace}/{name}", model_html, "model")

    @app.get("/events/logs/{namespace}/{pod}")
    async def logs_live(request: Request, namespace: str, pod: str, container: str = "engine"):
        user_of(request)
        owner = next((md for md in console.cluster.all("modeldeployments")
                      for p in console.cluster.all("pods")
                      if (p["metadata"].get("namespace"), p["metadata"].get("name")) == (namespace, pod)
                      and views.owns_pod(md, p)), None)
        if owner is None:  # only the engines of a model: no other pod's log is shown
            raise HTTPException(404, f"{namespace}/{pod} is not an engine pod of a ModelDeployment")
        if console.log_followers >= MAX_LOG_FOLLOWERS or console.live >= MAX_LIVE:
            return JSONResponse({"error": {"message": f"{MAX_LOG_FOLLOWERS} logs are followed at once; try again "
                                           "shortly", "type": "console_error", "code": "console_busy", "param": None}},
                                status_code=503, headers={"Retry-After": "5"})

        async def stream() -> AsyncIterator[str]:
            console.log_followers += 1
            console.live += 1
            lines = console.cluster.follow_log(namespace, pod, container)
            # the next batch is awaited across keep-alives: cancelling a read would end the log's generator
            pending: asyncio.Task | None = None
            try:
                yield "retry: 3000\n\n"
                ends = time.monotonic() + LIVE_MAX_S
                while time.monotonic() < ends:
                    pending = pending or asyncio.ensure_future(anext(lines))
                    done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
                    if not done:
                        yield ": keep-alive\n\n"
                        continue
                    batch, pending = pending.result(), None
                    shown, hidden = shown_lines(batch)
                    yield _sse("lines", orjson.dumps({"lines": shown, "hidden": hidden}).decode())
            finally:
                console.log_followers -= 1
                console.live -= 1
                # a viewer who left cancels this stream, and every await in here again: the log's read is ended
                # shielded from that
                with anyio.CancelScope(shield=True):
                    if pending is not None:
                        pending.cancel()
                        await asyncio.gather(pending, return_exceptions=True)
                    await lines.aclose()
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/gpus", response_class=HTMLResponse)
    async def gpus(request: Request):
        return page(request, "gpus.html", user_of(request), **gpus_context())

    @app.get("/events/gpus")
    async def gpus_live(request: Request):
        user_of(request)
        return open_live("gpus", lambda: render("_gpus.html", **gpus_context()), "gpus")

    @app.get("/playground", response_class=HTMLResponse)
    async def playground(request: Request):
        return page(request, "playground.html", user_of(request))

    @app.post("/api/tokenize")
    async def tokenize(request: Request):
        user_of(request)
        return await console.relay.count_tokens(request, console.cluster.all("modeldeployments"),
                                                console.cluster.all("endpointslices"), console.gateway.limits)

    @app.api_route("/gateway/{path:path}", methods=["GET", "POST"])
    async def gateway(request: Request, path: str):
        user_of(request)
        return await console.relay.relay(request, path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith(("/api/", "/events/", "/gateway/")):
            return openai_error(exc.status_code, str(exc.detail), "console_error")
        return templates.TemplateResponse(request, "error.html", {
            "status": exc.status_code, "message": exc.detail, "user": console.auth.user(request.session),
            "auth": console.auth.mode, "problems": []}, status_code=exc.status_code)

    return app


def _sse(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n"


def _local(target: str) -> str:
    """Only a path of this console to go back to after signing in (never another site)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"
