"""Who may use the console: nobody is asked (none), a gateway API key (api-key) or a shared token (token)."""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

MODES = ("none", "api-key", "token")
SESSION_USER = "user"
MAX_FORM_BYTES = 4096
LOGIN_TRIES_PER_CLIENT = RateLimitItemPerMinute(10)
LOGIN_TRIES_IN_ALL = RateLimitItemPerMinute(100)
ANONYMOUS = "anonymous"


class LoginRefused(Exception):
    """Why a login failed, in words for the login page; `status` for the answer."""

    def __init__(self, message: str, status: int = 401):
        super().__init__(message)
        self.status = status


def form_field(body: bytes, name: str) -> str:
    """One field of a urlencoded form body (bounded by the caller)."""
    values = parse_qs(body.decode(errors="replace"), max_num_fields=8).get(name) or [""]
    return values[0].strip()


@dataclass
class Auth:
    """`check_key(key)` asks the gateway who a key is: its key id, or None for an unknown key (api-key mode)."""
    mode: str
    token: str | None = None
    check_key: Callable[[str], Awaitable[str | None]] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"auth mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "token" and not self.token:
            raise ValueError("auth mode token needs a token (CXYGPT_CONSOLE_TOKEN or --token-file)")
        if self.mode == "api-key" and self.check_key is None:
            raise ValueError("auth mode api-key needs the gateway to check keys")
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    @property
    def required(self) -> bool:
        return self.mode != "none"

    def user(self, session: dict) -> str | None:
        """The signed-in user of a session (its cookie is signed and expires), or None."""
        if not self.required:
            return ANONYMOUS
        user = session.get(SESSION_USER)
        return user if isinstance(user, str) and user else None

    async def login(self, credential: str, client: str) -> str:
        """The user a credential signs in, or LoginRefused. Failed tries are limited per client and in all (a
        proxy in front makes every user one client: those who sign in right are never held back by it)."""
        if not (await self.limiter.test(LOGIN_TRIES_IN_ALL, "all") and
                await self.limiter.test(LOGIN_TRIES_PER_CLIENT, "client", client)):
            raise LoginRefused("too many failed sign-in attempts: wait a minute", status=429)
        try:
            return await self._user_of(credential)
        except LoginRefused as refused:
            if refused.status == 401:
                await self.limiter.hit(LOGIN_TRIES_IN_ALL, "all")
                await self.limiter.hit(LOGIN_TRIES_PER_CLIENT, "client", client)
            raise

    async def _user_of(self, credential: str) -> str:
        if not credential or len(credential) > 1024:
            raise LoginRefused("enter your API key" if self.mode == "api-key" else "enter the console token")
        if self.mode == "token":
            if hmac.compare_digest(credential.encode(), (self.token or "").encode()):
                return "token"
            raise LoginRefused("wrong token")
        assert self.check_key is not None  # api-key mode has one (checked when made)
        key_id = await self.check_key(credential)
        if key_id is None or key_id == ANONYMOUS:
            raise LoginRefused("the gateway does not know this API key")
        return key_id
