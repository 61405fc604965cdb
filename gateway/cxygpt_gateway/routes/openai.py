"""OpenAI API: chat and text completions (relayed), and the models routable right now."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from . import json_response

from ..admission.pipeline import authenticated

router = APIRouter(tags=["openai"])
STARTED = int(time.time())


def _body_doc(example: dict) -> dict:
    """Swagger's request body: the body is read raw by admission, so FastAPI cannot infer it."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "required": ["model"], "additionalProperties": True}, "example": example}}}}


def _served_before_routing() -> RuntimeError:
    """The relayed routes are declared here for the OpenAPI document and the 405 on other methods; their POSTs
    are served before routing (GatewayApp, server.py)."""
    return RuntimeError("POST /v1/(chat/)completions is served by GatewayApp before FastAPI's routing")


CHAT_EXAMPLE = {"model": "qwen3-14b", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64,
                "stream": False}
COMPLETION_EXAMPLE = {"model": "qwen3-14b", "prompt": "Once upon a time", "max_tokens": 64, "stream": False}


@router.post("/v1/chat/completions", summary="Chat completion (stream or not), relayed to the model's engine",
             openapi_extra=_body_doc(CHAT_EXAMPLE))
async def chat_completions():
    raise _served_before_routing()


@router.post("/v1/completions", summary="Text completion (stream or not), relayed to the model's engine",
             openapi_extra=_body_doc(COMPLETION_EXAMPLE))
async def completions():
    raise _served_before_routing()


@router.get("/v1/models", summary="Models with at least one routable backend",
            dependencies=[Depends(authenticated)])
async def models(request: Request):
    registry = request.app.state.gateway.registry
    data = [{"id": r.name, "object": "model", "created": STARTED, "owned_by": "cxygpt",
             "max_input_tokens": r.limits.max_input_tokens, "max_output_tokens": r.limits.max_output_tokens}
            for r in registry.routable()]
    return json_response({"object": "list", "data": data})
