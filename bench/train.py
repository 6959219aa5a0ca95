"""Training throughput: lmforge's loop vs a plain-PyTorch nanoGPT loop, same model, same data, one run.

nanoGPT's CPU "baby GPT" on character-level tinyshakespeare (its README): n_layer 4, n_head 4, n_embd 128,
seq_len 64, batch 12, dropout 0, lr 1e-3 cosine to 1e-4 over the run, warm-up 100, beta2 0.99, 2000
iterations; first 90% of the text trains, the last 10% validates. nanoGPT reports ~11,500 tokens/s and val
loss 1.886 on this machine kind (../shared/data/README.md).

    python bench/train.py [--iters 2000] [--record]

Tokens/s is the median over steps of batch tokens / step time (evaluation excluded), for both loops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
N_LAYER, N_HEAD, N_EMBD, SEQ, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, EVAL_EVERY, EVAL_ITERS = 1e-3, 1e-4, 100, 250, 20


# ------------------------------------------------------------------------------- the plain-PyTorch baseline


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(N_EMBD), CausalSelfAttention(), nn.LayerNorm(N_EMBD)
        self.mlp = nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, N_EMBD), nn.Embedding(SEQ, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def get_lr(it, iters):
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (iters - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def baseline(train: np.ndarray, val: np.ndarray, iters: int) -> tuple[float, float]:
    """nanoGPT's train.py loop, trimmed: (median tokens/s, final val loss)."""
    torch.manual_seed(1337)
    model = NanoGPT(257)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99), fused=True)

    def get_batch(data):
        ix = torch.randint(len(data) - SEQ, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i : i + SEQ].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + SEQ].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def val_loss():
        model.eval()
        out = float(np.mean([model(*get_batch(val)).item() for _ in range(EVAL_ITERS)]))
        model.train()
        return out

    speeds, loss = [], math.nan
    x, y = get_batch(train)
    for it in range(iters):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = get_lr(it, iters)
        loss = model(x, y)
        x, y = get_batch(train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        speeds.append(BATCH * SEQ / (time.perf_counter() - t0))
        if (it + 1) % EVAL_EVERY == 0 and it + 1 < iters:
            print(f"  baseline step {it + 1}: val loss {val_loss():.4f}", flush=True)
    return statistics.median(speeds), val_loss()


# ------------------------------------------------------------------------------- lmforge


def prepare(root: Path) -> Path:
    """The text as two documents, the first 90% and the last 10%, through `data prepare` (bytes). The split
    is by document hash, so take the first seed that sends the 10% document to validation."""
    from lmforge.data.prepare import PrepareConfig, run

    text = TEXT.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    corpus = root / "shakespeare.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (text[:cut], text[cut:])))
    for seed in range(32):
        summary = run(
            PrepareConfig(
                inputs=(str(corpus),),
                out=str(root / "data"),
                tokenizer="bytes",
                val_fraction=0.0,
                seed=seed,
                workers=1,
            )
        )
        if summary.tokens["val"] < summary.tokens["train"]:
            return root / "data"
    raise RuntimeError("no seed put the last 10% into validation")


def lmforge_run(data: Path, root: Path, iters: int) -> tuple[float, float]:
    from lmforge import config_io
    from lmforge.train import pretrain
    from lmforge.train.config import TrainConfig

    os.environ["LMFORGE_HOME"] = str(root / "home")
    cfg = config_io.load(
        TrainConfig,
        REPO / "recipes" / "shakespeare-char.yaml",
        [f"data={data}", f"out_dir={root / 'run'}", f"max_steps={iters}", "log_every=1", "tensorboard=false"],
    )
    result = pretrain.run(cfg)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "val_loss" not in r), result.val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        from lmforge.data.loader import TokenShards

        train = np.concatenate([np.asarray(s) for s in TokenShards(data, "train").shards])
        val = np.concatenate([np.asarray(s) for s in TokenShards(data, "val").shards])
        load = os.getloadavg()[0]
        print(
            f"{args.iters} iterations, {len(train):,} train / {len(val):,} val tokens, load {load:.2f}",
            flush=True,
        )
        base_tps, base_val = baseline(train, val, args.iters)
        print(f"baseline: {base_tps:,.0f} tokens/s, val loss {base_val:.4f}", flush=True)
        ours_tps, ours_val = lmforge_run(data, root, args.iters)
        print(f"lmforge:  {ours_tps:,.0f} tokens/s, val loss {ours_val:.4f}", flush=True)
    ratio = ours_tps / base_tps
    print(f"ratio {ratio:.2f}x; vs nanoGPT's 11,500 tokens/s: {ours_tps / 11500:.2f}x")
    if args.record:
        entry = (
            f"\n## train.py — {date.today()} — {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n\n"
            f"nanoGPT CPU baby GPT on char-level tinyshakespeare, {args.iters} iterations, median step tokens/s "
            f"(load average {load:.2f} at start).\n\n"
            "| | tokens/s | val loss |\n|---|---|---|\n"
            f"| lmforge (train.loop) | {ours_tps:,.0f} | {ours_val:.4f} |\n"
            f"| plain PyTorch nanoGPT loop | {base_tps:,.0f} | {base_val:.4f} |\n"
            f"| ratio | {ratio:.2f}x | |\n\n"
            f"Against nanoGPT's published 11,500 tokens/s on this machine kind: {ours_tps / 11500:.2f}x.\n"
        )
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(entry)


if __name__ == "__main__":
    main()
