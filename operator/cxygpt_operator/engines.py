"""The engines' own HTTP API, bounded: the adapters an engine pod lists on /v1/models, and vLLM's runtime LoRA
endpoints (/v1/load_lora_adapter, /v1/unload_lora_adapter)."""
from __future__ import annotations

import json

import aiohttp

from .adapters import MESSAGE_CHARS, cut

MODELS_TIMEOUT_S = 5.0
# a load downloads the adapter (the engine's own Hub download) and reads its tensors, between two engine steps
LOAD_TIMEOUT_S = 120.0
UNLOAD_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1 << 20    # /v1/models of a base and 16 adapters is a few KiB
MAX_CARDS = 256


class EngineUnreachable(Exception):
    """The engine did not answer (starting, gone, or an answer past the bounds)."""


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def slice_urls(slices: list[dict]) -> dict[str, str]:
    """pod uid → the engine's URL as its Service's EndpointSlices publish it (ready or not yet): the address and
    port the Service reaches it on."""
    found = {}
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("name") == "http"), None)
        if not isinstance(port, int):
            continue
        for e in s.get("endpoints") or []:
            uid, addresses = (e.get("targetRef") or {}).get("uid"), e.get("addresses") or []
            if uid and addresses:
                found[uid] = _url(addresses[0], port)
    return found


def base_url(pod: dict, port: int, published: dict[str, str]) -> str | None:
    """The URL of a running engine pod: its EndpointSlice's, else its pod IP and the engine's port; None when it is
    not running, has no address or terminates."""
    status, meta = pod.get("status") or {}, pod.get("metadata") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") != "Running" or meta.get("deletionTimestamp"):
        return None
    return published.get(meta.get("uid", "")) or _url(ip, port)


async def _read(response: aiohttp.ClientResponse) -> str:
    body = await response.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise EngineUnreachable(f"an answer over {MAX_BODY_BYTES} bytes")
    return body.decode(errors="replace")


def adapters_of(models: dict) -> dict[str, str]:
    """name → root (the path it was loaded from) of every adapter card (one with a parent) of /v1/models."""
    cards = models.get("data") if isinstance(models, dict) else None
    if not isinstance(cards, list):
        raise EngineUnreachable("/v1/models answered no data list")
    return {str(c["id"]): str(c.get("root") or "") for c in cards[:MAX_CARDS]
            if isinstance(c, dict) and c.get("parent") and c.get("id")}


async def loaded_adapters(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    try:
        async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)) as r:
            text = await _read(r)
            if r.status != 200:
                raise EngineUnreachable(f"/v1/models answered {r.status}")
            return adapters_of(json.loads(text))
    except (TimeoutError, aiohttp.ClientError, ValueError, UnicodeError) as e:
        raise EngineUnreachable(f"/v1/models: {type(e).__name__}") from None


def _refusal(status: int, text: str) -> str:
    """The engine's own message (its OpenAI-style error body), cut to a bound."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return cut(f"{status}: {message}", MESSAGE_CHARS)


async def call(session: aiohttp.ClientSession, url: str, action: str, name: str, path: str = "",
               inplace: bool = False) -> str | None:
    """One load or unload; None when the engine did it, else why not (the engine's answer, or that it did not
    answer in time)."""
    if action == "load":
        endpoint, timeout = "/v1/load_lora_adapter", LOAD_TIMEOUT_S
        body: dict[str, object] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
    else:
        endpoint, body, timeout = "/v1/unload_lora_adapter", {"lora_name": name}, UNLOAD_TIMEOUT_S
    try:
        async with session.post(f"{url}{endpoint}", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await _read(r)
            return None if r.status == 200 else _refusal(r.status, text)
    except (TimeoutError, aiohttp.ClientError, EngineUnreachable) as e:
        return cut(f"{endpoint} did not answer within {timeout:.0f} s ({type(e).__name__})")
