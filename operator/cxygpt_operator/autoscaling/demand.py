"""Demand from the gateways: every ready replica of the gateway Service (its EndpointSlices) is scraped (/metrics,
Prometheus text, with a timeout) for cxygpt_gateway_demand per model; one that does not answer counts with its last
reading for a while, then as unknown, never as zero."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .policy import Demand

log = logging.getLogger("cxygpt.operator.demand")
DEMAND_METRIC = "cxygpt_gateway_demand"
SCRAPE_TIMEOUT_S = 2.0
# a gateway's last reading stands in for it this many intervals after it stopped answering (a slow scrape, a
# restart), then its share is unknown
STALE_INTERVALS = 3


def gateway_endpoints(slices: list[dict]) -> list[str]:
    """Base URLs of the gateway replicas that serve: ready and not terminating (an absent `ready` is ready)."""
    urls = set()
    for s in slices:
        ports = s.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "http"), None) or \
            (ports[0].get("port") if ports else None)
        if not port:
            continue
        for endpoint in s.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                urls.add(f"http://{f'[{address}]' if ':' in address else address}:{port}")
    return sorted(urls)


def parse_demand(text: str) -> dict[str, float]:
    """Model → demand from one gateway's /metrics (Prometheus text format); ValueError when it is not that."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == DEMAND_METRIC:
            for sample in family.samples:
                model = sample.labels.get("model")
                if model:
                    found[model] = found.get(model, 0.0) + float(sample.value)
    return found


@dataclass(frozen=True)
class Snapshot:
    """One round over the gateways: what each told (or last told, while recent), how many there are."""
    at: float
    readings: dict[str, dict[str, float]] = field(default_factory=dict)  # gateway URL → model → demand
    known: int = 0
    why: str = ""   # when nothing could be read: why

    def demand(self, model: str) -> Demand:
        read = len(self.readings)
        if not read:
            return Demand(None, complete=False, sources=f"0/{self.known}")
        total = sum(values.get(model, 0.0) for values in self.readings.values())
        return Demand(total, complete=read == self.known, sources=f"{read}/{self.known}")


class DemandReader:
    """Reads the gateways at most once per `interval_s` however many models ask (callers share a round)."""

    def __init__(self, list_slices: Callable[[], list[dict]] | None, *, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.list_slices, self.interval_s, self.clock = list_slices, interval_s, clock
        self.snapshot: Snapshot | None = None
        self.last_good: dict[str, tuple[float, dict[str, float]]] = {}
        self.lock = asyncio.Lock()
        self.session: aiohttp.ClientSession | None = None

    async def latest(self) -> Snapshot:
        async with self.lock:
            if self.snapshot is None or self.clock() - self.snapshot.at >= self.interval_s * 0.8:
                self.snapshot = await self._round()
            return self.snapshot

    async def _round(self) -> Snapshot:
        now = self.clock()
        if self.list_slices is None:
            return Snapshot(now, why="no gateway Service given (--gateway-service)")
        try:
            urls = gateway_endpoints(await asyncio.to_thread(self.list_slices))
        except Exception as e:  # the API server away: the gateways are unknown this round
            log.warning("gateway endpoints not read: %s", e)
            return Snapshot(now, why=f"gateway endpoints not read: {e}")
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        session = self.session
        answers = await asyncio.gather(*(self._scrape(session, url) for url in urls))
        readings = {}
        for url, answer in zip(urls, answers):
            if answer is not None:
                self.last_good[url] = (now, answer)
                readings[url] = answer
            elif url in self.last_good and now - self.last_good[url][0] < STALE_INTERVALS * self.interval_s:
                readings[url] = self.last_good[url][1]
        for url in set(self.last_good) - set(urls):  # gone from the Service: its requests went with it
            del self.last_good[url]
        return Snapshot(now, readings, known=len(urls), why="" if urls else "the gateway Service has no ready endpoint")

    @staticmethod
    async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
        try:
            async with session.get(f"{url}/metrics") as r:
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
                return parse_demand(await r.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("gateway %s not read: %r", url, e)
            return None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
