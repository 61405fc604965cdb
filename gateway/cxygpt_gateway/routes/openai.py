"""OpenAI API: chat and text completions, responses and embeddings (relayed), and the models that take requests."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..admission.auth import KeyStore
from ..admission.request import RELAYED, Kind, echo
from ..errors import GatewayError
from ..routing.registry import Registry
from . import authenticated, json_response

STARTED = int(time.time())


def _body_doc(example: dict) -> dict:
    """Swagger's request body: the body is read raw by admission, so FastAPI cannot infer it."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["model"], "additionalProperties": True}, "example": example}}}}


# The relayed routes are declared here for the OpenAPI document and the 405 on other methods; their POSTs are served
# before routing (servers/asgi.py, servers/uvicorn_native.py). (No docstring: FastAPI would show it as each one's.)
async def _served_before_routing() -> None:
    raise RuntimeError("the relayed POSTs are served by GatewayApp before FastAPI's routing")


# each relayed kind's OpenAPI entry: (operation name, summary, example body)
RELAYED_DOCS: dict[Kind, tuple[str, str, dict]] = {
    "chat": ("chat_completions", "Chat completion (stream or not), relayed to the model's engine",
             {"model": "qwen3-14b", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64,
              "stream": False}),
    "completions": ("completions", "Text completion (stream or not), relayed to the model's engine",
                    {"model": "qwen3-14b", "prompt": "Once upon a time", "max_tokens": 64, "stream": False}),
    "responses": ("responses", "Response (Responses API, stream or not), relayed to the model's engine",
                  {"model": "qwen3-14b", "input": "Hello!", "max_output_tokens": 64, "stream": False}),
    "embeddings": ("embeddings", "Embeddings, relayed to an embedding model's engine",
                   {"model": "bge-m3", "input": ["first text", "second text"]}),
}


def _model(route) -> dict:
    """A model's card; a LoRA adapter's, as vLLM's, names its base model as `parent` and where it comes from as
    `root` (its name when that is not known here)."""
    card = {"id": route.name, "object": "model", "created": STARTED, "owned_by": "cxygpt",
            "max_input_tokens": route.limits.max_input_tokens, "max_output_tokens": route.limits.max_output_tokens,
            "state": route.state()}
    if route.parent is not None:
        card |= {"root": route.source or route.name, "parent": route.parent}
    return card


def _listed(route) -> bool:
    """Served now, or as soon as the replica a request wakes is ready (an autoscaled model at zero)."""
    return route.state() != "unavailable"


def router(registry: Registry, keys: KeyStore) -> APIRouter:
    routes = APIRouter(tags=["openai"])
    caller = Depends(authenticated(keys))

    for path, kind in RELAYED.items():
        name, summary, example = RELAYED_DOCS[kind]
        routes.add_api_route(path, _served_before_routing, methods=["POST"], name=name, summary=summary,
                             openapi_extra=_body_doc(example))

    @routes.get("/v1/models", summary="Models that take requests: a routable backend, or autoscaled from zero "
                                      "(state says which)", dependencies=[caller])
    async def models():
        listed = [*registry.routes.values(), *registry.adapters.values()]
        return json_response({"object": "list", "data": [_model(r) for r in listed if _listed(r)]})

    @routes.get("/v1/models/{model:path}", summary="One model, as listed by GET /v1/models",
                dependencies=[caller])
    async def model(model: str):
        route = registry.get(model)
        if route is not None and _listed(route):
            return json_response(_model(route))
        why = registry.reserved.get(model) or (route.spec.unavailable if route is not None else None)
        raise GatewayError(404, f"The model {echo(model)} does not exist" if route is None and why is None else
                           (why.message if why else f"model {model} has no ready replica right now"),
                           code="model_not_found", param="model", reason="unknown_model")

    return routes
