"""One engine decode step of the default model: packed weights, fused products, the decodes' dense KV copy.

    python bench/decode_step.py [--model smollm2-135m-instruct] [--batches 1,16] [--prompt-tokens 64]
                                [--steps 48] [--record] [--default-only]

For each batch size, five engines over the same weights (each its own module tree), each adding one thing to
the one before: unpacked (MKL's sgemm, `pack_weights=False`), every Linear packed on its own (oneDNN), packed
with q/k/v and gate/up fused, that with the decodes reading a dense copy of their keys and values
(`kv_cache.DenseDecode`) instead of gathering them from the paged cache, and that with the norms, SwiGLU and
the dense decode attention as fused C kernels (`models/kernels.py`): the default. The first three gather
(`dense_decode_mb=0`); only the last has `fused_kernels`. Their sequences are prefilled (prompts of --prompt-tokens from tinyshakespeare) and a
few steps into decoding; then the engines are stepped in turn, so background load hits them equally, and each
reports its median step (the contexts grow by one token a step). --default-only times the default engine
alone and prints one line per batch size, `BATCH MEDIAN_MS` (bench/serve.py's yardstick for the hour).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lmforge import checkpoint, store
from lmforge.engine.engine import EngineConfig, LLMEngine
from lmforge.engine.types import SamplingParams
from lmforge.models.gpt import build_model
from lmforge.models.layers import pack_linears

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CASES = (
    "unpacked",
    "packed, one by one",
    "packed, q/k/v and gate/up fused",
    "fused + dense KV copy",
    "+ C kernels",
)


def engine_for(ck, case: str, prompts: list[list[int]]) -> LLMEngine:
    model = build_model(ck.model.config, ck.model.state_dict())
    dense_mb = 256 if case in CASES[3:] else 0
    config = EngineConfig(
        kv_cache_mb=256,
        max_num_seqs=len(prompts),
        pack_weights=False,
        dense_decode_mb=dense_mb,
        fused_kernels=case == CASES[4],
    )
    engine = LLMEngine(model, config)
    if case != "unpacked":
        pack_linears(model, fuse=case in CASES[2:])
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while any(not r.seq.output_ids for r in engine.requests.values()):  # prefill
        engine.step()
    for _ in range(3):
        engine.step()
    return engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--default-only", action="store_true", help="time only the default engine")
    args = ap.parse_args()
    if args.default_only and args.record:
        ap.error("--record records the four engines; leave out --default-only")
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(store.resolve(args.model))  # a store name or a path, as the CLI takes it
    text = TEXT.read_text()
    load = os.getloadavg()[0]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [
            ck.tokenizer.encode(text[i * 3000 : i * 3000 + 8000])[: args.prompt_tokens] for i in range(batch)
        ]
        cases = CASES[-1:] if args.default_only else CASES
        engines = [engine_for(ck, case, prompts) for case in cases]
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(args.steps):
            for engine, out in zip(engines, times, strict=True):
                t = time.perf_counter()
                engine.step()
                out.append((time.perf_counter() - t) * 1e3)
        medians = [statistics.median(t) for t in times]
        del engines
        if args.default_only:
            print(batch, f"{medians[0]:.1f}", flush=True)
            continue
        rows.append(
            f"| {batch} | " + " | ".join(f"{m:.1f} ms ({medians[0] / m:.2f}x)" for m in medians) + " |"
        )
    if args.default_only:
        return
    table = [f"| batch | {' | '.join(CASES)} |", "|" + "---|" * (len(CASES) + 1), *rows]
    print("\n".join(table))
    if args.record:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        entry = [
            f"\n## decode_step.py — {datetime.date.today()} — {machine}",
            "",
            f"One decode step of {args.model} fp32 ({args.threads} threads), prompts of {args.prompt_tokens} "
            f"tokens, median of {args.steps} steps, the engines stepped in turn; load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at "
            "the end. Speed-up against unpacked in brackets.",
            "",
            *table,
        ]
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
