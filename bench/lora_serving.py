"""Decode-step cost of serving LoRA adapters side by side: 16 sequences, 0, 1 or 2 adapters in the batch.

    python bench/lora_serving.py [--model NAME_OR_PATH] [--rank 16] [--targets q_proj,v_proj,...] [--steps 48]
                                 [--threads N] [--record]

The default model (fp32) in one LLMEngine; two random adapters of rank --rank on --targets (default all seven
projections, q/k/v/o/gate/up/down: the most work an adapter can add). Each case is an engine whose 16 sequences (128-token
prompts) are prefilled; then the engines take decode steps in turn, --steps each, so that whatever else the
(shared) machine does hits every case alike. Per case: the median step's wall time and CPU time (process time,
all threads). Prints a markdown entry; --record appends it to bench/RESULTS.md.
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
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
BATCH, PROMPT_TOKENS = 16, 128

# case -> the adapter of each of the 16 sequences (None = the base model); "loaded" = adapters are added
CASES = {
    "no adapters loaded": (False, [None] * BATCH),
    "2 loaded, 0 in batch": (True, [None] * BATCH),
    "1 adapter x 16 seqs": (True, ["a"] * BATCH),
    "2 adapters x 8 seqs": (True, ["a", "b"] * (BATCH // 2)),
    "2 adapters x 4 seqs + 8 base": (True, ["a", "b", None, None] * (BATCH // 4)),
}


def write_adapter(model: nn.Module, folder: Path, rank: int, targets: list[str], seed: int) -> Path:
    """A PEFT adapter folder with random A and B on every targeted projection."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            prefix = f"base_model.model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def prefilled_engine(ck, adapters: dict[str, Path], loaded: bool, loras: list, prompts) -> LLMEngine:
    """An engine whose 16 sequences are prefilled and a few steps into decoding."""
    model = build_model(ck.model.config, ck.model.state_dict())  # shares the weights; own module tree
    engine = LLMEngine(model, EngineConfig(kv_cache_mb=160, max_num_seqs=BATCH))
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
    return engine


def timed_step(engine: LLMEngine) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one decode step."""
    t, c = time.perf_counter(), time.process_time()
    outs = engine.step()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    assert len(outs) == BATCH
    return wall * 1e3, cpu * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=store.DEFAULT_MODEL)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=ALL_TARGETS)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ck = checkpoint.load(store.resolve(args.model))  # a store name or a path, as the CLI takes it
    text = TEXT.read_text()
    prompts = [ck.tokenizer.encode(text[i * 3000 : i * 3000 + 2000])[:PROMPT_TOKENS] for i in range(BATCH)]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        targets = args.targets.split(",")
        adapters = {
            n: write_adapter(ck.model, Path(tmp) / n, args.rank, targets, s) for n, s in (("a", 1), ("b", 2))
        }
        engines = {case: prefilled_engine(ck, adapters, *spec, prompts) for case, spec in CASES.items()}
    # one step of each engine in turn, so that whatever else the machine does hits every case alike
    times: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
    for _ in range(args.steps):
        for case, engine in engines.items():
            times[case].append(timed_step(engine))

    median = {case: tuple(statistics.median(x) for x in zip(*t, strict=True)) for case, t in times.items()}
    base_wall, base_cpu = median["no adapters loaded"]
    lines = [
        f"## lora_serving.py — {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        "",
        f"SmolLM2-135M-Instruct fp32, one decode step of {BATCH} sequences ({PROMPT_TOKENS}-token prompts), "
        f"random adapters of rank {args.rank} on {args.targets}; median of {args.steps} steps, the "
        f"cases' engines stepped in turn. Load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        "the end.",
        "",
        "| batch | wall ms | CPU ms | vs no adapters (wall / CPU) |",
        "|---|---|---|---|",
    ]
    for case, (wall, cpu) in median.items():
        lines.append(f"| {case} | {wall:.1f} | {cpu:.1f} | {wall / base_wall:.2f}x / {cpu / base_cpu:.2f}x |")
    entry = "\n".join(lines) + "\n"
    print(entry)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + entry)


if __name__ == "__main__":
    main()
