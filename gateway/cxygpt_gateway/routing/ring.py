"""The consistent-hash ring of a model's replicas (pure): every gateway with the same replicas has the same ring."""
from __future__ import annotations

import bisect
from collections.abc import Iterable

from .keys import stable_hash

# points per replica on the hash ring: the share of keys each replica owns varies by about 1/sqrt of this
VIRTUAL_NODES = 128


class Ring:
    """Consistent hashing: VIRTUAL_NODES points per replica URL, placed by stable hashes of the URL alone, so every
    gateway with the same replicas has the same ring, and a replica joining or leaving moves only the keys it
    takes or gives (~1/N of them)."""
    __slots__ = ("urls", "points", "owners", "_walks")

    def __init__(self, urls: Iterable[str], vnodes: int = VIRTUAL_NODES):
        self.urls = tuple(sorted(set(urls)))
        placed = sorted((stable_hash(f"{url}#{i}".encode()), url) for url in self.urls for i in range(vnodes))
        self.points = [point for point, _ in placed]
        self.owners = [url for _, url in placed]
        self._walks: dict[int, tuple[str, ...]] = {}

    def walk(self, key: int) -> tuple[str, ...]:
        """Every replica once, in ring order from the key's point on: the key's home first."""
        if not self.points:
            return ()
        start = bisect.bisect_left(self.points, key) % len(self.points)
        found = self._walks.get(start)
        if found is None:
            seen: dict[str, None] = {}
            at = start
            while len(seen) < len(self.urls):
                seen.setdefault(self.owners[at])
                at = (at + 1) % len(self.points)
            found = tuple(seen)
            if len(self._walks) < 1 << 16:  # one per ring point at most; bounded anyway
                self._walks[start] = found
        return found
