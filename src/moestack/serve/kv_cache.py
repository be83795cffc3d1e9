"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, a prefix cache of full blocks.

A block is a `block_size`-token page of every layer's keys and values. Full blocks whose KV has been
computed are registered under a chained hash of their tokens (the hash of the block before, then these
tokens), so a later prompt with the same prefix reuses them instead of recomputing. Freed blocks stay in
the prefix cache, evictable, until a new allocation takes them (least recently freed first).
Invariant, checked by tests: every block is either referenced by a sequence or in the free list.
"""

from __future__ import annotations

from collections import OrderedDict

from moestack.serve.sequence import Sequence


class BlockManager:
    """Allocates KV blocks to sequences; ref-counted so prefix-cached blocks can be shared."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # oldest first

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a prefix-cache entry (evictable)."""
        return sum(1 for b in self.free if self.block_hash[b] is not None)

    def usage(self) -> float:
        """Fraction of blocks referenced by running sequences."""
        return 1.0 - len(self.free) / self.num_blocks

    # -- prefix cache -------------------------------------------------------------------------------------
    def _chain(self, prev: int | None, tokens: tuple) -> int:
        return hash((prev, tokens))

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache holding seq's leading full blocks (never the block of its last token,
        which must be computed to give the next token's logits)."""
        if not self.prefix_caching:
            return []
        found, h = [], None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block_tokens(i, self.block_size)
            h = self._chain(h, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            found.append(block)
        return found

    def register_computed(self, seq: Sequence) -> None:
        """Enter seq's full blocks whose KV is now computed into the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed, len(seq)) // self.block_size
        h = self.block_hash[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            tokens = seq.block_tokens(i, self.block_size)
            h = self._chain(h, tokens)
            if self.block_hash[block] is None:
                self.block_hash[block], self.block_tokens[block] = h, tokens
                self.hash_to_block.setdefault(h, block)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def reset_prefix_cache(self) -> int:
        """Forget every cache entry of a free block (blocks in use keep theirs); returns how many were dropped."""
        dropped = 0
        for b in self.free:
            if self.block_hash[b] is not None:
                if self.hash_to_block.get(self.block_hash[b]) == b:
                    del self.hash_to_block[self.block_hash[b]]
                self.block_hash[b] = self.block_tokens[b] = None
                dropped += 1
        return dropped

    # -- allocation ---------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its prefix-cache entry
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def blocks_needed(self, seq: Sequence, num_tokens: int, cached: list[int]) -> int:
        """New blocks to take from the free list so that seq's table covers num_tokens tokens."""
        have = len(seq.block_table) or len(cached)
        want = seq.num_blocks_for(num_tokens, self.block_size) - have
        revived = sum(1 for b in cached if self.ref_count[b] == 0) if not seq.block_table else 0
        return max(want, 0) + revived

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int]) -> bool:
        return self.blocks_needed(seq, num_tokens, cached) <= len(self.free)

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a new (or preempted) sequence its prefix-cached blocks; sets num_computed to the cached tokens."""
        assert not seq.block_table
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed = seq.num_cached = len(cached) * self.block_size
        seq.num_hashed_blocks = len(cached)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq's block table to cover num_tokens tokens (the caller checked there are enough)."""
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_free())

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody uses go to the free list (keeping their cache entry)."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def check(self, seqs=None) -> None:
        """Raise if a block is lost (neither referenced nor free) or double-booked; given the live sequences,
        also if a block's reference count is not the number of their block tables holding it (a leak)."""
        if seqs is not None:
            held = [0] * self.num_blocks
            for seq in seqs:
                for b in seq.block_table:
                    held[b] += 1
            for b in range(self.num_blocks):
                if held[b] != self.ref_count[b]:
                    raise AssertionError(f"KV block {b}: ref_count {self.ref_count[b]} but {held[b]} live sequences hold it")
        for b in range(self.num_blocks):
            in_free = b in self.free
            if in_free == (self.ref_count[b] > 0) or self.ref_count[b] < 0:
                raise AssertionError(f"KV block {b}: ref_count {self.ref_count[b]}, in free list {in_free}")
