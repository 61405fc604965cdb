"""JSON log lines: one per request (never the API key), plus the gateway's own events."""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

import orjson

REQUEST_LOGGER = "cxygpt.gateway.requests"
# a log line quotes at most this much of one field (a message that quotes a client's input, say)
FIELD_CHARS = 2048


def bounded(value):
    """A field as a log line carries it: a long string cut, with its length."""
    if isinstance(value, str) and len(value) > FIELD_CHARS:
        return f"{value[:FIELD_CHARS]}... ({len(value)} characters)"
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": bounded(record.getMessage())}
        fields = getattr(record, "fields", None)
        if fields:
            line.update({k: bounded(v) for k, v in fields.items()})
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


class RequestLog:
    """The one line per request, in the same JSON shape as every other line, written in batches: a line is
    formatted when the request ends and written with the others of the next `flush_s` (a logging record and an
    unbuffered write per request took ~15 % of the gateway's CPU per relayed request: measured, BENCHMARKS.md)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, flush_s: float = 0.05):
        self.enabled = enabled and logging.getLogger(REQUEST_LOGGER).isEnabledFor(logging.INFO)
        self.stream, self.flush_s = stream, flush_s
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, **fields) -> None:
        if not self.enabled:
            return
        if fields.get("error"):  # the one field that may quote what a client sent
            fields["error"] = bounded(fields["error"])
        line = {"ts": round(time.time(), 3), "level": "info", "logger": REQUEST_LOGGER, "msg": "request", **fields}
        self._lines.append(orjson.dumps(line, default=str))
        if self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write now
                self.flush()

    def flush(self) -> None:
        self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            stream = self.stream or sys.stdout  # looked up late: tests and the CLI swap sys.stdout
            stream.write(b"\n".join(lines).decode() + "\n")
            stream.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
