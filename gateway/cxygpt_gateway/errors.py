"""Gateway errors carried as the OpenAI error body, with status and headers."""
from __future__ import annotations

import orjson

# status → the OpenAI error `type` clients switch on
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "api_error"),
                      "code": code, "param": param}}


class GatewayError(Exception):
    """A request the gateway answers itself; `reason` labels the rejection metric."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 reason: str | None = None, retry_after: float | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.reason = reason or code or str(status)
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, int(-(-retry_after // 1))))

    def body(self) -> bytes:
        return orjson.dumps(error_body(self.status, self.message, code=self.code, param=self.param))

    def sse_event(self, responses: bool = False) -> bytes:
        """The final event of a stream that failed after it started: then the terminator, or for the Responses
        API its own error event (type error, code, message, param; that stream has no terminator)."""
        if responses:
            event = {"type": "error", "code": self.code, "message": self.message, "param": self.param}
            return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
        return b"data: " + self.body() + b"\n\ndata: [DONE]\n\n"
