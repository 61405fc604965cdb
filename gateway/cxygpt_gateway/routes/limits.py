"""GET /v1/limits: the limits in force, per model and for the caller's key, and degradation state."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..admission.auth import Caller, KeyStore
from ..admission.request import echo
from ..errors import GatewayError
from ..routing.registry import Registry
from . import authenticated, json_response


def model_view(route) -> dict:
    lim = route.limits
    degraded = route.is_degraded()
    return {"max_input_tokens": lim.max_input_tokens, "max_output_tokens": lim.max_output_tokens,
            "degraded_max_output_tokens": lim.degraded_max_output_tokens,
            "output_cap_now": lim.degraded_max_output_tokens if degraded else lim.max_output_tokens,
            "rate_qps": None if route.mode == "single" else lim.rate_qps,
            "rate_tpm": None if route.mode == "single" else lim.rate_tpm,
            "queue_size": lim.queue_size, "max_concurrency": lim.max_concurrency,
            "timeouts": lim.timeouts.model_dump(), "single_user": route.mode == "single", "mode": route.mode,
            "profile": route.profile, "degraded": degraded,
            "degraded_reason": route.degrade.reason if degraded else None,
            "auto_degrade": route.degrade_enabled, "routable": route.routable(), "fallback": route.spec.fallback,
            "queue_depth": route.queue.waiting, "in_flight": route.queue.in_flight,
            "routing": {"policy": route.routing.policy, "epsilon": route.routing.epsilon},
            "state": route.state(), "scale_from_zero": route.spec.scale_from_zero is not None,
            # an adapter: its base, and on how many of the ready replicas it is loaded
            **({"parent": route.parent, "loaded_on": len(route.queue.serving(route.name))}
               if route.parent is not None else {})}


def router(registry: Registry, keys: KeyStore) -> APIRouter:
    routes = APIRouter(tags=["limits"])
    by_key = Depends(authenticated(keys))

    @routes.get("/v1/limits", summary="Limits in force: the default (or ?model=) model's, every model's, the key's")
    async def limits(model: str | None = None, caller: Caller = by_key):
        return json_response(limits_view(registry, model, caller))

    return routes


def limits_view(registry: Registry, model: str | None, caller: Caller) -> dict:
    routes = {**registry.routes, **registry.adapters}
    if model is not None and model not in routes:
        raise GatewayError(404, f"model {echo(model)} is not served here", code="model_not_found", param="model",
                           reason="unknown_model")
    views = {name: model_view(route) for name, route in routes.items()}
    chosen = model or next(iter(views), None)
    top = views.get(chosen, {}) if chosen is not None else {}
    tier = caller.tier
    return {
        "model": chosen,
        **{k: top.get(k) for k in ("max_input_tokens", "max_output_tokens", "rate_qps", "rate_tpm", "queue_size",
                                   "single_user", "profile")},
        "degraded": bool(top.get("degraded")),
        "key": {"id": caller.key_id, "tier": caller.tier_name, "rate_qps": tier.rate_qps, "rate_tpm": tier.rate_tpm,
                "priority": tier.priority, "max_output_tokens": tier.max_output_tokens},
        "models": views,
    }
