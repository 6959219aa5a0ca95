"""`lmforge finetune` with `task: classification`: a classification head over a pretrained decoder, trained on
labelled text (JSONL {"text", "label"} or CSV text,label) through the one loop.

Builds the `init_from` model as a `models.classifier.SequenceClassifier` (its lm_head dropped, a fresh `score`
head over the pooled final hidden states: `pooling` last | mean), the labelled examples (`data.labels`:
checked, label ids in sorted order, stratified validation split, length-bucketed padded batches) and the loss
(cross-entropy over the labels), and hands them to `loop.train`. The method says what trains:

  full  every weight;          lora  adapters on the decoder + the head;          head  the head alone.

The loop checkpoints the model as transformers' *ForSequenceClassification folder (`checkpoint.save` writes
config.json with id2label / label2id / num_labels, and score.weight; LoRA runs hand it merged weights), which
is what the store registers and `lmforge classify`, the engine's `Classifier` and transformers load.

At the end the validation examples are classified once more and scored with `eval.metrics`: accuracy,
per-class precision / recall / F1, macro F1 and the confusion matrix go to <run>/classification.json, the
matrix also to <run>/confusion_matrix.png, and each prediction to <run>/predictions.jsonl
(`eval.classification.score`, which also scores a saved classifier on a labelled file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import atomic, checkpoint, config_io, store
from lmforge.data import labels as labelled
from lmforge.data.tokenizer import Tokenizer, pad_id_of
from lmforge.errors import UserError
from lmforge.eval.classification import REPORT, score
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.lora import apply_lora
from lmforge.train import loop
from lmforge.train.finetune import DATA_REPORT, FinetuneConfig, FinetuneResult, LoraModel


@dataclass
class ClassifyResult(FinetuneResult):
    labels: tuple[str, ...] = ()
    metrics: dict[str, Any] | None = None  # the validation report (classification.json); None without one


@dataclass
class ClassifyData:
    labels: list[str]  # id order
    train: list[labelled.Example]
    val: list[labelled.Example]
    val_texts: list[labelled.LabelledText]  # aligned with val
    reports: list[labelled.LabelReport]
    truncated: int  # texts cut to seq_len

    def summary(self) -> str:
        cut = f"; {self.truncated} texts cut to seq_len" if self.truncated else ""
        return "; ".join(r.summary() for r in self.reports) + cut


def load_data(cfg: FinetuneConfig, tokenizer: Tokenizer) -> ClassifyData:
    """Read, check, split and tokenise the labelled texts; bad lines are counted in the reports. The labels
    are those of the training examples; validation lines with any other label are skipped as unknown."""
    texts, report = labelled.read(cfg.data, strict=cfg.strict_data)
    reports = [report]
    if cfg.val_data:
        train_texts = texts
        names = labelled.order_labels({t.label for t in train_texts})
        val_texts, val_report = labelled.read(cfg.val_data, known_labels=names, strict=cfg.strict_data)
        reports.append(val_report)
    else:
        train_texts, val_texts = labelled.split(texts, cfg.val_fraction, cfg.seed)
        names = labelled.order_labels({t.label for t in train_texts})
    if not train_texts:
        raise UserError(f"no training examples left: {'; '.join(r.summary() for r in reports)}")
    if len(names) < 2:
        raise UserError(
            f"classification needs at least two labels in the training data, found {names} in {cfg.data}"
        )
    ids = {name: i for i, name in enumerate(names)}
    train, cut_train = labelled.tokenize(train_texts, tokenizer, cfg.seq_len, ids)
    val, cut_val = labelled.tokenize(val_texts, tokenizer, cfg.seq_len, ids)
    return ClassifyData(names, train, val, val_texts, reports, cut_train + cut_val)


class LoraClassifier(LoraModel):
    """A classifier with LoRA layers in its decoder, as the loop sees it: state_dict() is the merged weights
    (`finetune.LoraModel`), and hf_config() makes `checkpoint.save` write a classifier folder."""

    def hf_config(self) -> dict[str, Any]:
        return self.model.hf_config()


def build_model(
    ck: checkpoint.Checkpoint, cfg: FinetuneConfig, label_names: list[str], pad_id: int
) -> nn.Module:
    """The classifier to train: `init_from`'s decoder with a fresh head (or its own head, when init_from is a
    classifier of the same labels), set up for the method."""
    generator = torch.Generator().manual_seed(cfg.seed)
    previous = ck.model if isinstance(ck.model, SequenceClassifier) else None
    decoder = previous.model if previous is not None else ck.model
    model = SequenceClassifier(decoder, label_names, pooling=cfg.pooling, pad_token_id=pad_id)
    if previous is not None and previous.labels == tuple(label_names):
        model.score = previous.score
    else:
        model.init_head(generator)
    model.train()
    if cfg.method == "head":
        for p in model.model.parameters():
            p.requires_grad_(False)
    elif cfg.method == "lora":
        apply_lora(model.model, cfg.lora, generator=generator)  # freezes the decoder; the head still trains
        return LoraClassifier(model)
    return model


def classification_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Mean cross-entropy of a (x, lengths, labels) batch."""
    x, lengths, y = batch
    return F.cross_entropy(model(x, lengths), y)


