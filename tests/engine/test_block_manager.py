"""Block manager: accounting, prefix sharing, salts, LRU eviction, and a random-operations state machine."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmforge.engine.block_manager import BlockManager

BS = 4


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert bm.allocate("a", prompt(9)) == 0  # 3 blocks
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 7
    assert bm.append_slots("a", 3)  # 12 tokens: still 3 blocks
    assert len(bm.block_table("a")) == 3
    assert bm.append_slots("a", 1)  # 13 tokens: a 4th block
    assert len(bm.block_table("a")) == 4 and bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(0.4)
    assert bm.allocate("b", prompt(24, 100)) == 0  # 6 blocks: the cache is now full
    assert bm.num_free_blocks == 0
    assert not bm.append_slots("a", 4)  # needs a 5th block
    assert len(bm.block_table("a")) == 4  # a failed append changes nothing
    assert bm.allocate("c", prompt(1, 500)) is None
    assert "c" not in bm
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 10 and bm.usage == 0.0


def test_allocate_max_new_tokens_holds_only_the_chunk():
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert bm.allocate("a", prompt(30), max_new_tokens=5) == 0
    assert len(bm.block_table("a")) == 2
    assert bm.append_slots("a", 5)  # 10 tokens
    assert len(bm.block_table("a")) == 3


def test_shared_prefix_blocks():
    bm = BlockManager(num_blocks=20, block_size=BS)
    shared = prompt(3 * BS)
    a = shared + [900, 901]
    assert bm.allocate("a", a) == 0
    bm.commit_full_blocks("a", a)
    b = shared + [700, 701, 702, 703, 704]
    assert bm.allocate("b", b) == 3 * BS
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert bm.block_table("b")[3] != bm.block_table("a")[3]  # a's partial last block is not shared
    assert bm.num_free_blocks == 20 - 4 - 2
    assert bm.prefix_cache_queries == len(a) + len(b)
    assert bm.prefix_cache_hits == 3 * BS
    bm.free("a")
    assert bm.num_free_blocks == 20 - 5  # shared blocks are still held by b
    bm.free("b")
    assert bm.num_free_blocks == 20


def test_different_salt_never_shares():
    bm = BlockManager(num_blocks=20, block_size=BS)
    p = prompt(3 * BS + 1)
    bm.allocate("a", p, salt="tenant-1")
    bm.commit_full_blocks("a", p)
    assert bm.allocate("b", p, salt="tenant-2") == 0
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    assert bm.allocate("c", p, salt="tenant-1") == 3 * BS


def test_partial_block_never_shared():
    bm = BlockManager(num_blocks=20, block_size=BS)
    p = prompt(BS + 2)  # one full block and a partial one
    bm.allocate("a", p)
    bm.commit_full_blocks("a", p)  # only the full block is registered
    assert bm.allocate("b", p + [55]) == BS
    assert bm.block_table("b")[1] != bm.block_table("a")[1]
    # committing before the KV exists is ignored: only tokens with a slot count
    bm.allocate("c", prompt(2 * BS, 300), max_new_tokens=BS + 1)
    bm.commit_full_blocks("c", prompt(2 * BS, 300))
    assert bm.allocate("d", prompt(2 * BS, 300) + [1]) == BS


def test_whole_prompt_cached_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=20, block_size=BS)
    p = prompt(3 * BS)
    bm.allocate("a", p)
    bm.commit_full_blocks("a", p)
    bm.free("a")
    # every block is cached, but the last one is recomputed (into a fresh block) so there are logits to sample
    assert bm.allocate("b", p) == 2 * BS
    assert len(bm.block_table("b")) == 3
    bm.commit_full_blocks("b", p)  # the duplicate content keeps the first block registered
    bm.free("b")
    assert bm.allocate("c", p + [1]) == 3 * BS
    assert bm.num_free_blocks == 20 - 4


def test_lru_eviction_oldest_cached_block_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    p1, p2 = prompt(BS + 1), prompt(BS + 1, 100)
    bm.allocate("a", p1)
    bm.commit_full_blocks("a", p1)
    a_block = bm.block_table("a")[0]
    bm.free("a")
    bm.allocate("b", p2)
    bm.commit_full_blocks("b", p2)
    b_block = bm.block_table("b")[0]
    bm.free("b")
    # free queue: the two unhashed partial blocks first, then a's cached block (older), then b's
    bm.allocate("c", prompt(3 * BS, 500))
    assert a_block in bm.block_table("c") and b_block not in bm.block_table("c")
    bm.free("c")
    assert bm.allocate("a2", p1) == 0  # a's hash was dropped on eviction
    bm.free("a2")
    assert bm.allocate("b2", p2) == BS  # b's block survived
    assert bm.block_table("b2")[0] == b_block


def test_free_cached_block_is_revived_without_counting_twice():
    bm = BlockManager(num_blocks=3, block_size=BS)
    p = prompt(2 * BS + 1)
    bm.allocate("a", p)
    bm.commit_full_blocks("a", p)
    bm.free("a")
    # 2 cached free blocks are revived, 1 fresh block needed; all 3 are free
    assert bm.allocate("b", p) == 2 * BS
    assert bm.num_free_blocks == 0


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    p = prompt(3 * BS)
    bm.allocate("a", p)
    bm.commit_full_blocks("a", p)
    assert bm.allocate("b", p) == 0
    assert bm.prefix_cache_queries == 0


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/append/commit/free over a tiny vocabulary so prefixes collide often. The model keeps each
    sequence's tokens; every sequence's slotted tokens count as computed."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=2)
        self.tokens: dict[str, list[int]] = {}
        self.salts: dict[str, str] = {}
        self.next_id = 0

    @rule(
        toks=st.lists(st.integers(0, 1), min_size=1, max_size=12),
        salt=st.sampled_from(["x", "y"]),
        chunk=st.none() | st.integers(1, 12),
    )
    def allocate(self, toks, salt, chunk):
        sid = f"s{self.next_id}"
        self.next_id += 1
        free_before = self.bm.num_free_blocks
        cached = self.bm.allocate(sid, toks, salt, max_new_tokens=chunk)
        if cached is None:
            assert sid not in self.bm and self.bm.num_free_blocks == free_before
            return
        assert 0 <= cached < len(toks) and cached % 2 == 0
        n = len(toks) - cached if chunk is None else min(len(toks) - cached, chunk)
        self.tokens[sid] = toks[: cached + n]
        self.salts[sid] = salt

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 5))
    def append(self, data, n):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        table = self.bm.block_table(sid)
        if self.bm.append_slots(sid, n):
            self.tokens[sid] += data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
        else:
            assert self.bm.block_table(sid) == table

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.commit_full_blocks(sid, self.tokens[sid])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(sid)
        del self.tokens[sid], self.salts[sid]

    @invariant()
    def consistent(self):
        bm = self.bm
        tables = {sid: bm.block_table(sid) for sid in self.tokens}
        holders: dict[int, list[tuple[str, int]]] = {}
        for sid, table in tables.items():
            assert len(table) == -(-len(self.tokens[sid]) // 2)
            assert len(set(table)) == len(table)
            for i, b in enumerate(table):
                holders.setdefault(b, []).append((sid, i))
        for b, hs in holders.items():
            assert bm._ref_cnt[b] == len(hs)
            # a block is shared only at the same position, by sequences with the same salt and the same tokens
            # up to and including that (full) block
            (s0, i0), rest = hs[0], hs[1:]
            for sid, i in rest:
                assert i == i0 and self.salts[sid] == self.salts[s0]
                end = 2 * (i + 1)
                assert len(self.tokens[sid]) >= end and self.tokens[sid][:end] == self.tokens[s0][:end]
        assert bm.num_free_blocks == bm.num_blocks - len(holders)
        assert set(bm._free).isdisjoint(holders)

    def teardown(self):
        for sid in list(self.tokens):
            self.bm.free(sid)
        assert self.bm.num_free_blocks == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
