"""What each choice of a request says, as token ids and text pieces: text, stop strings, JSON, tool calls (pure)."""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from . import text

TOP_LOGPROB_STEP = 0.75  # how far each alternative trails the sampled token, in nats


@dataclass(frozen=True)
class Choice:
    pieces: list[str]           # one per output token; "".join() is the output
    ids: list[int]
    finish_reason: str          # "stop", "length" or "tool_calls"
    stop_reason: str | None     # the stop string that ended it
    tool: str | None = None     # the called function's name: the output is its JSON arguments
    call_id: str | None = None


def _digest(source: str, index: int) -> int:
    # choice 0 is what n=1 answers; the others differ, deterministically
    return zlib.crc32(f"{index}\x00{source}".encode()) if index else zlib.crc32(source.encode())


def _words(seed: int, count: int) -> str:
    words = text.CORPUS[seed % len(text.CORPUS)].rstrip(".").split()
    return " ".join(words[(seed >> 4) % len(words):][:count] or words[:count])


def instance(schema, seed: int = 0):
    """A deterministic value that validates against a JSON schema (the subset tools and response formats use)."""
    if not isinstance(schema, dict):
        return {}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][seed % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance(schema[key][0], seed)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: instance(sub, seed + i + 1) for i, (name, sub) in enumerate(props.items())}
    if kind == "array":
        return [instance(schema.get("items", {}), seed + i) for i in range(max(schema.get("minItems", 1), 1))]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 101) - 1)
        value = low + seed % (int(high - low) + 1)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return bool(seed % 2)
    if kind == "null":
        return None
    value = _words(seed, 3).ljust(schema.get("minLength", 0), "x")
    return value[:schema["maxLength"]] if "maxLength" in schema else value


def _cut(ids: list[int], max_tokens: int, natural: str) -> tuple[list[int], str]:
    return (ids, natural) if len(ids) <= max_tokens else (ids[:max_tokens], "length")


def _apply_stop(pieces: list[str], reason: str, stop: tuple[str, ...], include: bool) -> Choice:
    out = "".join(pieces)
    hits = [(out.find(s), s) for s in stop if s and s in out]
    if not hits:
        return Choice(pieces, text.token_ids(out), reason, None)
    at, which = min(hits)
    ids = text.token_ids(out[:at + len(which)] if include else out[:at])
    return Choice(text.token_pieces(ids), ids, "stop", which)


def plan(g, index: int, max_tokens: int, writer: text.ReplyWriter) -> Choice:
    """Choice `index` of request g (a protocol.Generation), at most max_tokens long."""
    digest = _digest(g.reply_source, index)
    tool = _tool_to_call(g, digest)
    if tool is not None:
        args = json.dumps(instance(tool.get("parameters") or {}, digest), ensure_ascii=False)
        # vLLM ends a named or required call with "stop", one its auto tool parser found with "tool_calls"
        ids, reason = _cut(text.token_ids(args), max_tokens, "tool_calls" if g.tool_choice == "auto" else "stop")
        return Choice(text.token_pieces(ids), ids, reason, None, tool["name"], f"chatcmpl-tool-{digest:08x}{index}")
    if g.response_format is not None:
        schema = g.response_format.get("schema")
        value = instance(schema, digest) if schema is not None else {"answer": _words(digest, 8)}
        ids, reason = _cut(text.token_ids(json.dumps(value, ensure_ascii=False)), max_tokens, "stop")
        return Choice(text.token_pieces(ids), ids, reason, None)
    source = g.reply_source if index == 0 else f"{g.reply_source}\x00{index}"
    pieces, reason = writer.reply(source, max_tokens, g.ignore_eos)
    return _apply_stop(pieces, reason, g.stop, g.include_stop_str_in_output)


def _tool_to_call(g, digest: int) -> dict | None:
    if not g.tools or g.tool_choice in (None, "none"):
        return None
    if isinstance(g.tool_choice, dict):
        return next(t for t in g.tools if t["name"] == g.tool_choice["function"]["name"])
    if g.tool_choice == "auto" and digest % 3 == 0:
        return None  # "auto" answers in text for about a third of the prompts
    return g.tools[(digest >> 8) % len(g.tools)]


def _logprob(token: int, position: int) -> float:
    return -((zlib.crc32(f"{token}:{position}".encode()) % 2000) / 1000)


def _alternatives(token: int, position: int, top: int) -> list[tuple[int, float]]:
    """The sampled token and top - 1 others, most likely first (deterministic, plausibly spaced)."""
    best = _logprob(token, position) / 4
    others = [t for t in ((token * 31 + 7919 * (k + 1)) % text.VOCAB_SIZE for k in range(top)) if t != token]
    return [(token, best)] + [(t, best - TOP_LOGPROB_STEP * (k + 1)) for k, t in enumerate(others[:top - 1])]


def _token_str(token: int) -> str:
    return text.token_bytes(token).decode(errors="replace")


def chat_logprobs(ids: list[int], start: int, top: int) -> list[dict]:
    """Chat's logprobs.content entries for output tokens start.. (top alternatives each)."""
    out = []
    for pos in range(start, len(ids)):
        alts = _alternatives(ids[pos], pos, max(top, 1))
        entries = [{"token": _token_str(t), "logprob": lp, "bytes": list(text.token_bytes(t))} for t, lp in alts]
        out.append({**entries[0], "top_logprobs": entries[:top]})
    return out


def completion_logprobs(ids: list[int], start: int, top: int, offset: int) -> dict:
    """Completions' logprobs for output tokens start..; offset: the characters before token `start`."""
    tokens, lps, tops, offsets = [], [], [], []
    for pos in range(start, len(ids)):
        alts = _alternatives(ids[pos], pos, max(top, 1))
        tokens.append(_token_str(ids[pos]))
        lps.append(alts[0][1])
        tops.append({_token_str(t): lp for t, lp in alts})
        offsets.append(offset)
        offset += len(text.token_pieces([ids[pos]])[0])
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}
