"""Who owns which KV-cache block: allocation, ref counts, prefix caching and LRU eviction (vLLM v1's design).

A sequence's block table maps its token t to block `table[t // block_size]` (see `lmforge.models.kv_cache`).
The manager sees block ids and token ids only, never cache tensors.

Prefix caching: once a block is full of tokens whose KV has been written, it is registered under a hash of
(parent block's hash, its token ids, salt). The chain makes a hash name the whole prefix up to that block, and the
salt (the tenant) keeps caches from being shared across tenants. A later sequence whose leading full blocks hash
the same reuses those blocks instead of recomputing them. Freed blocks keep their hash and sit in an LRU free
queue: still reusable until a fresh allocation evicts them, oldest first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


def block_hash(parent: bytes | None, token_ids: tuple[int, ...], salt: str) -> bytes:
    # sha256, not hash(): int and tuple hashes are deterministic and easy to collide on purpose, and a collision
    # would hand one tenant another's KV. repr() of the tuple is an unambiguous encoding.
    return hashlib.sha256(repr((parent, token_ids, salt)).encode()).digest()


@dataclass
class _SeqBlocks:
    salt: str
    table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens that have a slot
    hashes: list[bytes] = field(
        default_factory=list
    )  # hash of table[i] for its leading full, committed blocks
    computing: list[bytes] = field(default_factory=list)  # its prompt's uncached full blocks, until committed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks  # the hash block b is registered under, if any
        self._cached: dict[bytes, int] = {}  # hash -> block id
        # hash -> the sequence whose prompt is computing that block now: another prompt with the same prefix
        # waits for it (`prefix_in_flight`) instead of computing the same keys a second time
        self._computing: dict[bytes, str] = {}
        # blocks with ref count 0, evicted from the front; OrderedDict gives O(1) removal from the middle when
        # a prefix hit revives a free cached block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._seqs: dict[str, _SeqBlocks] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached

    # -- queries ---------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._seqs[seq_id].table)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ------------------------------------------------------------------------------------------

    def allocate(
        self,
        seq_id: str,
        token_ids: list[int],
        salt: str = "",
        max_new_tokens: int | None = None,
        hashes: list[bytes] | None = None,
    ) -> int | None:
        """Give a new sequence its blocks: reuse every leading cached full block of `token_ids`, then allocate
        slots for up to `max_new_tokens` more of them (all by default; the scheduler passes its token budget so a
        chunked prompt holds only what it computes). Returns the number of cached tokens, or None (changing
        nothing) when there are not enough free blocks."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        bs = self.block_size
        hits: list[tuple[int, bytes]] = []
        uncached: list[bytes] = []
        if self.enable_prefix_caching:
            for h in self.prompt_hashes(token_ids, salt) if hashes is None else hashes:
                block = None if uncached else self._cached.get(h)
                if block is None:
                    uncached.append(h)
                else:
                    hits.append((block, h))
        num_cached = len(hits) * bs
        remaining = len(token_ids) - num_cached
        num_new = remaining if max_new_tokens is None else min(remaining, max_new_tokens)
        need = self._blocks_for(num_cached + num_new) - len(hits)
        revived = sum(1 for b, _ in hits if self._ref_cnt[b] == 0)  # free cached blocks we would take
        if need > len(self._free) - revived:
            return None

        seq = self._seqs[seq_id] = _SeqBlocks(salt)
        for block, h in hits:
            if self._ref_cnt[block] == 0:
                del self._free[block]
            self._ref_cnt[block] += 1
            seq.table.append(block)
            seq.hashes.append(h)
        seq.table.extend(self._pop_free() for _ in range(need))
        seq.num_tokens = num_cached + num_new
        for h in uncached:
            if h not in self._computing:
                self._computing[h] = seq_id
                seq.computing.append(h)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += num_cached
        return num_cached

    def prompt_hashes(self, token_ids: list[int], salt: str = "") -> list[bytes]:
        """The hash chain of a prompt's full blocks (none without prefix caching), within its first len-1 tokens:
        the last token is always computed so there are logits to sample from, and its block is then fresh rather
        than a shared one being written to. The scheduler computes it once for `prefix_in_flight` and
        `allocate`."""
        if not self.enable_prefix_caching:
            return []
        bs, parent, chain = self.block_size, None, []
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, tuple(token_ids[i * bs : (i + 1) * bs]), salt)
            chain.append(parent)
        return chain

    def prefix_in_flight(self, hashes: list[bytes]) -> bool:
        """The first block of this prompt (`prompt_hashes`) that is not cached is being computed right now by
        another sequence's prompt (requests with a shared system prompt arriving together): admitting it now
        would compute the same keys twice, where waiting for that sequence's step gets them from the cache."""
        for h in hashes:
            if h not in self._cached:
                return h in self._computing
        return False

    def append_slots(self, seq_id: str, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of a sequence; False (changing nothing) when the free
        blocks do not suffice, and the scheduler preempts someone."""
        seq = self._seqs[seq_id]
        need = self._blocks_for(seq.num_tokens + num_new_tokens) - len(seq.table)
        if need > len(self._free):
            return False
        seq.table.extend(self._pop_free() for _ in range(need))
        seq.num_tokens += num_new_tokens
        return True

    def commit_full_blocks(self, seq_id: str, token_ids: list[int]) -> None:
        """Register the hashes of the sequence's blocks that are now full of tokens whose KV is written.
        `token_ids` are the sequence's tokens (prompt then output); only those with a slot are considered, so the
        caller may pass a just-sampled token whose KV is not written yet."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        bs = self.block_size
        num_full = min(len(token_ids), seq.num_tokens) // bs
        for i in range(len(seq.hashes), num_full):
            parent = seq.hashes[-1] if seq.hashes else None
            h = block_hash(parent, tuple(token_ids[i * bs : (i + 1) * bs]), seq.salt)
            seq.hashes.append(h)
            block = seq.table[i]
            # another block may already hold this content (e.g. the recomputed last block of a fully cached
            # prompt); keep the first, leave this one unhashed
            if h not in self._cached and self._hash[block] is None:
                self._cached[h] = block
                self._hash[block] = h
            if self._computing.get(h) == seq_id:
                del self._computing[h]

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks. Blocks nobody else holds go to the free queue, keeping their hash."""
        seq = self._seqs.pop(seq_id)
        for h in seq.computing:
            if self._computing.get(h) == seq_id:
                del self._computing[h]
        # reversed: a sequence's tail blocks are the least likely to be shared, so they are evicted first
        for block in reversed(seq.table):
            self._ref_cnt[block] -= 1
            if self._ref_cnt[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)  # holds nothing reusable: hand it out first

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash[block]
        if h is not None:  # evict: the content is about to be overwritten
            del self._cached[h]
            self._hash[block] = None
        self._ref_cnt[block] = 1
        return block
