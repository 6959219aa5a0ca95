"""The batched engine against its slow twin (single-sequence generation): same tokens, whatever the batch,
chunking, preemption or prefix caching."""

import asyncio
import contextlib
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.engine import AsyncEngine, EngineConfig, EngineDraining, EngineOverloaded, LLMEngine
from lmforge.engine.generate import generate
from lmforge.engine.types import SamplingParams
from lmforge.errors import UserError
from lmforge.models.gpt import build_model
from tests.engine.conftest import random_prompts


def alone(model, prompt, params):
    return [t.id for t in generate(model, prompt, params)]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(kv_cache_mb=4),
        EngineConfig(kv_cache_mb=4, max_num_batched_tokens=16),  # chunked prefill alongside decodes
        EngineConfig(kv_cache_mb=4, max_num_seqs=3),  # queueing
        EngineConfig(kv_cache_mb=0.05, block_size=4),  # 400 slots for ~1,100 tokens: preemption
        # the same with the decodes' dense copy roomy (preempted sequences come back and are copied in again),
        # and with no copy at all (every step gathers from the paged cache)
        EngineConfig(kv_cache_mb=0.05, block_size=4, dense_decode_mb=4),
        EngineConfig(kv_cache_mb=4, dense_decode_mb=0),
    ],
    ids=["plain", "chunked", "few-seqs", "preempting", "preempting-dense", "gather"],
)
def test_batched_greedy_equals_alone(tiny, config):
    prompts = random_prompts(12, seed=1)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine = LLMEngine(tiny, config)
    outs = engine.generate(prompts, params)
    assert outs == [alone(tiny, p, params) for p in prompts]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if config.kv_cache_mb < 0.1:
        assert engine.scheduler.num_preemptions > 0


def test_a_reused_request_id_never_attends_the_finished_requests_dense_row(tiny):
    """X finishes and a new X starts at once, its prompt prefix-cached but for its last token (so its first step
    is a one-token decode) and one token longer than the old X's context: it must not be taken for the old X
    decoding on (its row in the decodes' dense copy is keyed by request, not by id)."""
    rng = random.Random(3)
    old_x, shared, companion = ([rng.randrange(97) for _ in range(n)] for n in (4, 12, 6))
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    engine = LLMEngine(tiny, EngineConfig(kv_cache_mb=4, block_size=4))
    engine.generate([shared], greedy(1))  # its first 8 tokens become cached blocks
    engine.add_request("B", companion, greedy(40))  # so that steps decode two or more sequences
    engine.add_request("X", old_x, greedy(5))
    new_x, got, reused = shared[:8] + [5], [], False
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id == "X" and reused:
                got += out.new_token_ids
            elif out.request_id == "X" and out.finished:
                engine.add_request("X", new_x, greedy(6))
                reused = True
    assert reused and got == alone(tiny, new_x, greedy(6))


@pytest.mark.parametrize("dense_decode_mb", [0, None], ids=["gather", "dense"])
def test_bf16_batched_decode_equals_alone(tiny, dense_decode_mb):
    """The batched decode paths in bfloat16 (the padding bias in the model's dtype)."""
    model = build_model(tiny.config, tiny.state_dict(), dtype=torch.bfloat16).eval()
    prompts = random_prompts(4, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    config = EngineConfig(kv_cache_mb=4, pack_weights=False, dense_decode_mb=dense_decode_mb)
    assert LLMEngine(model, config).generate(prompts, params) == [alone(model, p, params) for p in prompts]


def test_seeded_sampling_in_batch_equals_alone(tiny):
    prompts = random_prompts(6, seed=2)
    params = [
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True)
        for i in range(6)
    ]
    engine = LLMEngine(tiny, EngineConfig(kv_cache_mb=4))
    assert engine.generate(prompts, params) == [
        alone(tiny, p, sp) for p, sp in zip(prompts, params, strict=True)
    ]


def test_prefix_cache_hits_within_a_salt_only(tiny):
    engine = LLMEngine(tiny, EngineConfig(kv_cache_mb=4, block_size=4))
    prompt = random_prompts(1, seed=3, lo=40, hi=40)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def run(rid, salt):
        engine.add_request(rid, prompt, params, salt=salt)
        outs = []
        while engine.has_unfinished:
            outs += engine.step()
        return [t for o in outs for t in o.new_token_ids], outs[-1]

    first, out1 = run("a", "tenant-1")
    again, out2 = run("b", "tenant-1")
    other, out3 = run("c", "tenant-2")
    assert first == again == other == alone(tiny, prompt, params)
    assert out1.num_cached_tokens == 0 and out3.num_cached_tokens == 0
    assert out2.num_cached_tokens == 36  # nine full 4-token blocks; the last block is recomputed


