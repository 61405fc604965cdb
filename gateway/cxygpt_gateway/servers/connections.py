"""Client connections counted in all and per address, and what a new one may do (pure: counts in, verdict out)."""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["serve", "health_only", "drop"]
# what a connection past the limits may still ask for: the kubelet's probes and Prometheus' scrapes
HEALTH_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})
# descriptors kept for what is not a client connection: upstream connections, files, the event loop's own
FD_RESERVE = 1024


@dataclass
class ConnectionLimits:
    max_connections: int
    per_client: int
    health: int


def verdict(total: int, of_client: int, limits: ConnectionLimits) -> Verdict:
    """For a connection that makes `total` open connections, `of_client` of them from its address: serve it;
    let it reach health checks only (its other requests get 503); or close it at once."""
    if total > limits.max_connections + limits.health:
        return "drop"
    if total > limits.max_connections or of_client > limits.per_client:
        return "health_only"
    return "serve"


def usable_connections(wanted: int, fd_limit: int) -> int:
    """`wanted`, or fewer when the process may not open that many descriptors besides its own needs."""
    return max(1, min(wanted, fd_limit - FD_RESERVE))


def raise_fd_limit() -> int:
    """The soft limit of open files raised to the hard one (a server's usual start-up); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@dataclass
class ConnectionCounts:
    """Open connections, in all and by client address (addresses with none are forgotten)."""
    limits: ConnectionLimits
    total: int = 0
    by_client: dict[str, int] = field(default_factory=dict)

    def opened(self, client: str) -> Verdict:
        self.total += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return verdict(self.total, self.by_client[client], self.limits)

    def closed(self, client: str) -> None:
        self.total -= 1
        left = self.by_client.get(client, 1) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)
