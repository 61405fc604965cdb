"""Static backends: the models list of the config file (a workstation with vLLM in a process)."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cxygpt_profiles import Limits, ProfileTable

from ..settings import AdapterConfig, ModelConfig
from .base import AdapterSpec, ModelSink, ModelSpec


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged


def snake_keys(model: type[BaseModel], data: dict) -> dict:
    """camelCase keys (as Kubernetes status carries them) to the field names, nested models too."""
    out = {}
    for key, value in data.items():
        name = next((n for n, f in model.model_fields.items() if key in (n, f.alias)), key)
        field = model.model_fields.get(name)
        nested = field.annotation if field else None
        if isinstance(value, dict) and isinstance(nested, type) and issubclass(nested, BaseModel):
            value = snake_keys(nested, value)
        out[name] = value
    return out


def _api_key(cfg: ModelConfig) -> str | None:
    if cfg.api_key_file:
        try:
            return Path(cfg.api_key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"model {cfg.name!r}: cannot read api_key_file: {e}") from None
    if cfg.api_key_env:
        if cfg.api_key_env not in os.environ:
            raise ValueError(f"model {cfg.name!r}: environment variable {cfg.api_key_env} is not set")
        return os.environ[cfg.api_key_env]
    return None


def spec_from_config(cfg: ModelConfig, table: ProfileTable) -> ModelSpec:
    """The profile's limits with the entry's overrides (snake or camelCase keys); errors name the model."""
    mode = cfg.mode
    limits: dict = {}
    if cfg.profile:
        try:
            profile = table.get(cfg.profile)
        except KeyError:
            raise ValueError(f"model {cfg.name!r}: profile {cfg.profile!r} is not one of "
                             f"{', '.join(table.names)}") from None
        limits = profile.limits.model_dump()
        mode = mode or profile.mode
    overrides = snake_keys(Limits, cfg.limits)
    try:
        parsed = Limits.model_validate(_merge(limits, overrides))
    except ValidationError as e:
        raise ValueError(f"model {cfg.name!r}: limits: {e}") from None
    adapters = []
    for given in cfg.adapters:
        adapter = given if isinstance(given, AdapterConfig) else AdapterConfig(name=given)
        own = None
        if adapter.limits:
            try:
                own = Limits.model_validate(_merge(_merge(limits, overrides), snake_keys(Limits, adapter.limits)))
            except ValidationError as e:
                raise ValueError(f"model {cfg.name!r}: adapter {adapter.name!r}: limits: {e}") from None
        adapters.append(AdapterSpec(adapter.name, limits=own))
    if len({a.name for a in adapters}) != len(adapters):
        raise ValueError(f"model {cfg.name!r}: adapter names must be unique")
    return ModelSpec(name=cfg.name, urls=tuple(cfg.base_urls), limits=parsed, mode=mode or "multi",
                     profile=cfg.profile, fallback=cfg.fallback, upstream_model=cfg.upstream_model, task=cfg.task,
                     api_key=_api_key(cfg), external=cfg.external, routing_policy=cfg.routing.policy,
                     routing_epsilon=cfg.routing.epsilon, adapters=tuple(adapters))


class StaticDiscovery:
    def __init__(self, models: list[ModelConfig], table: ProfileTable):
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("model names in the config must be unique")
        self.specs = [spec_from_config(m, table) for m in models]
        known = set(names)
        for spec in self.specs:
            if spec.fallback and spec.fallback not in known:
                raise ValueError(f"model {spec.name!r}: fallback {spec.fallback!r} is not a configured model")

    async def start(self, sink: ModelSink) -> None:
        for spec in self.specs:
            sink.upsert(spec)

    async def stop(self) -> None:
        return None
