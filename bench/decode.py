"""Batch-1 prefill and decode speed of the default model: lmforge vs transformers, same weights, one run.

    python bench/decode.py [--runs 5] [--prompt-tokens 256] [--new-tokens 128] [--no-record]

Both load SmolLM2-135M-Instruct from the same GGUF (transformers dequantises it to fp32 too). Prefill is
the time to the first token of a 256-token prompt; decode is the next 127 tokens. Medians of --runs.
Appends a dated entry to bench/RESULTS.md unless --no-record.
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
from lmforge.engine.generate import generate
from lmforge.engine.types import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def time_lmforge(ck, prompt_ids, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    it = generate(ck.model, prompt_ids, params)
    first = next(it)
    t1 = time.perf_counter()
    ids = [first.id] + [t.id for t in it]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, ids


def time_transformers(model, prompt_ids, new_tokens):
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, (t2 - t1) - prefill, out[0, len(prompt_ids) :].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())

    gguf = store.model_file(store.resolve(store.DEFAULT_MODEL))
    t = time.perf_counter()
    ck = checkpoint.load(gguf)
    lm_load = time.perf_counter() - t

    import transformers

    t = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32"
    ).eval()
    hf_load = time.perf_counter() - t

    prompt_ids = ck.tokenizer.encode(TEXT.read_text()[:4000])[: args.prompt_tokens]
    assert len(prompt_ids) == args.prompt_tokens
    results = {"lmforge": [], "transformers": []}
    outputs = {}
    for _ in range(args.runs):  # interleaved so drift hits both alike
        p, d, outputs["lmforge"] = time_lmforge(ck, prompt_ids, args.new_tokens)
        results["lmforge"].append((p, d))
        p, d, outputs["transformers"] = time_transformers(hf, prompt_ids, args.new_tokens)
        results["transformers"].append((p, d))

    rows = {}
    for name, runs in results.items():
        prefill = statistics.median(args.prompt_tokens / p for p, _ in runs)
        decode = statistics.median((args.new_tokens - 1) / d for _, d in runs)
        rows[name] = (prefill, decode)
    same = outputs["lmforge"] == outputs["transformers"]
    lm, hf_ = rows["lmforge"], rows["transformers"]
    lines = [
        f"| lmforge fp32 | {lm[0]:.0f} | {lm[1]:.1f} | {lm_load:.2f} s |",
        f"| transformers fp32 | {hf_[0]:.0f} | {hf_[1]:.1f} | {hf_load:.2f} s |",
        f"| ratio | {lm[0] / hf_[0]:.2f}x | {lm[1] / hf_[1]:.2f}x | {hf_load / lm_load:.1f}x faster |",
    ]
    header = [
        "| | prefill tok/s | decode tok/s | GGUF load |",
        "|---|---|---|---|",
    ]
    print("\n".join(header + lines))
    print(f"greedy output identical to transformers for {args.new_tokens} tokens: {same}")
    if args.no_record:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    entry = [
        f"\n## decode.py — {datetime.date.today()} — {machine}",
        "",
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), batch 1, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, greedy, median of {args.runs} interleaved runs.",
        "",
        *header,
        *lines,
        "",
        f"Greedy output identical to transformers for {args.new_tokens} tokens: {same}.",
    ]
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
