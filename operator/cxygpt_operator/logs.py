"""Operator log lines: JSON (ts, level, logger, msg, object, generation) like the gateway's, or plain text."""
from __future__ import annotations

import copy
import json
import logging
import sys

FORMATS = ("json", "text")


def _object_fields(record: logging.LogRecord) -> dict:
    """The object a line is about: our own `fields` extra (object, generation, ...) or kopf's k8s_ref."""
    fields = dict(getattr(record, "fields", None) or {})
    ref = getattr(record, "k8s_ref", None)
    if ref and "object" not in fields:
        name, namespace = ref.get("name"), ref.get("namespace")
        fields["object"] = f"{namespace}/{name}" if namespace else name
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage(), **_object_fields(record)}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        obj = _object_fields(record).get("object")
        if obj:
            record = copy.copy(record)
            record.msg = f"[{obj}] {record.msg}"
        return super().format(record)


def configure(log_format: str = "json", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # kopf reports every handler run at INFO; ours say what changed
        logging.getLogger("kopf").setLevel(logging.WARNING)
