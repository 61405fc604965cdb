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
    found by its hash until it is evicted. Blocks never used go first, then free ones least recently freed first
    (vLLM's free queue starts with every block in order). A request without hashes (prefix caching off) neither
    finds nor leaves anything in the cache."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        # bookkeeping only for blocks ever used, so a budget of millions of tokens costs nothing until used
        self.never_used_from = 0
        self.ref_counts: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        # insertion order is the eviction order: the front goes first
        self.freed: OrderedDict[int, None] = OrderedDict()

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.never_used_from + len(self.freed)

    @property
    def usage(self) -> float:
        return (self.num_blocks - self.free_blocks) / self.num_blocks

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
        reusable = sum(1 for b in cached if b in self.freed)
        if new > self.free_blocks - reusable:
            return False
        for block in cached:
            self.freed.pop(block, None)
            self.ref_counts[block] = self.ref_counts.get(block, 0) + 1
            held.append(block)
        for _ in range(max(new, 0)):
            if self.never_used_from < self.num_blocks:
                block = self.never_used_from
                self.never_used_from += 1
            else:
                block, _ = self.freed.popitem(last=False)
                self._evict(block)
            self.ref_counts[block] = 1
            held.append(block)
        return True

    def cache_full_blocks(self, held: list[int], hashes: list[int], tokens: int) -> None:
        """Make the request's full prompt blocks up to `tokens` findable by their hash."""
        for block, h in zip(held[:tokens // self.block_size], hashes):
            if h not in self.by_hash:  # else it is this very block, or an equal one cached first
                self.hash_of[block] = h
                self.by_hash[h] = block

    def release(self, held: list[int]) -> None:
        """A request gives back its blocks; the last ones go to the free queue first, so a shared prefix (at the
        front) outlives a request's private tail, as in vLLM."""
        for block in reversed(held):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                del self.ref_counts[block]
                self.freed[block] = None
        held.clear()

    def _evict(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.by_hash[h]
