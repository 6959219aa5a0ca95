"""Perplexity scoring throughput of the default model at batch sizes 1 and 16, and transformers alongside.

    python bench/eval.py [--docs 16] [--max-length 256] [--record]

Scores `--docs` passages of tinyshakespeare (each its own document, one window each when it fits) with
lmforge's perplexity task, at batch 1 and batch 16, and the same windows with transformers' model at batch 1
as the baseline. Prints scored tokens/s and checks that every run gives the same loss.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from lmforge import checkpoint, store
from lmforge.eval import perplexity as ppl

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def hf_nll(model, sequences) -> tuple[float, int]:
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            logits = model(x).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(ids) - 1
    return total, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())

    gguf = store.model_file(store.resolve(store.DEFAULT_MODEL))
    ck = checkpoint.load(gguf)
    text = TEXT.read_text()
    chunk = 900  # characters: about 230 tokens, one window each at --max-length 256
    texts = [text[i * chunk : (i + 1) * chunk] for i in range(args.docs)]
    sequences, num_bytes = ppl.encode_documents(ck.tokenizer, texts)
    sequences = [s[: args.max_length] for s in sequences]

    rows = []
    for batch in (1, 16):
        ppl.perplexity_of_ids(ck.model, sequences[:2], num_bytes, max_length=args.max_length,
                              stride=args.max_length - 1, batch_size=batch)  # fmt: skip  # warm-up
        t = time.perf_counter()
        res = ppl.perplexity_of_ids(ck.model, sequences, num_bytes, max_length=args.max_length,
                                    stride=args.max_length - 1, batch_size=batch)  # fmt: skip
        dt = time.perf_counter() - t
        rows.append((f"lmforge, batch {batch}", res.num_tokens / dt, res.total_nll / res.num_tokens))

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32"
    ).eval()
    hf_nll(hf, sequences[:2])
    t = time.perf_counter()
    total, n = hf_nll(hf, sequences)
    rows.append(("transformers forward, batch 1", n / (time.perf_counter() - t), total / n))

    base = rows[-1][1]
    lines = ["| run | scored tok/s | vs transformers | loss |", "|---|---|---|---|"]
    lines += [f"| {name} | {tps:.0f} | {tps / base:.2f}x | {loss:.5f} |" for name, tps, loss in rows]
    print("\n".join(lines))
    if not args.record:
        return
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    entry = [
        f"\n## eval.py — {datetime.date.today()} — {machine}",
        "",
        f"Perplexity scoring of SmolLM2-135M-Instruct (fp32) on {args.docs} tinyshakespeare passages of "
        f"~{sum(map(len, sequences)) // len(sequences)} tokens (one window each, max_length {args.max_length}); "
        "scored tokens/s, baseline transformers' forward over the same windows in the same run.",
        "",
        *lines,
    ]
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(entry) + "\n")


if __name__ == "__main__":
    main()
