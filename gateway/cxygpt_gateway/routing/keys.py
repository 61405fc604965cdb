"""A request's routing key (pure): a stable hash of what its prompt starts with, the same in every gateway."""
from __future__ import annotations

import hashlib

import orjson

# what the prefix key covers, bounded so that a long prompt costs no more: of a chat, the messages up to and
# including the first user one (at most KEY_MESSAGES), at most KEY_CHARS characters of each, with its length (a
# conversation differs from its tenant's others in its first user message; hashing costs ~1 µs per KiB); of a
# completion's prompt, its first PROMPT_KEY_CHARS characters (or a quarter as many token ids) alone, since the
# prompt grows with each turn: one shorter than that moves on the ring as it grows
KEY_CHARS = 1024
KEY_MESSAGES = 32
PROMPT_KEY_CHARS = 256


def stable_hash(data: bytes) -> int:
    """64 bits of BLAKE2b: the same in every process and version (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _text(content) -> str:
    """A message's content as text: a string, or a list of parts (their texts; other parts as JSON)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            texts.append(text if isinstance(text, str) else orjson.dumps(part, option=orjson.OPT_SORT_KEYS)[
                :KEY_CHARS].decode(errors="replace"))
        return "\n".join(texts)
    return "" if content is None else str(content)


def _chain(parent: bytes, role: str, text: str) -> bytes:
    """The next block's (message's) hash: over its parent's hash, its role and its text, cut to KEY_CHARS but
    with its whole length, so that a cut never makes two lengths equal."""
    block = b"%b%d\0%b%d\0%b" % (parent, len(role), role[:64].encode(errors="replace"), len(text),
                                 text[:KEY_CHARS].encode(errors="replace"))
    return hashlib.blake2b(block, digest_size=16).digest()


def _messages_key(messages: list) -> bytes:
    """Chained over the messages up to and including the first user message: one key for every turn of a
    conversation, and different keys for users who share a long system prompt."""
    digest = b""
    for m in messages[:KEY_MESSAGES]:
        if not isinstance(m, dict):
            continue
        given = m.get("role")
        role = given if isinstance(given, str) else ""
        digest = _chain(digest, role, _text(m.get("content")))
        if role == "user":
            break
    return digest


def _prompt_key(prompt) -> bytes:
    """A completion's prompt (or an embedding's input): its leading characters, of the first of a batch; token
    ids as JSON."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids
        lead = orjson.dumps(prompt[:PROMPT_KEY_CHARS // 4])
    else:
        lead = (prompt if isinstance(prompt, str) else "")[:PROMPT_KEY_CHARS].encode(errors="replace")
    return hashlib.blake2b(lead, digest_size=16).digest()


def request_key(kind: str, body: dict, session: str | None = None) -> int:
    """The request's place on the ring: its session (the `x-session-id` header, else the `user` field) when it
    names one, else its conversation's identity (the messages up to the first user message; a prompt's or an
    input's leading characters)."""
    if not session:
        user = body.get("user")
        session = user if isinstance(user, str) else None
    if session:
        return stable_hash(b"session\0" + session[:KEY_CHARS].encode(errors="replace"))
    if kind == "chat":
        digest = _messages_key(body.get("messages") or [])
    elif kind == "responses":
        given = body.get("input")
        messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        elif isinstance(given, list):  # input items: messages (a missing role is the user's)
            messages += [{"role": i.get("role") or "user", "content": i.get("content", i.get("output"))}
                         for i in given[:KEY_MESSAGES] if isinstance(i, dict)]
        digest = _messages_key(messages)
    else:
        digest = _prompt_key(body.get("prompt" if kind == "completions" else "input"))
    return int.from_bytes(digest[:8], "big")
