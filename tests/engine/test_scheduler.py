"""Scheduler driven by a fake model: token budget, chunked prefill, max_num_seqs, FCFS, preemption, abort."""

import pytest

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.scheduler import Scheduler, SchedulerOutput, SeqState, SeqStatus
from lmforge.errors import UserError


def fake_next_token(tokens: list[int]) -> int:
    # depends on the whole context, so a recomputed sequence must resume exactly where it was
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + len(tokens)) % 97


def check_batch(sched: Scheduler, out: SchedulerOutput) -> None:
    bm = sched.block_manager
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    ids = [s.request_id for s in out.scheduled]
    assert len(set(ids)) == len(ids)
    for s in out.scheduled:
        seq = sched.requests[s.request_id]
        assert s.num_new_tokens >= 1
        assert s.num_cached == seq.num_computed_tokens
        assert (
            len(s.block_table) * bm.block_size >= s.num_cached + s.num_new_tokens
        )  # what CacheBatch.build checks
        assert s.sample == (s.num_cached + s.num_new_tokens == seq.num_tokens)


def step(sched: Scheduler, max_tokens: int, finished: dict[str, list[int]] | None = None) -> SchedulerOutput:
    """One engine step with the fake model; finishes sequences that reach max_tokens."""
    out = sched.schedule()
    check_batch(sched, out)
    for s in out.scheduled:
        seq = sched.requests[s.request_id]
        sched.update(s.request_id, fake_next_token(seq.all_token_ids) if s.sample else None)
        if len(seq.output_ids) >= max_tokens:
            if finished is not None:
                finished[s.request_id] = list(seq.output_ids)
            sched.finish(s.request_id)
    return out


def run_all(sched: Scheduler, max_tokens: int, max_steps: int = 1000) -> dict[str, list[int]]:
    finished: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return finished
        step(sched, max_tokens, finished)
    raise AssertionError("requests did not finish")


def seq(rid: str, n: int, start: int = 1, salt: str = "") -> SeqState:
    return SeqState(rid, [(start + i) % 50 for i in range(n)], salt=salt)


def test_chunked_prefill_alone():
    sched = Scheduler(BlockManager(200, 16), max_num_seqs=8, max_num_batched_tokens=256)
    sched.add(seq("long", 1000))
    chunks, samples = [], []
    for _ in range(4):
        out = step(sched, max_tokens=5)
        chunks += out.num_new
        samples += [s.sample for s in out.scheduled]
    assert chunks == [256, 256, 256, 232]
    assert samples == [False, False, False, True]
    assert sched.requests["long"].output_ids == [fake_next_token(seq("x", 1000).prompt_ids)]


def test_chunked_prefill_while_decodes_continue():
    # two decodes take one token each, so a budget of 258 leaves 256 for the prompt's chunks
    sched = Scheduler(BlockManager(200, 16), max_num_seqs=8, max_num_batched_tokens=258)
    sched.add(seq("a", 10))
    sched.add(seq("b", 12, start=7))
    out = step(sched, max_tokens=100)
    assert out.num_new == [10, 12]
    sched.add(seq("long", 1000))
    for chunk in [256, 256, 256, 232]:
        out = step(sched, max_tokens=100)
        assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [
            ("a", 1),
            ("b", 1),
            ("long", chunk),
        ]
    assert len(sched.requests["a"].output_ids) == 5
    assert len(sched.requests["long"].output_ids) == 1
    out = step(sched, max_tokens=100)
    assert out.num_new == [1, 1, 1]


def test_token_budget_every_step_and_fcfs_admission():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    for rid in "abcde":
        sched.add(seq(rid, 4, start=ord(rid)))
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4), ("b", 4), ("c", 2)]
    assert [s.sample for s in out.scheduled] == [True, True, False]
    for s in out.scheduled:
        sched.update(s.request_id, 7 if s.sample else None)
    out = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 1),
        ("b", 1),
        ("c", 2),
        ("d", 4),
        ("e", 2),
    ]
    assert out.num_cached == [4, 4, 2, 0, 0]
    for s in out.scheduled:
        sched.update(s.request_id, 7 if s.sample else None)
    # everything else runs to completion under the budget (check_batch asserts it every step)
    assert sorted(run_all(sched, max_tokens=6)) == list("abcde")
    assert sched.block_manager.num_free_blocks == 100


def test_max_num_seqs():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abcd":
        sched.add(seq(rid, 5, start=ord(rid)))
    out = step(sched, max_tokens=3)
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c", "d"]
    sched.finish("a")
    out = step(sched, max_tokens=3)
    assert [s.request_id for s in out.scheduled] == ["b", "c"]
    assert sorted(run_all(sched, max_tokens=3)) == ["b", "c", "d"]


