"""Gateway settings: a YAML config file, overridden by environment variables, overridden by the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class RoutingConfig(BaseModel):
    """How requests are spread over a model's replicas (gateway/README.md, "Routing")."""
    model_config = ConfigDict(extra="forbid")

    policy: Literal["prefix", "least-load", "round-robin"] | None = Field(
        None, description="default: prefix for a multi-user model, least-load for a single-user one")
    epsilon: float | None = Field(None, gt=0, le=4, description="prefix's load bound: no replica above "
                                  "(1 + epsilon) x the mean in flight, and a key's home within it takes "
                                  "floor(epsilon x max_concurrency) more than its slots; default 0.25")


class AdapterConfig(BaseModel):
    """A LoRA adapter on a static model's replicas, served under its own name."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, description="the adapter's served name (the engines' lora_name)")
    limits: dict = Field(default_factory=dict, description="overrides of the model's limits for this adapter's "
                                                           "requests (rate budgets are its own either way)")


class ModelConfig(BaseModel):
    """One model of the static backend file."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="the OpenAI model name clients send")
    url: str | None = Field(None, description="base URL of one upstream (no /v1)")
    urls: list[str] = Field(default_factory=list, description="base URLs of several replicas")
    profile: str | None = Field(None, description="profiles.yaml entry whose limits apply")
    limits: dict = Field(default_factory=dict, description="overrides of the profile's limits (snake or camelCase)")
    mode: Literal["single", "multi"] | None = Field(None, description="default: the profile's mode")
    fallback: str | None = Field(None, description="another model name to use when this one cannot serve")
    upstream_model: str | None = Field(None, description="model name the upstream expects, when it differs")
    task: Literal["generate", "embed"] = Field("generate", description="embed: an embedding model (/v1/embeddings)")
    api_key_env: str | None = Field(None, description="environment variable holding the upstream's API key")
    api_key_file: str | None = Field(None, description="file (e.g. a mounted Secret) holding the upstream's API key")
    external: bool = Field(False, description="an external OpenAI-compatible provider: no /tokenize, no /health")
    routing: RoutingConfig = Field(default_factory=RoutingConfig,
                                   description="this model's routing; unset keys come from the top-level routing")
    adapters: list[str | AdapterConfig] = Field(
        default_factory=list, description="LoRA adapters its replicas may load: a name, or {name, limits}")

    @model_validator(mode="after")
    def _has_upstream(self):
        if not self.url and not self.urls:
            raise ValueError(f"model {self.name!r}: set url or urls")
        return self

    @property
    def base_urls(self) -> list[str]:
        return [u.rstrip("/") for u in ([self.url] if self.url else []) + self.urls]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXYGPT_", extra="forbid", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, gt=0, lt=65536)
    models: list[ModelConfig] = Field(default_factory=list)
    kubernetes: bool = Field(False, description="discover ModelDeployments instead of the static models list")
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="namespaces to watch (CXYGPT_NAMESPACES=a,b); empty: all namespaces")
    kubeconfig: str | None = Field(None, validation_alias=AliasChoices("kubeconfig", "KUBECONFIG"))
    keys_file: str | None = Field(None, description="API keys and tiers (YAML); none: every caller is anonymous")
    redis_url: str | None = Field(None, validation_alias=AliasChoices("redis_url", "REDIS_URL"))
    single_user: bool | None = Field(None, validation_alias=AliasChoices("single_user", "SINGLE_USER"))
    force_profile: str | None = Field(None, validation_alias=AliasChoices("force_profile", "FORCE_PROFILE"))
    auto_degrade: bool = Field(False, validation_alias=AliasChoices("auto_degrade", "AUTO_DEGRADE"))
    max_body_bytes: int = Field(1 << 20, gt=0)
    tokenize: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: ask the upstream's /tokenize only when the input might be over the limit")
    tokenize_skip_margin: int = Field(
        128, ge=0, description="tokens a chat template may add (default system prompt, role markers) "
                               "when judging from byte length that an input cannot be over the limit")
    degrade_window_s: float = Field(30.0, gt=0, description="rolling window of the p95 TTFT")
    degraded_long_input_fraction: float = Field(
        0.5, gt=0, le=1, description="while degraded, inputs over this share of max_input_tokens are long")
    degraded_temperature_max: float | None = Field(None, ge=0)
    degraded_top_p_max: float | None = Field(None, gt=0, le=1)
    health_interval_s: float = Field(5.0, gt=0, description="how often static upstreams' /health is checked")
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="every model's routing default")
    engine_metrics_interval_s: float = Field(
        1.0, ge=0, description="how often each replica's /metrics is read for the requests others hold there "
                               "(counted against its slots) and its waiting requests and KV-cache usage "
                               "(routing's tie-breaks); 0: never")
    gateway_replicas: int = Field(
        1, ge=1, le=1000, description="how many gateway replicas share the engines: each may always use "
                                      "⌈max_concurrency / this⌉ of a replica's slots, and the rest while the "
                                      "engine's last read leaves them free; with gateway_service, the count "
                                      "until that Service lists a ready replica")
    gateway_service: str | None = Field(
        None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="namespace/name of the Service in front of the gateway replicas (with kubernetes): its ready "
                    "endpoints are counted, and the count is gateway_replicas while the Service lists any")
    demand_window_s: float = Field(
        10.0, gt=0, description="the window of cxygpt_gateway_demand (in flight + waiting, averaged), which the "
                                "operator's autoscaler reads")
    max_adapters_per_model: int = Field(
        32, ge=0, le=1000, description="LoRA adapters served per model (the first ones its config or "
                                       "ModelDeployment lists): bounds the metrics' model labels")
    adapter_wait_s: float = Field(
        5.0, ge=0, le=600, description="how long a request for an adapter that no ready replica has loaded waits "
                                       "for one (it may be loading) before a 503")
    cold_start_timeout_s: float = Field(
        600.0, gt=0, description="how long a request for an autoscaled model with no ready replica (at zero: "
                                 "woken by it) waits for the first one")
    tokenize_concurrency: int = Field(
        8, ge=1, le=256, description="/tokenize calls open to one upstream at a time, all requests together")
    max_connections: int = Field(
        4096, ge=1, description="client connections served at once; past it (up to health_connections more) only "
                                "/healthz, /readyz and /metrics are served and other requests get 503, beyond that "
                                "new connections are closed at once. Lowered at start to what the process's "
                                "file-descriptor limit allows")
    max_connections_per_client: int = Field(
        512, ge=1, description="connections one client address may hold; its requests on more get 503")
    health_connections: int = Field(
        64, ge=1, description="connections kept for health checks and scrapes past max_connections")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's line and headers must arrive within this (from the connection or the "
                                "request's first byte); else 408 and the connection closes")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request's body must arrive within this after its headers; else 408")
    keepalive_timeout_s: int = Field(
        5, gt=0, description="an idle kept-alive connection is closed after this")
    max_header_bytes: int = Field(
        65536, ge=1024, description="request line and headers together; past it 431 and the connection closes")
    log_requests: bool = True
    log_level: str = "info"

    @field_validator("namespaces", mode="before")
    @classmethod
    def _namespace_list(cls, value):
        """One name, or several separated by commas (CXYGPT_NAMESPACES=a,b), or a list."""
        return [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config: str | Path | None = None, **overrides) -> GatewaySettings:
    """Settings from `config` (YAML) under environment variables under `overrides`; relative paths in the
    file are taken relative to the file."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        return GatewaySettings(**overrides)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    configured = type("ConfiguredGatewaySettings", (GatewaySettings,),
                      {"model_config": {**GatewaySettings.model_config, "yaml_file": path}})
    settings = configured(**overrides)
    if settings.keys_file and not Path(settings.keys_file).is_absolute():
        settings.keys_file = str(path.parent / settings.keys_file)
    for model in settings.models:
        if model.api_key_file and not Path(model.api_key_file).is_absolute():
            model.api_key_file = str(path.parent / model.api_key_file)
    return settings
