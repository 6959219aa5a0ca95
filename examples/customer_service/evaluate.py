"""Before vs after: the base model and the fine-tuned one on the held-out support questions.

    python examples/customer_service/evaluate.py [--base smollm2-135m-instruct] [--tuned customer-service]
        [--data examples/customer_service/data] [--out examples/customer_service/results.json]

For each model:
  val loss        on val.jsonl (unseen conversations from training's templates): mean cross-entropy per
                  assistant token, as `lmforge finetune` scores its validation data
  held-out loss   the same on heldout.jsonl, whose questions and reference answers use wordings training never
                  does: how likely the model finds those exact reference answers
  key-fact match  on heldout.jsonl: the share of greedy answers that contain the question's key fact
                  ("30 days", "$4.99", "help@lumenandoak.com", ...) verbatim: case-insensitive, as a whole token,
                  any dash read as "-"
Prints a table and writes every number and every answer to --out (JSON). Only lmforge's own APIs: the store
and checkpoint loader, the chat-data tokenizer and loss of `lmforge finetune`, and the inference engine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lmforge import atomic, checkpoint, runtime, store
from lmforge.data import sft
from lmforge.data.tokenizer import pad_id_of
from lmforge.engine import EngineConfig, LLMEngine, SamplingParams
from lmforge.train.finetune import token_loss_sums

HERE = Path(__file__).resolve().parent
SEQ_LEN = 512  # room for any held-out conversation (they are under 100 tokens)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        sys.exit(f"{path} does not exist; run make_data.py first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def spread(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` rows taken evenly through the file, so every topic keeps a share."""
    if not limit or limit >= len(rows):
        return rows
    step = len(rows) / limit
    return [rows[int(k * step)] for k in range(limit)]


def has_fact(answer: str, key: str) -> bool:
    """Whether `answer` states `key` verbatim (case-insensitive, whole token, any dash as '-')."""
    text = " ".join(re.sub("[\u2010-\u2015]", "-", answer).lower().split())
    return re.search(rf"(?<![\w$]){re.escape(key.lower())}(?!\w)", text) is not None


@torch.no_grad()
def loss(ck: checkpoint.Checkpoint, rows: list[dict[str, Any]], batch_size: int = 8) -> float:
    """Mean loss per assistant token of the conversations, the way `lmforge finetune` scores validation data."""
    examples = sft.tokenize([r["messages"] for r in rows], ck.tokenizer, SEQ_LEN)
    total, count = 0.0, 0
    for x, y in sft.eval_batches(examples, batch_size, pad_id_of(ck.tokenizer)):
        s, n = token_loss_sums(ck.model, x, y)
        total, count = total + s, count + n
    return total / count


def answers(ck: checkpoint.Checkpoint, rows: list[dict[str, Any]], max_tokens: int) -> list[str]:
    """Greedy answers to each row's question (system prompt + user turn), all decoded in one engine batch."""
    tok = ck.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True)) for r in rows
    ]
    engine = LLMEngine(ck.model, EngineConfig(max_num_seqs=len(rows), kv_cache_mb=512), eos_ids=ck.eos_ids)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


def evaluate(
    name: str, val: list[dict[str, Any]], rows: list[dict[str, Any]], max_tokens: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ck = checkpoint.load(store.model_file(store.resolve(name)))
    ck.model.eval()
    val_loss, heldout_loss = loss(ck, val), loss(ck, rows)
    said = answers(ck, rows, max_tokens)
    hits = [has_fact(a, r["key_fact"]) for a, r in zip(said, rows, strict=True)]
    by_topic: Counter[str] = Counter()
    for r, hit in zip(rows, hits, strict=True):
        by_topic[r["topic"]] += hit
    return {
        "model": name,
        "val_loss": val_loss,
        "heldout_loss": heldout_loss,
        "key_fact_match": sum(hits) / len(hits),
        "matched": sum(hits),
        "questions": len(hits),
        "matched_by_topic": dict(sorted(by_topic.items())),
        "answers": said,
        "hits": hits,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | val loss | held-out loss | key-fact match |", "|---|---|---|---|"]
    for label, r in zip(("base", "fine-tuned"), results, strict=True):
        share = f"{r['matched']}/{r['questions']} ({100 * r['key_fact_match']:.0f}%)"
        lines.append(f"| {label}: {r['model']} | {r['val_loss']:.3f} | {r['heldout_loss']:.3f} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=store.DEFAULT_MODEL, help="store name or path of the base model")
    ap.add_argument("--tuned", default="customer-service", help="store name or path of the fine-tuned model")
    ap.add_argument("--data", default=str(HERE / "data"), help="the folder make_data.py wrote")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--limit", type=int, default=0, help="use this many conversations of each file (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length limit")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = $LMFORGE_THREADS or all cores)")
    args = ap.parse_args(argv)
    runtime.set_threads(args.threads or None)
    val = spread(read_rows(Path(args.data) / "val.jsonl"), args.limit)
    rows = spread(read_rows(Path(args.data) / "heldout.jsonl"), args.limit)
    results = [evaluate(name, val, rows, args.max_tokens) for name in (args.base, args.tuned)]
    for r in results:
        if not (math.isfinite(r["val_loss"]) and math.isfinite(r["heldout_loss"])):
            sys.exit(f"{r['model']}: loss is not finite ({r['val_loss']}, {r['heldout_loss']})")
    report = {
        "data": os.path.relpath(args.data),
        "val_conversations": len(val),
        "max_tokens": args.max_tokens,
        "threads": torch.get_num_threads(),
        "base": {k: v for k, v in results[0].items() if k not in ("answers", "hits")},
        "tuned": {k: v for k, v in results[1].items() if k not in ("answers", "hits")},
        "questions": [
            {
                "topic": row["topic"],
                "question": row["messages"][-2]["content"],
                "key_fact": row["key_fact"],
                "base_answer": results[0]["answers"][i],
                "base_match": results[0]["hits"][i],
                "tuned_answer": results[1]["answers"][i],
                "tuned_match": results[1]["hits"][i],
            }
            for i, row in enumerate(rows)
        ],
    }
    atomic.write_json(Path(args.out), report)
    print(table(results))
    print(f"every answer in {args.out}")


if __name__ == "__main__":
    main()
