"""Fine-tuning throughput and peak memory of the default model on CPU: full vs LoRA, same data, same steps.

    python bench/finetune.py [--steps 8] [--batch 4] [--seq-len 256] [--record]

Each method runs in its own process (peak RSS is per process): SmolLM2-135M-Instruct in fp32, AdamW, synthetic
support-desk conversations rendered with the chat template, loss on assistant tokens only. Reports tokens/s
(all tokens in the batch, padding excluded) and peak RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def conversations(n: int) -> list[list[dict]]:
    items = ["a kettle", "a lamp", "two mugs", "a rug", "a chair", "a clock", "a vase", "a toaster"]
    out = []
    for i in range(n):
        item = items[i % len(items)]
        out.append([
            {"role": "system", "content": "You are the support desk of Lumen & Oak, a small homeware shop."},
            {"role": "user", "content": f"Hi, I ordered {item} (order #{1000 + i}) and it arrived damaged. What can I do?"},
            {"role": "assistant", "content": f"I'm sorry about the {item.split()[-1]}! Send us a photo within 30 days "
             f"and we will ship a replacement for order #{1000 + i} free of charge, or refund you in full."},
        ])  # fmt: skip
    return out


def worker(method: str, steps: int, batch: int, seq_len: int) -> dict:
    import torch

    from lmforge import checkpoint, store
    from lmforge.data.chat_format import tokenize_conversation
    from lmforge.models.lora import LoraConfig, apply_lora

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    ck = checkpoint.load(store.model_file(store.resolve(store.DEFAULT_MODEL)))
    model = ck.model.train()
    if method == "lora":
        apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rows = []
    for conv in conversations(batch * (steps + 1)):
        ids, mask = tokenize_conversation(ck.tokenizer, conv)
        ids, mask = ids[:seq_len], mask[:seq_len]
        rows.append((ids, mask))
    pad = ck.tokenizer.pad_id or 0

    def make(chunk):
        n = max(len(i) for i, _ in chunk)
        x = torch.full((len(chunk), n), pad)
        y = torch.full((len(chunk), n), -100)
        for r, (ids, mask) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
            tgt = torch.tensor(ids[1:] + [-100])
            tgt[~torch.tensor(mask[1:] + [False])] = -100
            y[r, : len(ids)] = tgt
        return x, y, sum(len(i) for i, _ in chunk)

    batches = [make(rows[i * batch : (i + 1) * batch]) for i in range(steps + 1)]
    tokens, start = 0, None
    for step, (x, y, n) in enumerate(batches):
        if step == 1:  # the first step pays for allocations and the optimizer state
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n if step else 0
    dt = time.perf_counter() - start
    return {
        "method": method,
        "tokens_per_s": tokens / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq_len)))
        return
    results = []
    for method in ("full", "lora"):
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    full = results[0]
    lines = ["| method | trainable params | tokens/s | peak RSS | vs full |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['trainable'] / 1e6:.2f} M | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB | "
            f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x speed, {r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x memory |"
        )
    print("\n".join(lines))
    if args.record:
        machine = f"{platform.machine()}, {os.cpu_count()} cores"
        entry = [
            f"\n## finetune.py — {datetime.date.today()} — {machine}",
            "",
            f"SmolLM2-135M-Instruct fp32 on CPU, AdamW, {args.steps} timed steps of {args.batch} chat conversations "
            f"(≤{args.seq_len} tokens, loss on assistant tokens), each method in its own process; LoRA r=8 on q/k/v/o.",
            "",
            *lines,
        ]
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