def val_loss(
    model: nn.Module, examples: list[labelled.Example], cfg: FinetuneConfig, pad_id: int, dist: loop.Dist
):
    """Mean loss per validation example (at most cfg.eval_batches batches)."""
    total = torch.zeros(2, dtype=torch.float64)
    batches = labelled.eval_batches(
        examples, cfg.batch_size, pad_id, rank=dist.rank, world_size=dist.world_size
    )
    for k, (_, (x, lengths, y)) in enumerate(batches):
        if cfg.eval_batches and k >= cfg.eval_batches:
            break
        logits = model(x.to(dist.device), lengths.to(dist.device))
        loss = F.cross_entropy(logits, y.to(dist.device), reduction="sum")
        total += torch.tensor([float(loss), len(y)], dtype=torch.float64)
    if dist.mode != "none":
        import torch.distributed as tdist

        tdist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


def run(cfg: FinetuneConfig, *, resume: bool = False) -> ClassifyResult:
    dist = loop.setup(cfg)
    try:
        ck = checkpoint.load(store.resolve(cfg.init_from))
        tokenizer = ck.tokenizer
        if cfg.seq_len > ck.config.max_seq_len:
            raise UserError(
                f"seq_len {cfg.seq_len} exceeds {cfg.init_from}'s max_seq_len {ck.config.max_seq_len}; lower seq_len"
            )
        data = load_data(cfg, tokenizer)
        if dist.is_main:
            print(
                f"data: {data.summary()}; {len(data.train)} train / {len(data.val)} validation examples; "
                f"{len(data.labels)} labels: {', '.join(data.labels)}"
            )
        pad_id = pad_id_of(tokenizer)
        model = build_model(ck, cfg, data.labels, pad_id)
        batches = labelled.LabelBatches(
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
            classification_loss,
            tokenizer=tokenizer,
            eval_fn=eval_fn if data.val else None,
            dist=dist,
            resume=resume,
            run_config=config_io.to_dict(cfg),
        )
        run_dir = Path(cfg.out_dir)
        name, scores = None, None
        if dist.is_main:
            report_file = {"summary": data.summary(), "files": [_data_report(r) for r in data.reports]}
            atomic.write_json(run_dir / DATA_REPORT, report_file)
            if data.val:
                split = cfg.val_data or f"{cfg.data} (validation split, val_fraction={cfg.val_fraction})"
                scores = score(run_dir, model, data.val, data.val_texts, data.labels, pad_id, {"data": split})
                print(
                    f"validation: accuracy {scores['accuracy']:.4f}, macro F1 {scores['f1_macro']:.4f} over "
                    f"{scores['examples']} examples; report in {run_dir / REPORT}"
                )
            name = store.pull(str(result.model_dir), name=cfg.name, force=True).name
        return ClassifyResult(
            result.val_loss,
            result.state.step,
            result.stopped,
            run_dir,
            result.model_dir,
            None,
            name,
            data.summary(),
            tuple(data.labels),
            scores,
        )
    finally:
        loop.teardown(dist)


def _data_report(report: labelled.LabelReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "kept": report.kept,
        "skipped": report.counts,
        "reasons": {reason: labelled.REASONS[reason] for reason in report.problems},
        "lines": report.problems,
        "details": {str(k): v for k, v in sorted(report.details.items())},
    }
