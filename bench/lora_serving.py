"""Decode-step cost of serving LoRA adapters side by side: 16 sequences, 0, 1 or 2 adapters in the batch.

    python bench/lora_serving.py [--model NAME_OR_PATH] [--rank 16] [--steps 16] [--rounds 3] [--record]

The default model (fp32) in one LLMEngine; two random adapters of rank --rank on all seven projections
(q/k/v/o/gate/up/down: the most work an adapter can add). Each case prefills 16 prompts of 128 tokens, then
times --steps decode steps (16 tokens each); the cases run interleaved for --rounds rounds and the table shows
the median step. Prints a markdown entry; --record appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge import checkpoint, store
from lmforge.engine import EngineConfig, LLMEngine
from lmforge.engine.types import SamplingParams
from lmforge.models.gpt import build_model

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH, PROMPT_TOKENS = 16, 128

# case -> the adapter of each of the 16 sequences (None = the base model); "loaded" = adapters are added
CASES = {
    "no adapters loaded": (False, [None] * BATCH),
    "2 loaded, 0 in batch": (True, [None] * BATCH),
    "1 adapter x 16 seqs": (True, ["a"] * BATCH),
    "2 adapters x 8 seqs (interleaved)": (True, ["a", "b"] * (BATCH // 2)),
    "2 adapters x 4 + 8 base": (True, ["a", "b", None, None] * (BATCH // 4)),
}


def write_adapter(model: nn.Module, folder: Path, rank: int, seed: int) -> Path:
    """A PEFT adapter folder with random A and B on every targeted projection."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            prefix = f"base_model.model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def step_ms(ck, adapters: dict[str, Path], loaded: bool, loras: list, prompts, steps: int) -> float:
    model = build_model(ck.model.config, ck.model.state_dict())  # shares the weights; own module tree
    engine = LLMEngine(model, EngineConfig(kv_cache_mb=256, max_num_seqs=BATCH))
    if loaded:
        for name, folder in adapters.items():
            engine.add_lora(name, folder)
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"r{i}", prompt, params, lora=lora)
    while any(not r.seq.output_ids for r in engine.requests.values()):  # prefill
        engine.step()
    for _ in range(3):  # warm up the decode shapes
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)
        assert len(outs) == BATCH
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())

    path = Path(args.model) if Path(args.model).exists() else store.model_file(store.resolve(args.model))
    ck = checkpoint.load(path)
    text = TEXT.read_text()
    prompts = [ck.tokenizer.encode(text[i * 3000 : i * 3000 + 2000])[:PROMPT_TOKENS] for i in range(BATCH)]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {n: write_adapter(ck.model, Path(tmp) / n, args.rank, s) for n, s in (("a", 1), ("b", 2))}
        results: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.rounds):  # interleaved so drift hits every case alike
            for case, (loaded, loras) in CASES.items():
                results[case].append(step_ms(ck, adapters, loaded, loras, prompts, args.steps))

    base = statistics.median(results["no adapters loaded"])
    lines = [
        f"## lora_serving.py — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}",
        "",
        f"SmolLM2-135M-Instruct fp32, one decode step of {BATCH} sequences ({PROMPT_TOKENS}-token prompts), "
        f"random adapters of rank {args.rank} on q/k/v/o/gate/up/down; median of {args.steps} steps x "
        f"{args.rounds} interleaved rounds (median of the rounds). Load average at start {load:.2f}, "
        f"at the end {os.getloadavg()[0]:.2f}.",
        "",
        "| batch | step ms | rounds | vs no adapters |",
        "|---|---|---|---|",
    ]
    for case, ms in results.items():
        m = statistics.median(ms)
        lines.append(f"| {case} | {m:.1f} | {' / '.join(f'{x:.0f}' for x in ms)} | {m / base:.2f}x |")
    entry = "\n".join(lines) + "\n"
    print(entry)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + entry)


if __name__ == "__main__":
    main()