def test_preemption_recomputes_newest_and_everything_finishes():
    max_tokens = 10
    # reference: a cache big enough for everyone
    big = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "abc":
        big.add(seq(rid, 6, start=ord(rid)))
    expected = run_all(big, max_tokens)
    assert big.num_preemptions == 0

    # 8 blocks of 4 = 32 slots; each sequence grows to 16 tokens (4 blocks), so three cannot run together
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "abc":
        sched.add(seq(rid, 6, start=ord(rid)))
    finished: dict[str, list[int]] = {}
    first_preempted = None
    for _ in range(200):
        if not sched.has_unfinished:
            break
        out = step(sched, max_tokens, finished)
        if out.preempted and first_preempted is None:
            first_preempted = out.preempted
            assert out.preempted == ["c"]  # the newest
            assert sched.waiting[0].request_id == "c" and sched.waiting[0].status is SeqStatus.WAITING
            assert sched.waiting[0].num_computed_tokens == 0
            assert "c" not in bm
            assert "c" not in [s.request_id for s in out.scheduled]
    assert first_preempted is not None and sched.num_preemptions >= 1
    assert finished == expected  # recompute resumes exactly: same tokens as without preemption
    assert bm.num_free_blocks == 8 and not sched.running and not sched.waiting


def test_preempted_sequence_with_outputs_resumes_from_prefix_cache():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("a", 8, start=1))
    sched.add(seq("b", 8, start=20))
    finished: dict[str, list[int]] = {}
    for _ in range(100):
        if not sched.has_unfinished:
            break
        step(sched, 8, finished)
    assert sorted(finished) == ["a", "b"] and sched.num_preemptions >= 1
    assert bm.num_free_blocks == 6


def test_abort_frees_immediately():
    bm = BlockManager(20, 4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(seq("a", 10))
    sched.add(seq("b", 10))
    step(sched, max_tokens=100)
    assert bm.num_free_blocks == 17
    sched.abort("a")
    assert bm.num_free_blocks == 20 and "a" not in sched.requests
    sched.abort("b")  # still waiting
    assert not sched.waiting and not sched.has_unfinished
    sched.update("a", 3)  # a late update for an aborted request is ignored
    assert sched.schedule().scheduled == []


def test_prompt_larger_than_cache_is_a_user_error():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    with pytest.raises(UserError, match=r"17 tokens.*holds only 16"):
        sched.add(seq("a", 17))
    assert not sched.has_unfinished
    sched.add(seq("b", 16))  # exactly fits
    out = step(sched, max_tokens=100)
    assert out.num_new == [16] and out.scheduled[0].sample


def test_sequence_outgrowing_the_cache_finishes_instead_of_hanging():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("a", 14))
    outs = [step(sched, max_tokens=100) for _ in range(4)]
    # prefill 14 (+1 sampled = 15), decodes at 15 and 16 tokens, then 17 tokens cannot fit anywhere
    assert [o.num_new for o in outs[:3]] == [[14], [1], [1]]
    assert outs[3].out_of_cache == ["a"] and outs[3].scheduled == []
    assert not sched.has_unfinished and bm.num_free_blocks == 4


def test_prefix_cache_hit_skips_computed_tokens():
    bm = BlockManager(50, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("a", 13))
    step(sched, max_tokens=100)
    sched.add(seq("b", 13))  # same prompt, same salt
    sched.add(seq("c", 13, salt="other"))
    out = step(sched, max_tokens=100)
    by_id = {s.request_id: s for s in out.scheduled}
    assert (by_id["b"].num_cached, by_id["b"].num_new_tokens) == (12, 1)
    assert by_id["b"].block_table[:3] == bm.block_table("a")[:3]
    assert (by_id["c"].num_cached, by_id["c"].num_new_tokens) == (0, 13)


def test_prompts_arriving_together_compute_their_shared_prefix_once():
    """A shared system prompt in a burst: the first computes it, the others wait one step and hit the cache
    (instead of each computing the same keys); a different prefix or another tenant's is not held back."""
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    system = [(7 + i) % 50 for i in range(20)]  # five full blocks
    for rid, question in (("a", [1, 2, 3]), ("b", [4, 5, 6]), ("c", [8, 9])):
        sched.add(SeqState(rid, system + question))
    out = step(sched, max_tokens=100)
    assert [(s.request_id, s.num_cached, s.num_new_tokens) for s in out.scheduled] == [("a", 0, 23)]
    out = step(sched, max_tokens=100)
    assert [(s.request_id, s.num_cached, s.num_new_tokens) for s in out.scheduled] == [
        ("a", 23, 1), ("b", 20, 3), ("c", 20, 2)]  # fmt: skip
    assert bm.block_table("b")[:5] == bm.block_table("c")[:5] == bm.block_table("a")[:5]
    # another tenant's copy of the same prompt is not in flight for it: it computes its own at once
    sched.add(SeqState("d", system + [1, 2], salt="other"))
    assert [(s.request_id, s.num_cached) for s in step(sched, max_tokens=100).scheduled][-1] == ("d", 0)


def test_a_prefix_whose_computing_sequence_leaves_is_computed_by_the_next():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)  # the 20-token prefix takes two steps
    system = [(7 + i) % 50 for i in range(20)]
    sched.add(SeqState("a", system + [1]))
    sched.add(SeqState("b", system + [2]))
    assert [s.request_id for s in step(sched, max_tokens=100).scheduled] == ["a"]
    sched.abort("a")  # its first 16 tokens are cached; the rest of the prefix is nobody's now
    out = step(sched, max_tokens=100)
    assert [(s.request_id, s.num_cached, s.num_new_tokens) for s in out.scheduled] == [("b", 16, 5)]
    assert run_all(sched, max_tokens=3).keys() == {"b"}
