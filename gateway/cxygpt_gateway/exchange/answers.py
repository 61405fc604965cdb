"""Requests the gateway answers itself (refusals): each counted, logged and answered with the OpenAI error body."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import GatewayError
from .port import Exchange

if TYPE_CHECKING:
    from ..logs import RequestLog
    from ..metrics import GatewayMetrics


class Answers:
    def __init__(self, metrics: GatewayMetrics, request_log: RequestLog):
        self.metrics, self.request_log = metrics, request_log

    def count(self, error: GatewayError, *, model: str, request_id: str | None, key_id: str | None,
              degraded: bool) -> None:
        """A request the gateway answered itself: counted and logged."""
        self.metrics.requests.labels(model, str(error.status)).inc()
        self.metrics.rejections.labels(model, error.reason).inc()
        self.request_log.write(request_id=request_id, key_id=key_id, model=model, status=error.status,
                               error=error.message, reason=error.reason, degraded=degraded)

    async def refuse(self, ex: Exchange, error: GatewayError) -> None:
        self.count(error, model=ex.model, request_id=ex.request_id, key_id=ex.key_id, degraded=ex.degraded)
        if ex.client_left:
            return
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
        if ex.request_id:
            headers.append((b"x-request-id", ex.request_id.encode()))
        await ex.respond(error.status, headers, error.body())
