"""Hand out the KV cache's blocks to sequences, and keep full blocks for reuse by prompts that share a prefix.

A sequence holds a list of blocks, one per `block_size` positions. With prefix caching, a block whose positions
are all written is keyed by a hash of its tokens and of everything before them (the hash of the previous block),
so a later sequence that starts with the same tokens takes the same blocks instead of computing them again.
Blocks are reference-counted; a cached block no sequence holds stays cached until its memory is needed, the least
recently used first. Blocks holding nothing are handed out before any cached block is evicted.

>>> m = BlockManager(num_blocks=4, block_size=2)
>>> a = m.allocate(2)
>>> m.register(a, m.extend_hashes([], [5, 6, 7, 8]))  # both blocks are full: cached under their prefix hashes
2
>>> m.release(a)
>>> m.match([5, 6, 7, 8, 9], m.extend_hashes([], [5, 6, 7, 8, 9]))  # the longest cached prefix, in blocks
[0, 1]
>>> m.used
0
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from miaotui.errors import MiaotuiError


class BlockManager:
    """Reference-counted blocks of `block_size` positions, with an LRU cache of full blocks keyed by prefix.

    prefix_caching: keep and match full blocks (off: every sequence computes its whole prompt).
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise MiaotuiError("a block manager needs at least one block of at least one position")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        self.empty: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # free, holding nothing
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, cached; least recently used first
        self.hash_of: dict[int, bytes] = {}  # block -> its prefix hash
        self.cached: dict[bytes, int] = {}  # prefix hash -> block
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up, and found cached

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (empty, or cached and held by no sequence)."""
        return len(self.empty) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.available

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def extend_hashes(self, hashes: list[bytes], tokens: list[int]) -> list[bytes]:
        """Append to `hashes` (those of tokens' first blocks) the prefix hashes of tokens' other full blocks."""
        if not self.prefix_caching:
            return hashes
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            block = ",".join(map(str, tokens[i * bs : (i + 1) * bs])).encode()
            hashes.append(hashlib.sha256((hashes[-1] if hashes else b"") + b"|" + block).digest())
        return hashes

    def match(self, tokens: list[int], hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of tokens (`hashes`: their prefix hashes), leaving at
        least one token to compute (its logits are needed). Counts toward the hit rate; `acquire` them."""
        if not self.prefix_caching:
            return []
        found = []
        for h in hashes[: (len(tokens) - 1) // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(found) * self.block_size
        return found

    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on blocks (cached ones found by `match`)."""
        for b in blocks:
            if self.refs[b] == 0:
                self.evictable.pop(b, None)
                self.empty.pop(b, None)
            self.refs[b] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` blocks held once each: empty ones first, then the least recently used cached ones."""
        if count > self.available:
            raise MiaotuiError(f"{count} KV cache blocks asked for, {self.available} free")
        out = []
        for _ in range(count):
            pool = self.empty if self.empty else self.evictable
            block, _ = pool.popitem(last=False)
            h = self.hash_of.pop(block, None)
            if h is not None:
                del self.cached[h]
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop a reference on each block; a block no one holds is free again (kept cached if it has a hash)."""
        for b in reversed(blocks):  # a sequence's last blocks are evicted before its first (its prefix)
            if self.refs[b] <= 0:
                raise MiaotuiError(f"KV cache block {b} released more often than held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                (self.evictable if b in self.hash_of else self.empty)[b] = None

    def register(self, blocks: list[int], hashes: list[bytes], start: int = 0) -> int:
        """Key blocks[start:len(hashes)] (full, their keys and values written) by their prefix hashes; returns
        len(hashes), the next call's start. A prefix already cached under another block stays with that one."""
        for i in range(start, min(len(hashes), len(blocks))):
            h = hashes[i]
            if h not in self.cached and blocks[i] not in self.hash_of:
                self.cached[h], self.hash_of[blocks[i]] = blocks[i], h
        return max(start, len(hashes))

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens found in the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
