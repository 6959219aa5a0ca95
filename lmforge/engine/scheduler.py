"""Token-budget FCFS scheduling (vLLM v1's model): each step hands every scheduled sequence a number of tokens.

Prefill, chunked prefill, decode and recompute after preemption are one code path: a sequence has
`num_tokens` known tokens (prompt + sampled output) of which `num_computed_tokens` have KV in the cache, and a
step computes the next `min(num_tokens - num_computed_tokens, budget left)` of them. When that reaches all known
tokens the step's last logits are sampled from (`ScheduledSeq.sample`).

Per step: running sequences first, oldest first; then waiting ones are admitted while the token budget,
`max_num_seqs` and free blocks allow. When the cache is full the newest running sequence is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later (prefix caching usually makes that
cheap). The loop around it is `schedule -> run model -> sample -> update`.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from lmforge.engine.block_manager import BlockManager
from lmforge.errors import UserError


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqState:
    request_id: str
    prompt_ids: list[int]
    salt: str = ""  # tenant: prefix-cache blocks are shared only between equal salts
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = -1  # set by Scheduler.add
    num_scheduled: int = 0  # tokens handed out in the current step, consumed by update()
    all_token_ids: list[int] = field(init=False)  # prompt + output, kept to avoid concatenating every step

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_ids) + list(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    block_table: list[int]
    num_cached: int  # tokens with KV in the cache before this step (num_computed_tokens)
    num_new_tokens: int
    sample: bool  # this step computes the sequence's last known token: sample the next one from its logits


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # in batch order
    preempted: list[str] = field(default_factory=list)  # went back to waiting this step
    out_of_cache: list[str] = field(default_factory=list)  # finished: the sequence outgrew the whole cache

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    # the three per-sequence lists `CacheBatch.build(block_tables, num_cached, num_new, block_size)` takes
    @property
    def block_tables(self) -> list[list[int]]:
        return [s.block_table for s in self.scheduled]

    @property
    def num_cached(self) -> list[int]:
        return [s.num_cached for s in self.scheduled]

    @property
    def num_new(self) -> list[int]:
        return [s.num_new_tokens for s in self.scheduled]


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        long_prefill_token_threshold: int = 0,
    ):
        """`long_prefill_token_threshold` > 0 caps one sequence's chunk per step, so a long prompt that is
        older than some decodes cannot take the whole budget and stall them."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []  # oldest admission first
        self.requests: dict[str, SeqState] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add(self, seq: SeqState) -> None:
        """Queue a request. A prompt the whole cache cannot hold raises UserError: it would wait forever."""
        if seq.request_id in self.requests:
            raise ValueError(f"request {seq.request_id!r} is already scheduled")
        if not seq.prompt_ids:
            raise UserError("the prompt must contain at least one token")
        bm = self.block_manager
        if seq.num_tokens > bm.capacity_tokens:
            raise UserError(
                f"the prompt has {seq.num_tokens} tokens but the KV cache holds only {bm.capacity_tokens} "
                f"({bm.num_blocks} blocks of {bm.block_size}); shorten the prompt or give the cache more memory"
            )
        seq.arrival = next(self._arrivals)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens > bm.capacity_tokens:  # cannot grow any further, even alone
                self._drop(seq)
                out.out_of_cache.append(seq.request_id)
                continue
            num_new = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:  # nothing to compute (the engine has not called update yet)
                i += 1
                continue
            while not bm.append_slots(seq.request_id, num_new):
                victim = self.running.pop()  # newest; it sits after seq, so it was not scheduled this step
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                self._emit(out, seq, num_new)
                budget -= num_new
                i += 1

        # admitting while we preempt would only thrash the cache
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hashes = bm.prompt_hashes(seq.all_token_ids, seq.salt)
            if bm.prefix_in_flight(hashes):
                break  # its prefix is being computed this step: next step it is a cache hit (FCFS: all wait)
            max_new = self._chunk(seq.num_tokens, budget)
            num_cached = bm.allocate(seq.request_id, seq.all_token_ids, seq.salt, max_new, hashes)
            if num_cached is None:
                break  # FCFS: later requests do not overtake the head of the queue
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.num_computed_tokens = num_cached
            self.running.append(seq)
            num_new = self._chunk(seq.num_tokens - num_cached, budget)
            self._emit(out, seq, num_new)
            budget -= num_new
        return out

    def update(self, request_id: str, new_token_id: int | None) -> None:
        """After the step: the scheduled tokens are computed; append the sampled token (None when the step
        did not complete the sequence's known tokens)."""
        seq = self.requests.get(request_id)
        if seq is None or seq.status is not SeqStatus.RUNNING:  # aborted meanwhile
            return
        seq.num_computed_tokens += seq.num_scheduled
        seq.num_scheduled = 0
        if new_token_id is not None:
            seq.output_ids.append(new_token_id)
            seq.all_token_ids.append(new_token_id)
        # Only tokens whose KV is written: a chunked prompt's later tokens may already have slots but no KV yet,
        # and a block hashed early would hand uncomputed keys to the next request with the same prefix.
        self.block_manager.commit_full_blocks(request_id, seq.all_token_ids[: seq.num_computed_tokens])

    def finish(self, request_id: str) -> None:
        """Done (stop token, max_tokens): free its blocks now."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._drop(seq)

    abort = finish  # same bookkeeping whether the client left or the request ended

    # -- helpers ---------------------------------------------------------------------------------------------

    def _chunk(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.long_prefill_token_threshold > 0:
            n = min(n, self.long_prefill_token_threshold)
        return n

    def _emit(self, out: SchedulerOutput, seq: SeqState, num_new: int) -> None:
        seq.num_scheduled = num_new
        done = seq.num_computed_tokens + num_new == seq.num_tokens
        table = self.block_manager.block_table(seq.request_id)
        out.scheduled.append(ScheduledSeq(seq.request_id, table, seq.num_computed_tokens, num_new, done))

    def _preempt(self, seq: SeqState) -> None:
        self.block_manager.free(seq.request_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_scheduled = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _drop(self, seq: SeqState) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.request_id)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        del self.requests[seq.request_id]
