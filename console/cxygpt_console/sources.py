"""The gateway's view and the fleet's metrics: /v1/limits, each gateway replica's /metrics, or Prometheus."""
from __future__ import annotations

import asyncio
import logging
import math
import time

import aiohttp
import orjson

from .kube import Changes, Cluster
from .series import CHARTS, MAX_MODELS, WINDOW_S, Scrape, SeriesStore, parse_scrape

log = logging.getLogger("cxygpt.console.sources")
READ_TIMEOUT_S = 3.0
MAX_BODY_BYTES = 8 << 20        # the most a /metrics or Prometheus answer may be
MAX_GATEWAY_REPLICAS = 32       # scraped per round
PROMETHEUS_STEP_S = 15
# the same charts from Prometheus: summed over the gateway replicas it scrapes
PROMQL = {
    "rps": "sum by (model) (rate(cxygpt_gateway_requests_total[1m]))",
    "ttft_p50": "1000 * histogram_quantile(0.5, sum by (model, le) (rate(cxygpt_gateway_ttft_seconds_bucket[1m])))",
    "ttft_p95": "1000 * histogram_quantile(0.95, sum by (model, le) (rate(cxygpt_gateway_ttft_seconds_bucket[1m])))",
    "queue": "sum by (model) (cxygpt_gateway_queue_depth)",
    "tps": "sum by (model) (rate(cxygpt_gateway_completion_tokens_total[1m]))",
}


async def read_bounded(response: aiohttp.ClientResponse, limit: int = MAX_BODY_BYTES) -> bytes:
    body = await response.content.read(limit + 1)
    if len(body) > limit:
        raise ValueError(f"answer larger than {limit} bytes")
    return body


def ready_urls(slices: list[dict]) -> list[str]:
    """One base URL per ready, not terminating endpoint of a Service's slices (EndpointSlice API: an absent
    `ready` means ready)."""
    urls = set()
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("port")), None)
        for endpoint in s.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if port is None or conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                urls.add(f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}")
    return sorted(urls)


class Gateway:
    """Polls the gateway's /v1/limits (the limits in force, degradation, routing) and, without Prometheus,
    scrapes /metrics of every gateway replica each round into the last 15 minutes of samples."""

    def __init__(self, url: str, cluster: Cluster, changes: Changes, interval_s: float, *,
                 prometheus: Prometheus | None = None):
        self.url, self.cluster, self.changes, self.interval_s = url.rstrip("/"), cluster, changes, interval_s
        self.prometheus = prometheus
        self.store = SeriesStore(interval_s)
        self.limits: dict | None = None
        self.limits_error: str | None = None
        self.scrape_errors: list[str] = []
        self._export: dict | None = None
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set when it starts

    def replicas(self) -> list[str]:
        """The gateway replicas to scrape: the ready endpoints of its Service when it is watched, else its URL."""
        urls = ready_urls(self.cluster.all("gateways")) if "gateways" in self.cluster.kinds else []
        return (urls or [self.url])[:MAX_GATEWAY_REPLICAS]

    async def run(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        while True:
            started = time.monotonic()
            try:
                await asyncio.gather(self.poll_limits(), self.scrape() if self.prometheus is None
                                     else self.prometheus.refresh(session))
            except Exception as e:  # an answer of an unexpected shape: said on the pages, tried again next round
                log.warning("reading the gateway failed: %r", e)
                self.scrape_errors = [f"reading the gateway failed: {e!r}"[:300]]
            self.changes.bump()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def poll_limits(self) -> None:
        try:
            async with self.session.get(self.url + "/v1/limits",
                                        timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)) as r:
                body = await read_bounded(r)
                if r.status != 200:
                    raise ValueError(f"{r.status}: {_message(body)}")
                self.limits, self.limits_error = orjson.loads(body), None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            # a gateway that wants a key for /v1/limits: the pages show the operator's limits instead
            self.limits, self.limits_error = None, f"{self.url}/v1/limits: {e}"[:300]

    async def _scrape_one(self, url: str) -> tuple[str, Scrape | str]:
        try:
            async with self.session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S)) as r:
                body = await read_bounded(r)
                if r.status != 200:
                    return url, f"{url}/metrics: {r.status}"
                return url, parse_scrape(body.decode(errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return url, f"{url}/metrics: {e!r}"[:300]

    async def scrape(self) -> None:
        at = time.time()
        results = await asyncio.gather(*(self._scrape_one(u) for u in self.replicas()))
        self.scrape_errors = [r for _, r in results if isinstance(r, str)]
        self.store.add_round(at, {url: r for url, r in results if not isinstance(r, str)})
        self._export = None

    def export(self) -> dict:
        if self.prometheus is not None:
            return self.prometheus.export
        if self._export is None:
            self._export = self.store.export()
        return self._export

    def problems(self) -> list[str]:
        out = [self.limits_error] if self.limits_error else []
        out += self.scrape_errors
        if self.prometheus is not None and self.prometheus.error:
            out.append(self.prometheus.error)
        return out


def _message(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        return str((data.get("error") or {}).get("message") or data)[:200]
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace")


class Prometheus:
    """The charts from a Prometheus that scrapes the gateways: one range query per chart each round."""

    def __init__(self, url: str, window_s: float = WINDOW_S, step_s: float = PROMETHEUS_STEP_S):
        self.url, self.window_s, self.step_s = url.rstrip("/"), window_s, step_s
        self.export: dict = {"t": [], "models": {}}
        self.error: str | None = None

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        end = math.floor(time.time() / self.step_s) * self.step_s
        start = end - self.window_s
        times = [start + i * self.step_s for i in range(int(self.window_s / self.step_s) + 1)]
        try:
            results = await asyncio.gather(*(self._query(session, q, start, end) for q in PROMQL.values()))
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self.error = f"Prometheus {self.url}: {e!r}"[:300]
            return
        index = {t: i for i, t in enumerate(times)}
        models: dict[str, dict[str, list]] = {}
        for chart, series in zip(PROMQL, results):
            for s in series[:MAX_MODELS]:
                model = (s.get("metric") or {}).get("model")
                if model is None:
                    continue
                charts = models.setdefault(model, {c: [None] * len(times) for c in CHARTS})
                for at, value in s.get("values") or []:
                    i = index.get(float(at))
                    number = float(value)
                    if i is not None and math.isfinite(number):
                        charts[chart][i] = round(number, 3)
        self.export, self.error = {"t": times, "models": models}, None

    async def _query(self, session: aiohttp.ClientSession, query: str, start: float, end: float) -> list[dict]:
        params = {"query": query, "start": str(start), "end": str(end), "step": str(self.step_s)}
        async with session.get(self.url + "/api/v1/query_range", params=params,
                               timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT_S * 2)) as r:
            body = orjson.loads(await read_bounded(r))
            if r.status != 200 or not isinstance(body, dict) or body.get("status") != "success":
                raise ValueError(f"{r.status}: {body.get('error') if isinstance(body, dict) else body}"[:300])
            return (body.get("data") or {}).get("result") or []
