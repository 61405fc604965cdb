"""A request's routing key (pure): where its prefix lives when no gateway has seen it (its home: a stable hash of
what its prompt starts with, alike in every gateway), and its leading chunks hashed in a chain (as vLLM hashes its
KV blocks: two prompts that share their first N chunks share their first N hashes)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

# what the prefix key covers, bounded so that a long prompt costs no more: of a chat, the messages up to and
# including the first user one (at most KEY_MESSAGES), at most KEY_CHARS characters of each, with its length (a
# conversation differs from its tenant's others in its first user message; hashing costs ~1 µs per KiB); of a
# completion's prompt, its first PROMPT_KEY_CHARS characters (or a quarter as many token ids) alone, since the
# prompt grows with each turn: one shorter than that moves on the ring as it grows (the chain below keeps it on the
# replica that served it in this gateway)
KEY_CHARS = 1024
KEY_MESSAGES = 32
PROMPT_KEY_CHARS = 1024
# the chain: the rendered prompt (every message's role and text, in order) in chunks of CHUNK_CHARS characters
# (about 64 tokens: four of vLLM's 16-token blocks), the first MAX_CHUNKS of them (32 KiB, ~8k tokens): a longer
# prompt costs no more to route
CHUNK_CHARS = 256
MAX_CHUNKS = 128


@dataclass(frozen=True, slots=True)
class RouteKey:
    """`home`: the request's place on the hash ring (a prefix no gateway has seen goes there); `chain`: the hashes
    of its leading full chunks, each over the one before (this process's hashes: they only meet its own index);
    `identity`: how many of them the home covers (the text its hash reads: a replica that holds more of the prefix
    than that holds this very request's, or its conversation's, beyond what every request of its home shares)."""
    home: int
    chain: tuple[int, ...] = ()
    identity: int = 0


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


def _chain(parent: bytes, role: str, text: str, whole: bool = True) -> bytes:
    """The next message's hash: over its parent's hash, its role and its text cut to KEY_CHARS; with `whole`, its
    whole length too, so that a cut never makes two lengths equal (the first user message goes without it: requests
    that share a long prefix inside it, a document or examples before the question, share their home)."""
    length = len(text) if whole else -1
    block = b"%b%d\0%b%d\0%b" % (parent, len(role), role[:64].encode(errors="replace"), length,
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
        digest = _chain(digest, role, _text(m.get("content")), whole=role != "user")
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


def _rendered(kind: str, body: dict, limit: int) -> tuple[str, int]:
    """The prompt as the engine will see it, near enough for prefixes: every message's role and text in order (a
    chat template adds the same markers to the same messages), a prompt's text (or token ids); its first `limit`
    characters, and how many of them the home key reads (through the first user message's first KEY_CHARS)."""
    parts: list[str] = []
    size, identity = 0, 0
    if kind in ("chat", "responses"):
        if kind == "chat":
            messages = body.get("messages") or []
        else:
            given = body.get("input")
            messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
            messages += [{"role": "user", "content": given}] if isinstance(given, str) else [
                {"role": i.get("role") or "user", "content": i.get("content", i.get("output"))}
                for i in (given if isinstance(given, list) else []) if isinstance(i, dict)]
        for m in messages:
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            content = _text(m.get("content"))
            text = f"<{role if isinstance(role, str) else ''}>\n{content}\n"
            if not identity and role == "user":
                identity = size + len(text) - len(content) - 1 + min(len(content), KEY_CHARS)
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
    else:
        prompt = body.get("prompt" if kind == "completions" else "input")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # the first of a batch
        if isinstance(prompt, list):  # token ids
            ids = [str(t) for t in prompt[:limit // 4]]
            parts.append(" ".join(ids))
            identity = len(" ".join(ids[:PROMPT_KEY_CHARS // 4]))
        elif isinstance(prompt, str):
            parts.append(prompt[:limit])
            identity = min(len(prompt), PROMPT_KEY_CHARS)
    return "".join(parts)[:limit], identity or size


def chunk_chain(text: str) -> tuple[int, ...]:
    """The chained hashes of `text`'s full CHUNK_CHARS chunks (a partial last one is left out, as vLLM caches only
    full blocks)."""
    chain: list[int] = []
    parent = 0
    for start in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS):
        parent = hash((parent, text[start:start + CHUNK_CHARS]))
        chain.append(parent)
    return tuple(chain)


def route_key(kind: str, body: dict, session: str | None = None) -> RouteKey:
    """The request's home (request_key), its prefix chain and how much of it the home covers."""
    text, identity = _rendered(kind, body, CHUNK_CHARS * MAX_CHUNKS)
    return RouteKey(request_key(kind, body, session), chunk_chain(text), identity // CHUNK_CHARS)


def for_adapter(key: RouteKey, adapter: str) -> RouteKey:
    """A request's key when it asks for a LoRA adapter: the engines cache its prefixes apart from the base model's
    and other adapters' (vLLM's block hashes include the adapter), so its home and chain are its own; the home alike
    in every gateway."""
    salt = stable_hash(adapter.encode())
    home = stable_hash(salt.to_bytes(8, "big") + key.home.to_bytes(8, "big"))
    return RouteKey(home, tuple(hash((salt, chunk)) for chunk in key.chain), key.identity)
