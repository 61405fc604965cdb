"""The engines' own load, read from each replica's /metrics at a short interval: what other senders hold there,
routing's tie-breaks and its active LoRA adapters; and, for a model with adapters, which ones each replica has loaded
(its /v1/models)."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple

import orjson
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from ..routing.registry import Registry
    from .client import EngineClient

log = logging.getLogger("cxygpt.gateway")
RUNNING, WAITING, KV_USAGE = "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
# vLLM's LoRA gauge: one series per (max_lora, running_lora_adapters, waiting_lora_adapters), the adapters' names
# joined by commas, its value the time it was set; vLLM keeps every series it set, so the newest one is the state
LORA_INFO = "vllm:lora_requests_info"
# the lines that carry them (samples and their HELP/TYPE), picked before parsing: vLLM's page holds hundreds of
# histogram lines the gateway does not need
WANTED = tuple(prefix + name for name in (RUNNING, WAITING, KV_USAGE, LORA_INFO)
               for prefix in ("", "# HELP ", "# TYPE "))
MAX_PAGE_BYTES = 4 << 20   # a page larger than this is not read to its end (and says nothing)
MAX_MODELS_BYTES = 1 << 20  # a /v1/models answer larger than this says nothing
MAX_ADAPTER_NAMES = 1024   # names read from one label or one /v1/models answer
MAX_TIMEOUT_S = 1.0        # a scrape waits at most this, and never longer than the interval


class EngineLoad(NamedTuple):
    running: int      # requests in the engine's batch
    waiting: int      # requests in the engine's own queue
    kv_usage: float   # KV-cache usage 0..1
    lora_active: frozenset[str] = frozenset()  # adapters with requests running or waiting
    max_lora: int = 0                          # adapters one batch may run; 0: not said (LoRA off)


def _names(label: str) -> set[str]:
    return {name for name in label.split(",")[:MAX_ADAPTER_NAMES] if name}


def engine_load(page: str) -> EngineLoad | None:
    """The engine's load from a Prometheus text page: requests running and waiting summed, KV-cache usage the
    highest, over the page's engines (a data-parallel vLLM has one per rank); None when the page has none of
    them or cannot be read."""
    wanted = "\n".join(line for line in page.splitlines() if line.startswith(WANTED))
    running, waiting, usage, seen = 0.0, 0.0, 0.0, False
    lora: dict[str, str] | None = None
    newest = float("-inf")
    try:
        for family in text_string_to_metric_families(wanted + "\n"):
            for sample in family.samples:
                if sample.name == RUNNING:
                    running, seen = running + sample.value, True
                elif sample.name == WAITING:
                    waiting, seen = waiting + sample.value, True
                elif sample.name == KV_USAGE:
                    usage, seen = max(usage, sample.value), True
                elif sample.name == LORA_INFO and sample.value > newest:
                    lora, newest = sample.labels, sample.value
    except ValueError:
        return None
    if not seen:
        return None
    active: frozenset[str] = frozenset()
    max_lora = 0
    if lora is not None:
        active = frozenset(_names(lora.get("running_lora_adapters", "")) |
                           _names(lora.get("waiting_lora_adapters", "")))
        given = lora.get("max_lora", "")
        max_lora = int(given) if given.isdigit() else 0
    return EngineLoad(int(running), int(waiting), min(max(usage, 0.0), 1.0), active, max_lora)


def loaded_adapters(answer: bytes) -> frozenset[str] | None:
    """The LoRA adapters a replica has loaded: the cards of its GET /v1/models with a `parent`; None when the answer
    is not such a list."""
    try:
        cards = orjson.loads(answer).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(cards, list):
        return None
    return frozenset(card["id"] for card in cards[:MAX_ADAPTER_NAMES]
                     if isinstance(card, dict) and card.get("parent") and isinstance(card.get("id"), str))


class EngineLoadScraper:
    """Every interval, each non-external replica's /metrics, all at once with a timeout; a replica that does not
    answer (or answers nothing usable) reads as unknown (0) until it does, never as its last value.

    What the engine holds beyond this gateway's own requests (`others`: another gateway replica's, another model
    name's on the same engine, a client's that reached it directly) is counted against the replica's slots, so
    that several gateways together keep an engine at its slots, not each of them (one gateway's limit × their
    number). Its own count is taken as the larger of before and after the read, so that a request it released
    while the page was made is not taken for somebody else's."""

    def __init__(self, registry: Registry, engines: EngineClient, interval_s: float):
        self.registry, self.engines, self.interval_s = registry, engines, interval_s
        self.timeout_s = min(interval_s, MAX_TIMEOUT_S)

    async def scrape_once(self) -> None:
        backends = [b for r in self.registry.routes.values() if not r.spec.external for b in r.queue.backends.values()]
        urls = list(dict.fromkeys(b.url for b in backends))  # an engine serving several names is read once
        # the replicas of models with adapters: which ones each has loaded
        lora_urls = list(dict.fromkeys(b.url for r in self.registry.routes.values()
                                       if r.spec.adapters and not r.spec.external for b in r.queue.backends.values()))
        before = [b.outstanding for b in backends]
        found_loads, found_adapters = await asyncio.gather(
            asyncio.gather(*(self._load(url) for url in urls)),
            asyncio.gather(*(self._adapters(url) for url in lora_urls)))
        loads = dict(zip(urls, found_loads))
        adapters = dict(zip(lora_urls, found_adapters))
        for b, own in zip(backends, before):
            load = loads[b.url] or EngineLoad(0, 0, 0.0)
            b.others = max(0, load.running + load.waiting - max(own, b.outstanding))
            b.waiting, b.kv_usage = load.waiting, load.kv_usage
            b.lora_active, b.max_lora = load.lora_active, load.max_lora
            # a replica that did not answer keeps what it last said: adapters are loaded and unloaded rarely, and
            # forgetting them would send their requests to replicas that do not have them
            if (loaded := adapters.get(b.url)) is not None:
                b.adapters = loaded
        for r in self.registry.routes.values():
            r.queue.dispatch()  # a place another sender freed serves those waiting now

    async def _load(self, url: str) -> EngineLoad | None:
        page = await self.engines.page(url, "/metrics", self.timeout_s, MAX_PAGE_BYTES)
        return engine_load(page) if page is not None else None

    async def _adapters(self, url: str) -> frozenset[str] | None:
        page = await self.engines.page(url, "/v1/models", self.timeout_s, MAX_MODELS_BYTES)
        return loaded_adapters(page.encode()) if page is not None else None

    async def run(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:  # a bug here must not stop routing; it is visible, and the next round tries again
                log.exception("reading the engines' /metrics failed")
            await asyncio.sleep(self.interval_s)
