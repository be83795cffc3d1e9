"""BlockManager and Scheduler on their own: reference counts, the prefix cache, chunked prefill, preemption."""

import pytest

from moestack.serve.kv_cache import BlockManager
from moestack.serve.params import SamplingParams
from moestack.serve.scheduler import Scheduler
from moestack.serve.sequence import Sequence

P = SamplingParams(max_tokens=4)


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), P)


def computed(bm, s):
    s.num_computed = len(s)
    bm.register_computed(s)


def test_prefix_cache_shares_only_full_computed_blocks():
    bm = BlockManager(8, 4)
    a = seq(range(10), "a")
    bm.admit(a, bm.cached_prefix(a))
    bm.grow(a, 10)
    assert bm.cached_prefix(seq(range(10))) == []  # nothing computed yet: nothing to share
    computed(bm, a)
    b = seq(list(range(8)) + [99, 98, 97], "b")
    hit = bm.cached_prefix(b)
    assert hit == a.block_table[:2]  # two full blocks; the third of a is partial
    bm.admit(b, hit)
    assert b.num_computed == 8 and all(bm.ref_count[x] == 2 for x in hit)
    assert bm.cached_prefix(seq(range(8))) == a.block_table[:1]  # never the block holding the last token
    bm.release(a)
    bm.release(b)
    bm.check()
    assert bm.num_free == 8 and bm.num_cached_free == 2


def test_freed_cached_blocks_are_evicted_least_recent_first_and_reset():
    bm = BlockManager(3, 2)
    a = seq(range(4), "a")
    bm.admit(a, [])
    bm.grow(a, 4)
    computed(bm, a)
    table = list(a.block_table)
    bm.release(a)
    assert bm.cached_prefix(seq(range(5))) == table  # freed, still cached
    c = seq([5, 5], "c")
    bm.admit(c, [])
    bm.grow(c, 2)  # takes the never-used block first, then the least recently freed
    assert c.block_table not in ([table[0]], [table[1]])
    d = seq([6, 6], "d")
    bm.admit(d, [])
    bm.grow(d, 2)
    assert d.block_table == [table[1]]  # released last-to-first: table[1] went to the free list first
    assert bm.cached_prefix(seq(range(5))) == [table[0]]
    assert bm.reset_prefix_cache() == 1 and bm.cached_prefix(seq(range(5))) == []
    bm.release(c)
    bm.release(d)
    bm.check([])


def test_check_catches_a_leak():
    bm = BlockManager(4, 2)
    a = seq(range(3))
    bm.admit(a, [])
    bm.grow(a, 3)
    bm.check([a])
    a.block_table.clear()  # lost without release
    with pytest.raises(AssertionError, match="KV block"):
        bm.check([a])


def test_chunked_prefill_and_the_sequence_limit():
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=8)
    long, short, third = seq(range(20), "long"), seq(range(3), "short"), seq(range(2), "third")
    for s in (long, short, third):
        sch.add(s)
    batch, _ = sch.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("long", 8)]
    long.num_computed += 8
    batch, _ = sch.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("long", 8)]
    long.num_computed += 8
    batch, _ = sch.schedule()
    assert [(s.request_id, n) for s, n in batch] == [("long", 4), ("short", 3)]  # third waits: 2 seqs max
    assert list(sch.waiting) == [third]


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(4, 2)
    sch = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq(range(4), "a"), seq(range(3), "b")
    sch.add(a)
    sch.add(b)
    batch, _ = sch.schedule()
    assert len(batch) == 2 and bm.num_free == 0
    for s, n in batch:
        s.num_computed += n
        s.append(1)
    batch, _ = sch.schedule()  # a needs a third block for its 5th token: b is preempted
    assert [s.request_id for s, _ in batch] == ["a"] and sch.num_preemptions == 1
    assert list(sch.waiting) == [b] and b.num_computed == 0 and b.block_table == []
    bm.check()


def test_a_sequence_the_cache_cannot_hold_is_finished_stuck():
    bm = BlockManager(2, 2)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a = seq(range(4))
    sch.add(a)
    batch, _ = sch.schedule()
    a.num_computed += 4
    a.append(1)
    batch, stuck = sch.schedule()
    assert batch == [] and stuck == [a]
