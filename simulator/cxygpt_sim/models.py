"""The models requests may name (vLLM's OpenAIServingModels): the base model's served names and the LoRA adapters
loaded, their /v1/models cards, and an adapter read and checked for the engine."""
from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import adapters, protocol
from .config import SimConfig
from .lora import Lora

NOT_ENABLED = "LoRA is not enabled. Use --enable-lora to enable LoRA."


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter as the API server knows it: requests naming it run its Lora."""
    name: str
    path: str                   # as it was given: /v1/models shows it as the card's root
    parent: str                 # the base model's served name it belongs to
    lora: Lora


class Models:
    def __init__(self, config: SimConfig, loaded: Sequence[Adapter] = ()):
        """loaded: the adapters of --lora-modules, in order."""
        self.config = config
        self.adapters: dict[str, Adapter] = {a.name: a for a in loaded}    # in load order, as /v1/models lists them
        # vLLM's lora_id_counter: every load attempt takes one
        self._ids = itertools.count(max((a.lora.id for a in loaded), default=0) + 1)

    @property
    def served(self) -> protocol.Served:
        return protocol.Served(self.config.served_model_names, frozenset(self.adapters))

    def next_id(self, name: str) -> int:
        """The id a load of `name` gets: its own again when reloaded in place."""
        return self.adapters[name].lora.id if name in self.adapters else next(self._ids)

    def parent_of(self, base_model_name: str | None) -> str:
        """--lora-modules' base_model_name when it is a served name, else the first served name."""
        names = self.config.served_model_names
        return base_model_name if base_model_name in names else names[0]

    def lora_of(self, model: str | None) -> Lora | None:
        adapter = self.adapters.get(model) if model else None
        return adapter.lora if adapter else None

    def response_name(self, model: str | None) -> str:
        """The `model` an answer carries: the adapter's name, else the first served name."""
        return model if model in self.adapters else self.config.served_name

    def cards(self) -> list[dict]:
        now = int(time.time())
        return [card for name in (*self.config.served_model_names, *self.adapters) if (card := self.card(name, now))]

    def card(self, name: str, created: int | None = None) -> dict | None:
        """vLLM's ModelCard: the base's with max_model_len, an adapter's with its parent and its path as root."""
        created = int(time.time()) if created is None else created
        common = {"id": name, "object": "model", "created": created, "owned_by": "vllm"}
        if name in self.config.served_model_names:
            return {**common, "root": self.config.model, "parent": None, "max_model_len": self.config.max_model_len,
                    "permission": [permission(created)]}
        adapter = self.adapters.get(name)
        if adapter is None:
            return None
        return {**common, "root": adapter.path, "parent": adapter.parent, "max_model_len": None,
                "permission": [permission(created)]}


def permission(created: int) -> dict:
    """vLLM's ModelPermission defaults."""
    return {"id": f"modelperm-{secrets.token_hex(16)}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}


def read_adapter(config: SimConfig, lora_id: int, name: str, path: str, env: Mapping[str, str]) -> Lora:
    """What vLLM's worker does to load an adapter, up to putting it into its cache: AdapterError (AdapterNotFound)
    in its words. The Lora carries the time reading its weights takes, which the caller spends."""
    if config.lora is None:
        raise adapters.AdapterError(NOT_ENABLED)
    files = adapters.read(name, path, env)
    adapters.check(files, max_lora_rank=config.lora.max_lora_rank, base=config.lora_base)
    return Lora(lora_id, name, config.lora.load_s(files.weight_bytes))


def load_error(e: adapters.AdapterError) -> protocol.ApiError:
    """The API's answer to a failed load: 404 for an adapter not found, else 500 with the engine's message."""
    if isinstance(e, adapters.AdapterNotFound):
        return protocol.ApiError(404, protocol.sanitize_message(str(e)), "NotFoundError")
    return protocol.ApiError(500, protocol.sanitize_message(f"Call to add_lora method failed: {e}"),
                             "InternalServerError")
