"""JSON log lines: one per request (never the API key), plus the gateway's own events."""
from __future__ import annotations

import logging
import sys

import orjson

REQUEST_LOGGER = "cxygpt.gateway.requests"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the request line below replaces it


def log_request(logger: logging.Logger, **fields) -> None:
    logger.info("request", extra={"fields": fields})


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
