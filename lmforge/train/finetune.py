"""`lmforge finetune`: supervised fine-tuning on chat conversations (OpenAI fine-tuning JSONL), full or LoRA.

Builds the `init_from` model, the conversations (`data.sft`: checked, templated, loss-masked on the assistant
tokens, padded and length-bucketed) and the loss (next-token cross-entropy with ignore_index=-100), hands them
to the one loop, then registers the fine-tuned model in the store under the run's name.

method: full trains every weight; the run's model/ folder is the fine-tuned HF model.
method: lora freezes the base and trains adapters (`models.lora`). The loop checkpoints `model.state_dict()`;
the LoRA model hands it the merged weights, so model/ is a complete HF folder with the adapters folded in (what
the store registers), and the adapter alone is written in PEFT's layout to <run>/adapter at the end. On resume
the base is rebuilt from init_from and the loop restores A and B from train_state/ (it keeps the trained
parameters of a partly frozen model there), so a LoRA run resumes as exactly as a full one.

task: classification trains a classification head on labelled text instead (`train.classify`, same config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import checkpoint, config_io, store
from lmforge.data import sft
from lmforge.data.tokenizer import Tokenizer, pad_id_of
from lmforge.errors import UserError
from lmforge.models.classifier import POOLINGS
from lmforge.models.lora import LoraConfig, LoraLinear, apply_lora, save_adapter
from lmforge.train import loop
from lmforge.train.config import OptimConfig, TrainConfig
from lmforge.train.losses import IGNORE_INDEX, next_token_loss

METHODS = ("full", "lora", "head")  # head: only the classification head trains (task=classification)
TASKS = ("chat", "classification")  # classification: see train/classify.py
ADAPTER_DIR = "adapter"
DATA_REPORT = "data_report.json"


def _finetune_optim() -> OptimConfig:
    # Fine-tuning moves a trained model a little: a small peak lr, short warm-up, no weight decay.
    return OptimConfig(lr=5e-5, min_lr=5e-6, warmup_steps=10, weight_decay=0.0)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """TrainConfig plus what fine-tuning needs; `model` is unused (the architecture comes from init_from)."""

    data: str = "data/chat.jsonl"  # OpenAI fine-tuning JSONL: {"messages": [{"role", "content"}, ...]}
    init_from: str | None = None  # required: a store name, HF folder or .gguf file
    optim: OptimConfig = field(default_factory=_finetune_optim)
    val_data: str = ""  # a separate validation JSONL; "" = hold out val_fraction of `data`
    val_fraction: float = 0.05
    strict_data: bool = False  # stop at the first bad line instead of skipping and counting it
    method: str = "full"  # full | lora | head (classification only)
    task: str = "chat"  # chat | classification (data: JSONL {"text", "label"} or CSV text,label)
    pooling: str = "last"  # classification: last (last real token) | mean
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init_from:
            raise UserError("fine-tuning needs init_from=MODEL (a store name, HF folder or .gguf file)")
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.task == "chat" and self.method == "head":
            raise UserError("method=head trains a classification head; it needs task=classification")
        if self.task == "classification" and self.distributed == "fsdp":
            raise UserError("task=classification runs under DDP, not FSDP; set distributed=ddp")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.method == "lora" and self.distributed == "fsdp":
            raise UserError("method=lora runs under DDP, not FSDP; set distributed=ddp")


@dataclass
class FinetuneResult:
    val_loss: float | None
    steps: int
    stopped: str
    run_dir: Path
    model_dir: Path | None  # the run's HF folder, adapters merged for LoRA (rank 0 only)
    adapter_dir: Path | None  # the PEFT adapter folder (LoRA, rank 0 only)
    store_name: str | None
    data_report: str  # one line: conversations kept and skipped per reason


@dataclass
class SFTData:
    train: list[sft.Example]
    val: list[sft.Example]
    reports: list[sft.ReadReport]

    def summary(self) -> str:
        return "; ".join(r.summary() for r in self.reports)


def load_data(cfg: FinetuneConfig, tokenizer: Tokenizer) -> SFTData:
    """Read, check, split and tokenise the conversations; bad ones are counted in the reports."""
    conversations, report = sft.read_jsonl(cfg.data, strict=cfg.strict_data)
    pairs = list(zip(report.lines, conversations, strict=True))
    reports = [report]
    if cfg.val_data:
        train_pairs = pairs
        val_conversations, val_report = sft.read_jsonl(cfg.val_data, strict=cfg.strict_data)
        val_pairs = list(zip(val_report.lines, val_conversations, strict=True))
        reports.append(val_report)
    else:
        train_pairs, val_pairs = sft.split(pairs, cfg.val_fraction, cfg.seed)
        val_report = report

    def examples(chosen: list[tuple[int, list[dict]]], rep: sft.ReadReport) -> list[sft.Example]:
        lines = [n for n, _ in chosen]
        return sft.tokenize([c for _, c in chosen], tokenizer, cfg.seq_len, report=rep, lines=lines)

    data = SFTData(examples(train_pairs, report), examples(val_pairs, val_report), reports)
    if cfg.strict_data and any(r.problems for r in reports):
        raise UserError(data.summary())
    if not data.train:
        raise UserError(f"no training conversations left: {data.summary()}")
    return data


class LoraModel(nn.Module):
    """The adapted model as the loop sees it: runs the GPT with its LoRA layers, and its state_dict() is the
    merged weights under the plain GPT's names, so the loop's checkpoint is an ordinary HF folder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return merged_state_dict(self.model)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError("merged weights cannot be split back into base and adapters")


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `model` with every LoraLinear folded into its base (W + B A alpha/r), plain GPT names."""
    sd: dict[str, torch.Tensor] = {}
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    for name, tensor in model.state_dict().items():
        owner = next((n for n in lora_layers if name.startswith(n + ".")), None)
        if owner is None:
            sd[name] = tensor.detach()
            continue
        rest = name[len(owner) + 1 :]
        if rest == "base_layer.weight":
            sd[f"{owner}.weight"] = lora_layers[owner].merged_weight().detach()
        elif rest.startswith("base_layer."):
            sd[f"{owner}.{rest.removeprefix('base_layer.')}"] = tensor.detach()
        # lora_A / lora_B are folded in above
    return sd


def token_loss_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of cross-entropy over the trained targets, how many there are) of one padded batch."""
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((y != IGNORE_INDEX).sum())


