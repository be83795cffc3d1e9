"""Continuous batching: each step's batch of (sequence, new tokens) from the running and waiting queues.

Every step first gives each running sequence its next tokens (one for a decoding sequence, the next chunk
of a prompt still being prefilled), then admits waiting requests while the token budget, the sequence
limit and the KV blocks allow; a long prompt is prefilled in chunks of what is left of the budget. When a
running sequence needs a KV block and none is free, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed (prompt and
the tokens generated so far) when it is admitted again - the greedy output does not change.
"""

from __future__ import annotations

from collections import deque

from moestack.serve.kv_cache import BlockManager
from moestack.serve.sequence import Sequence, Status


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks, self.max_num_seqs, self.budget = blocks, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """(this step's [(sequence, tokens to compute)], sequences that cannot grow even alone: finish them)."""
        budget, batch, stuck = self.budget, [], []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n, []):
                victim = self.running[-1]
                if victim is seq:
                    break
                self.preempt(victim)
            else:
                self.blocks.grow(seq, seq.num_computed + n)
                batch.append((seq, n))
                budget -= n
                i += 1
                continue
            if len(self.running) == 1 and not batch:  # alone and still no room: the cache is too small for it
                self.running.remove(seq)
                stuck.append(seq)
            else:
                self.preempt(seq)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq)
            start = len(cached) * self.blocks.block_size
            n = min(len(seq) - start, budget)
            if not self.blocks.can_allocate(seq, start + n, cached):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached)
            self.blocks.grow(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch, stuck

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preempted += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
