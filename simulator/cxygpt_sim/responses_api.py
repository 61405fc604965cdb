"""The Responses API's objects and stream events as vLLM builds them, from a planned reply (pure)."""
from __future__ import annotations

import orjson


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [input_tokens],
                                     "cached_tokens_per_turn": [0]},
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                      "output_tokens_per_turn": [output_tokens], "tool_output_tokens_per_turn": [0]}}


def output_text(content: str) -> dict:
    return {"type": "output_text", "text": content, "annotations": [], "logprobs": None}


def message(item_id: str, content: str | None, status: str = "completed") -> dict:
    """The assistant's output message; vLLM marks it completed even when the response is incomplete."""
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if not content else [output_text(content)]}


def base(response_id: str, created: int, model: str, echoed: dict, max_output_tokens: int) -> dict:
    """The fields every state of one response shares (max_output_tokens: the cap in force)."""
    return {"id": response_id, "created_at": created, "object": "response", "model": model, **echoed,
            "max_output_tokens": max_output_tokens, "top_logprobs": None, "input_messages": None,
            "output_messages": None}


def response(fields: dict, *, status: str, output: list[dict], usage: dict | None) -> dict:
    """ResponsesResponse.from_request: status in_progress (no output yet), completed or incomplete (it stopped at
    max_output_tokens)."""
    return {**fields, "status": status, "output": output, "usage": usage,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}


def finished(fields: dict, item_id: str, content: str, cut: bool, input_tokens: int, output_tokens: int) -> dict:
    """The final response: one message with the text, incomplete when max_output_tokens cut it."""
    return response(fields, status="incomplete" if cut else "completed", output=[message(item_id, content)],
                    usage=usage(input_tokens, output_tokens))


class EventStream:
    """A response's server-sent events in vLLM's order, numbered from 0: created, in_progress, the output item and
    its text part opened on the first delta, the deltas, then the text, part and item done, and completed."""

    def __init__(self, item_id: str):
        self.item_id = item_id
        self.sequence_number = 0
        self.opened = False
        self.text: list[str] = []

    def _event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def start(self, in_progress: dict) -> bytes:
        return self._event("response.created", response=in_progress) + \
            self._event("response.in_progress", response=in_progress)

    def delta(self, piece: str) -> bytes:
        where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
        out = b""
        if not self.opened:
            self.opened = True
            out = self._event("response.output_item.added", output_index=0,
                              item=message(self.item_id, None, "in_progress")) + \
                self._event("response.content_part.added", **where,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.text.append(piece)
        return out + self._event("response.output_text.delta", **where, delta=piece, logprobs=[])

    def finish(self, final: dict) -> bytes:
        out = b""
        if self.opened:
            content = "".join(self.text)
            where = {"output_index": 0, "item_id": self.item_id, "content_index": 0}
            out = self._event("response.output_text.done", **where, text=content, logprobs=[]) + \
                self._event("response.content_part.done", **where,
                            part={"type": "output_text", "text": content, "annotations": []}) + \
                self._event("response.output_item.done", output_index=0, item=message(self.item_id, content))
        # vLLM ends every stream with response.completed, whatever the final status
        return out + self._event("response.completed", response=final)