def val_loss(
    model: nn.Module, examples: list[sft.Example], cfg: FinetuneConfig, pad_id: int, dist: loop.Dist
):
    """Mean loss per assistant token over the validation conversations (at most cfg.eval_batches batches)."""
    total = torch.zeros(2, dtype=torch.float64)
    batches = sft.eval_batches(examples, cfg.batch_size, pad_id, rank=dist.rank, world_size=dist.world_size)
    for k, (x, y) in enumerate(batches):
        if cfg.eval_batches and k >= cfg.eval_batches:
            break
        s, n = token_loss_sums(model, x.to(dist.device), y.to(dist.device))
        total += torch.tensor([s, n], dtype=torch.float64)
    if dist.mode != "none":
        import torch.distributed as tdist

        tdist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


def run(cfg: FinetuneConfig, *, resume: bool = False) -> FinetuneResult:
    if cfg.task == "classification":
        from lmforge.train import classify  # it builds on this module

        return classify.run(cfg, resume=resume)
    dist = loop.setup(cfg)
    try:
        ck = checkpoint.load(store.resolve(cfg.init_from))
        tokenizer = ck.tokenizer
        if tokenizer.chat_template is None:
            raise UserError(f"{cfg.init_from} has no chat template; fine-tuning on chat data needs one")
        if cfg.seq_len > ck.config.max_seq_len:
            raise UserError(
                f"seq_len {cfg.seq_len} exceeds {cfg.init_from}'s max_seq_len {ck.config.max_seq_len}; lower seq_len"
            )
        data = load_data(cfg, tokenizer)
        if dist.is_main:
            print(
                f"data: {data.summary()}; {len(data.train)} train / {len(data.val)} validation conversations"
            )
        model: nn.Module = ck.model.train()
        if cfg.method == "lora":
            base = apply_lora(model, cfg.lora, generator=torch.Generator().manual_seed(cfg.seed))
            model = LoraModel(base)
        pad_id = pad_id_of(tokenizer)
        batches = sft.SFTBatches(
            data.train,
            cfg.batch_size,
            pad_id=pad_id,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )

        def eval_fn(m: nn.Module) -> float:
            return val_loss(m, data.val, cfg, pad_id, dist)

        result = loop.train(
            model,
            batches,
            cfg,
            next_token_loss,
            tokenizer=tokenizer,
            eval_fn=eval_fn if data.val else None,
            dist=dist,
            resume=resume,
            run_config=config_io.to_dict(cfg),
        )
        run_dir = Path(cfg.out_dir)
        name = adapter_dir = None
        if dist.is_main:
            report = {"summary": data.summary(), "files": [_report_dict(r) for r in data.reports]}
            (run_dir / DATA_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if isinstance(model, LoraModel):
                adapter_dir = run_dir / ADAPTER_DIR
                save_adapter(model.model, adapter_dir, cfg.lora, str(cfg.init_from))
            name = store.pull(str(result.model_dir), name=cfg.name, force=True).name
        return FinetuneResult(
            result.val_loss,
            result.state.step,
            result.stopped,
            run_dir,
            result.model_dir,
            adapter_dir,
            name,
            data.summary(),
        )
    finally:
        loop.teardown(dist)


def _report_dict(report: sft.ReadReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "kept": report.kept,
        "skipped": report.counts,
        "lines": report.problems,
        "details": {str(k): v for k, v in sorted(report.details.items())},
    }