def test_stop_tokens_and_lengths(tiny):
    prompt = random_prompts(1, seed=4)[0]
    free_run = alone(tiny, prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    engine = LLMEngine(tiny, EngineConfig(kv_cache_mb=4), eos_ids=frozenset({free_run[3]}))
    engine.add_request("r", prompt, SamplingParams(max_tokens=10, temperature=0))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    cut = free_run.index(free_run[3]) + 1
    assert [t for o in outs for t in o.new_token_ids] == free_run[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and outs[-1].num_output_tokens == cut
    engine.add_request("s", prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 5


def test_requests_that_can_never_run_are_user_errors(tiny):
    engine = LLMEngine(tiny, EngineConfig(kv_cache_mb=0.01, block_size=4))
    with pytest.raises(UserError, match="context is 256 tokens"):
        engine.add_request("a", [1] * 300, SamplingParams())
    with pytest.raises(UserError, match="KV cache holds"):
        engine.add_request("b", [1] * 200, SamplingParams())
    assert not engine.has_unfinished


async def until(condition, timeout=2.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_async_engine_runs_calls_on_its_thread_between_steps(tiny):
    """EngineClient.run: the function runs on the engine's own thread (one OpenMP team per process), between
    the steps of a request that keeps generating unchanged; its exception comes back; after shutdown: 503."""

    async def main():
        engine = AsyncEngine(LLMEngine(tiny, EngineConfig(kv_cache_mb=4)), "tiny")
        with pytest.raises(EngineDraining):
            await engine.run(threading.current_thread)  # not started
        engine.start()
        thread = await engine.run(threading.current_thread)  # idle engine
        assert thread.name == "lmforge-engine"
        if sys.platform == "linux":  # named in the OS too, so `top -H` and the benchmarks tell it apart
            assert Path(f"/proc/self/task/{thread.native_id}/comm").read_text() == "lmforge-engine\n"
        prompt = random_prompts(1, seed=3)[0]
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        steps_seen = []

        async def calls():
            for _ in range(5):
                steps_seen.append(await engine.run(lambda: engine.engine.stats().num_running))

        tokens, _ = await asyncio.gather(collect(engine.generate(prompt, params, "r1")), calls())
        assert tokens == alone(tiny, prompt, params)
        assert 1 in steps_seen  # some calls ran while the request was in the batch
        with pytest.raises(ZeroDivisionError):
            await engine.run(lambda: 1 / 0)
        assert await engine.run(lambda: 7) == 7  # the engine thread lives on
        await engine.shutdown(drain_timeout=1)
        with pytest.raises(EngineDraining):
            await engine.run(lambda: 7)

    asyncio.run(main())


async def collect(stream):
    return [t async for out in stream for t in out.new_token_ids]


def test_async_engine_streams_aborts_and_refuses(tiny):
    async def main():
        engine = AsyncEngine(
            LLMEngine(tiny, EngineConfig(kv_cache_mb=4, max_num_seqs=1)), "tiny", max_waiting=0
        )
        engine.start()
        prompt = random_prompts(1, seed=5)[0]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        tokens = [
            t for out in [o async for o in engine.generate(prompt, params, "r1")] for t in out.new_token_ids
        ]
        assert tokens == alone(tiny, prompt, params)

        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        stream = engine.generate(prompt, long, "r2")
        await stream.__anext__()
        await until(lambda: engine.health().num_running == 1)
        with pytest.raises(EngineOverloaded):  # one sequence at a time and no waiting room
            await engine.generate(prompt, long, "r3").__anext__()
        await stream.aclose()  # the client leaves: the sequence is freed within a step
        await until(lambda: engine.health().num_running == 0)
        assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks
        await engine.shutdown(drain_timeout=1)
        with pytest.raises(EngineDraining):
            await engine.generate(prompt, params, "r4").__anext__()

    asyncio.run(main())


def test_default_model_batched_equals_alone(smollm2):
    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
                 "Who wrote Hamlet?", "What is 12 times 7?", "Describe a cat.", "What is Python?", "Tell me a joke."]  # fmt: skip
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions]  # fmt: skip
    params = SamplingParams(max_tokens=32, temperature=0)
    engine = LLMEngine(smollm2.model, EngineConfig(kv_cache_mb=256), eos_ids=smollm2.eos_ids)
    batched = engine.generate(prompts, params)
    singles = [[t.id for t in generate(smollm2.model, p, params, eos_ids=smollm2.eos_ids)] for p in prompts]
    assert batched == singles


def test_async_engine_gathers_a_burst_into_one_first_step(tiny):
    """Coming out of idle with batch_wait_s, requests arriving a few ms apart share the first step."""

    async def main(batch_wait_s):
        llm = LLMEngine(tiny, EngineConfig(kv_cache_mb=4))
        seen = []  # requests in the engine at each step
        step = llm.step
        llm.step = lambda: (seen.append(len(llm.requests)), step())[1]
        engine = AsyncEngine(llm, "tiny", batch_wait_s=batch_wait_s)
        engine.start()
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

        async def one(i):
            await asyncio.sleep(
                0.005 * i
            )  # a burst spread over 15 ms, as HTTP parsing and metering spread it
            return [o async for o in engine.generate(random_prompts(1, seed=i)[0], params, f"r{i}")]

        outs = await asyncio.gather(*(one(i) for i in range(4)))
        await engine.shutdown(drain_timeout=1)
        assert all(out[-1].finished for out in outs)
        return seen

    # gathered: gaps of 5 ms, well under the 0.25 s quiet gap (so a stalled test machine does not split the burst)
    assert asyncio.run(main(0.25))[0] == 4


def test_async_engine_gather_waits_for_requests_on_their_way(tiny):
    """Coming out of idle, the gather also waits for a request the server is still preparing (`arriving()`: its
    prompt rendered, its admit in the ledger's queue) though it comes later than the quiet gap; at most 10x the
    gap, so a slow admit never holds the others for long."""

    async def main(hold_s, announced):
        llm = LLMEngine(tiny, EngineConfig(kv_cache_mb=4))
        seen = []  # requests in the engine at each step
        step = llm.step
        llm.step = lambda: (seen.append(len(llm.requests)), step())[1]
        engine = AsyncEngine(llm, "tiny", batch_wait_s=0.1)  # quiet gap 0.1 s, gathering 1 s at most
        engine.start()
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        done = {}

        async def one(i):
            outs = [o async for o in engine.generate(random_prompts(1, seed=i)[0], params, f"r{i}")]
            done[i] = time.monotonic()
            return outs

        async def first():
            await asyncio.sleep(0.05)  # the second is on its way by then
            return await one(0)

        async def second():
            with engine.arriving() if announced else contextlib.nullcontext():
                await asyncio.sleep(hold_s)  # a slow admit
            sent = time.monotonic()
            return sent, await one(1)

        outs, (sent, _) = await asyncio.gather(first(), second())
        await engine.shutdown(drain_timeout=1)
        assert outs[-1].finished
        return seen, done[0] < sent

    assert asyncio.run(main(0.4, announced=True)) == ([2], False)  # waited for it: one step for both
    assert asyncio.run(main(0.4, announced=False))[0] == [1, 1]  # unannounced, it came after the quiet gap
    # the 1 s bound: the first stepped (and finished) before the second was sent
    assert asyncio.run(main(2.0, announced=True)) == ([1, 1], True)


def test_async_engine_reports_when_its_running_step_should_end(tiny):
    """health() tells the server when the running step began and how long a step takes, the shorter of the last
    two (a guess that errs short: the ledger times its batched admits by it): next_step_in counts down within a
    step, and is 0 between steps."""

    async def main():
        llm = LLMEngine(tiny, EngineConfig(kv_cache_mb=4, max_num_seqs=1))
        real_step = llm.step
        lengths = iter([0.6, 0.3] * 10)  # steps of 0.6 s and 0.3 s in turn

        def slow_step():
            time.sleep(next(lengths))
            return real_step()

        llm.step = slow_step
        engine = AsyncEngine(llm, "tiny")
        engine.start()
        assert engine.health().step_started is None and engine.health().next_step_in(time.monotonic()) == 0.0
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        stream = engine.generate(random_prompts(1, seed=3)[0], params, "r1")
        for _ in range(3):  # three steps have run (0.6, 0.3, 0.6 s): the next one is under way
            await stream.__anext__()
        await until(lambda: engine.health().step_started is not None)
        stats = engine.health()
        assert 0.3 <= stats.step_s < 0.59  # the shorter of the last two
        assert stats.step_started <= time.monotonic()
        started, step_s = stats.step_started, stats.step_s
        assert stats.next_step_in(started) == pytest.approx(step_s)  # counts down from step_s
        assert stats.next_step_in(started + step_s / 3) == pytest.approx(2 * step_s / 3)
        assert stats.next_step_in(started + step_s + 0.01) == 0.0  # overdue: no wait
        await collect(stream)
        await until(lambda: engine.health().step_started is None)
        assert engine.health().next_step_in(time.monotonic()) == 0.0
        await engine.shutdown(drain_timeout=1)

    asyncio.run(main())
