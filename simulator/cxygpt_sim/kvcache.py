"""KV blocks with vLLM V1's automatic prefix caching (pure): chained block hashes, ref counts, LRU eviction."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = 0  # the parent of a prompt's first block (vLLM seeds it; any fixed value keeps runs reproducible)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block, each over (parent's hash, the block's tokens): equal hashes mean equal prefixes."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class KVCache:
    """Fixed pool of blocks. A block is used (ref count > 0) or free; a free block may still hold a cached prefix,
    found by its hash until it is evicted. Free blocks are reused least recently freed first. A request without
    hashes (prefix caching off) neither finds nor leaves anything in the cache."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        # insertion order is the eviction order: the front goes first
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def usage(self) -> float:
        return (self.num_blocks - len(self.free)) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, hashes: list[int], num_tokens: int) -> list[int]:
        """The blocks that hold the longest cached prefix of a request of num_tokens; like vLLM, never all of them,
        so at least the last token is computed and the step has logits to sample from."""
        blocks = []
        for h in hashes[:(num_tokens - 1) // self.block_size]:
            block = self.by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, held: list[int], cached: list[int], total_tokens: int) -> bool:
        """Grow `held` (a request's blocks) to cover total_tokens, first with the `cached` prefix blocks it will
        share, then with new ones; False and nothing changed if the free blocks do not suffice."""
        new = self.blocks_for(total_tokens) - len(held) - len(cached)
        # a cached block that is free counts as free but cannot also be handed out as a new one
        reusable = sum(1 for b in cached if self.ref_counts[b] == 0)
        if new > len(self.free) - reusable:
            return False
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            held.append(block)
        for _ in range(max(new, 0)):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            held.append(block)
        return True

    def cache_full_blocks(self, held: list[int], hashes: list[int], computed_tokens: int) -> None:
        """Make the request's full, computed prompt blocks findable by their hash."""
        for block, h in zip(held[:computed_tokens // self.block_size], hashes):
            if h not in self.by_hash:  # else it is this very block, or an equal one computed first
                self.hash_of[block] = h
                self.by_hash[h] = block

    def release(self, held: list[int]) -> None:
        """A request gives back its blocks; the last ones go to the free queue first, so a shared prefix (at the
        front) outlives a request's private tail, as in vLLM."""
        for block in reversed(held):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        held.clear()

    def _evict(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            del self.by_hash[h]
            self.hash_of[block] = None
