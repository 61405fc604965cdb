"""Where a request's leading chunks were sent lately, so likely still cached (pure): chunk hash → replicas, LRU
bounded."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

# entries kept per replica of the model: a replica's KV cache holds about this many chunks (64-token ones: ~0.5M
# tokens, an 80 GB card's cache for a small model), so older ones have likely been evicted there too
CHUNKS_PER_REPLICA = 8192


class PrefixIndex:
    """What this gateway sent where: for each chunk hash (a chain: equal hashes mean equal text up to that chunk),
    the replicas it went to. The least recently sent chunks go first once it holds `capacity` of them. Nothing is
    shared between gateways: each learns from what it routed, and a prefix none has seen goes to its home on the
    ring, alike in every gateway, so each learns the same."""
    __slots__ = ("capacity", "_sent")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._sent: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sent)

    def record(self, chain: Sequence[int], url: str) -> None:
        """`chain`'s chunks were sent to `url` (it will hold them cached once it has read the request)."""
        sent = self._sent
        for chunk in chain:
            where = sent.get(chunk)
            if where is None:
                sent[chunk] = {url}
            else:
                where.add(url)
                sent.move_to_end(chunk)
        while len(sent) > self.capacity:
            sent.popitem(last=False)

    def depths(self, chain: Sequence[int], urls: Collection[str]) -> dict[str, int]:
        """For each of `urls` that holds some of `chain`: how many of its leading chunks (the deepest it holds)."""
        found: dict[str, int] = {}
        sent = self._sent
        for depth in range(len(chain), 0, -1):
            where = sent.get(chain[depth - 1])
            if where:
                for url in where:
                    if url not in found and url in urls:
                        found[url] = depth
                if len(found) == len(urls):
                    break
        return found

    def forget(self, url: str) -> None:
        """A replica that left: nothing of its cache counts any more (a new one at its address starts empty)."""
        for chunk in [c for c, where in self._sent.items() if url in where]:
            where = self._sent[chunk]
            where.discard(url)
            if not where:
                del self._sent[chunk]
