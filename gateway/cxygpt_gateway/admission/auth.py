"""API keys → callers and their tiers; keys are stored and compared only as SHA-256 digests."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import GatewayError
from .ratelimit import Rate, Scope

ANONYMOUS = "anonymous"


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rate_qps: float | None = Field(None, gt=0, description="requests per second for each key of the tier")
    rate_tpm: int | None = Field(None, gt=0, description="tokens per minute for each key of the tier")
    priority: int = Field(0, description="queue order: lower is served first")
    max_output_tokens: int | None = Field(None, gt=0, description="a tighter output cap than the model's")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, description="shown in logs and metrics instead of the key")
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    tier: str


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    allow_anonymous: bool = False
    anonymous_tier: str = ANONYMOUS
    tiers: dict[str, Tier] = Field(default_factory=dict)
    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tiers_exist(self):
        for entry in self.keys:
            if entry.tier not in self.tiers:
                raise ValueError(f"key {entry.id!r} names unknown tier {entry.tier!r}")
        ids = [e.id for e in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique")
        return self


@dataclass(frozen=True)
class Caller:
    key_id: str
    tier_name: str
    tier: Tier

    @cached_property
    def scope(self) -> Scope:
        """The key's own rate limits (a caller lives as long as the key store)."""
        return Scope(f"key:{self.key_id}", f"key {self.key_id}", Rate(self.tier.rate_qps, self.tier.rate_tpm))


class KeyStore:
    """Who a bearer token is; with no keys file every caller is anonymous with no per-key limits."""

    def __init__(self, keys: KeysFile | None, *, allow_anonymous: bool | None = None):
        self.enabled = keys is not None
        keys = keys or KeysFile(allow_anonymous=True)
        # without a keys file there is nobody to tell apart: everyone is anonymous
        self.allow_anonymous = (not self.enabled or keys.allow_anonymous if allow_anonymous is None
                                else allow_anonymous or not self.enabled)
        self._by_digest = {e.key_sha256.lower(): Caller(e.id, e.tier, keys.tiers[e.tier]) for e in keys.keys}
        self.anonymous = Caller(ANONYMOUS, keys.anonymous_tier, keys.tiers.get(keys.anonymous_tier, Tier()))

    @classmethod
    def from_file(cls, path: str | None, *, allow_anonymous: bool | None = None) -> KeyStore:
        if not path:
            return cls(None, allow_anonymous=allow_anonymous)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
            return cls(KeysFile.model_validate(data), allow_anonymous=allow_anonymous)
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"keys file {path}: {e}") from None

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an `Authorization` header value, or a 401. Without keys every caller is anonymous,
        whatever it sends (chat UIs send `Bearer ` with an empty or placeholder token)."""
        if not self.enabled:
            return self.anonymous
        if not authorization:
            if self.allow_anonymous:
                return self.anonymous
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                               reason="auth")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(401, "malformed Authorization header: expected 'Bearer <key>'",
                               code="invalid_api_key", reason="auth")
        digest = hashlib.sha256(token.encode()).hexdigest()
        caller = self._by_digest.get(digest)
        if caller is None:
            raise GatewayError(401, "invalid API key", code="invalid_api_key", reason="auth")
        return caller
