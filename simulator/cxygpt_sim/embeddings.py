"""Deterministic embedding vectors and the /v1/embeddings answer (pure)."""
from __future__ import annotations

import base64
import math
import struct

# the vector size of the simulated embedding model: Qwen3-Embedding-0.6B's and bge-m3's hidden size, 2**10
SIZE_BITS = 10
SIZE = 1 << SIZE_BITS
FEATURES_PER_TOKEN = 4  # coordinates each token id adds to


def vector(ids: list[int], dimensions: int | None = None) -> list[float]:
    """A unit vector from the token ids: the sum of each token's signed coordinates (the hashing trick), cut to
    `dimensions` first and normalised after, as vLLM pools a matryoshka model. Texts that share tokens get close
    vectors."""
    size = min(dimensions or SIZE, SIZE)
    out = [0.0] * size
    for token in ids:
        for k in range(FEATURES_PER_TOKEN):
            # Knuth's multiplicative hash: its top bits pick the coordinate, the next one the sign; feature k falls
            # in the first SIZE / 4**k coordinates, so (as in a matryoshka model) the leading ones carry the most
            h = ((token * FEATURES_PER_TOKEN + k) * 2654435761) & 0xFFFFFFFF
            at = h >> (32 - SIZE_BITS + 2 * k)
            if at < size:
                out[at] += 1.0 if h >> (31 - SIZE_BITS) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in out))
    if norm == 0:
        # no feature falls into the kept coordinates (a size so small that none lands in it): still a unit vector
        return [1.0] + [0.0] * (size - 1)
    return [x / norm for x in out]


def encode(values: list[float], encoding_format: str):
    """float: the list; base64: little-endian float32 bytes, which the OpenAI SDK decodes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def answer(response_id: str, created: int, model: str, vectors: list, prompt_tokens: int) -> dict:
    return {"id": f"embd-{response_id}", "object": "list", "created": created, "model": model,
            "data": [{"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}
