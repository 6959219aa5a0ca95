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
matrix also to <run>/confusion_matrix.png, and each prediction to <run>/predictions.jsonl. `evaluate` does the
same for a saved classifier on a labelled file (`lmforge classify MODEL --data FILE`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import atomic, checkpoint, config_io, runtime, store
from lmforge.data import labels as labelled
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.eval import metrics
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.lora import apply_lora
from lmforge.train import loop
from lmforge.train.finetune import DATA_REPORT, FinetuneConfig, FinetuneResult, LoraModel, pad_id_of

REPORT = "classification.json"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS = "predictions.jsonl"
PREDICT_BATCH = 32  # rows per forward when classifying for a report


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


@torch.no_grad()
def predict(
    model: nn.Module, examples: list[labelled.Example], pad_id: int, *, batch_size: int = PREDICT_BATCH
) -> np.ndarray:
    """Label probabilities (N, num_labels) of every example, in order, in eval mode (the mode is restored)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    probs = np.zeros((len(examples), 0), dtype=np.float64)
    try:
        for indices, (x, lengths, _) in labelled.eval_batches(examples, batch_size, pad_id):
            p = torch.softmax(model(x.to(device), lengths.to(device)), dim=-1).double().cpu().numpy()
            if probs.shape[1] == 0:
                probs = np.zeros((len(examples), p.shape[1]), dtype=np.float64)
            probs[indices] = p
    finally:
        model.train(was_training)
    return probs


def report(y_true: list[str], y_pred: list[str], label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision / recall / F1 / support and the confusion matrix (rows: true
    label, columns: predicted, both in id order), with scikit-learn's definitions (`eval.metrics`). Macro F1
    averages the labels present in y_true or y_pred, as sklearn's f1_score(average="macro") does."""
    return {
        "examples": len(y_true),
        "accuracy": metrics.accuracy(y_true, y_pred),
        "f1_macro": metrics.f1_macro(y_true, y_pred),
        "labels": list(label_names),
        "per_class": metrics.per_class(y_true, y_pred, label_names),
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, label_names),
    }


def write_report(
    folder: Path,
    result: dict[str, Any],
    texts: list[labelled.LabelledText],
    probs: np.ndarray,
    label_names: list[str],
) -> None:
    """classification.json, confusion_matrix.png and predictions.jsonl in `folder`, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / REPORT, result)
    rows = []
    for t, p in zip(texts, probs, strict=True):
        k = int(p.argmax())
        rows.append(
            {
                "line": t.line,
                "text": t.text,
                "label": t.label,
                "prediction": label_names[k],
                "probability": float(p[k]),
            }
        )
    atomic.write_text(folder / PREDICTIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    title = f"accuracy {result['accuracy']:.3f}, macro F1 {result['f1_macro']:.3f} ({result['examples']} examples)"
    confusion_png(folder / CONFUSION_PNG, label_names, result["confusion_matrix"], title)


def confusion_png(path: Path, label_names: list[str], matrix: list[list[int]], title: str) -> Path:
    """The confusion matrix as a PNG heat map with the counts written in, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    n = len(label_names)
    side = min(4 + 0.6 * n, 20)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    m = np.asarray(matrix, dtype=np.int64).reshape(n, n)
    image = ax.imshow(m, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), label_names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=10)
    if n <= 30:
        threshold = m.max() / 2 if m.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(m[i, j]),
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > threshold else "black",
                )
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _score(
    folder: Path,
    model: nn.Module,
    examples: list[labelled.Example],
    texts: list[labelled.LabelledText],
    label_names: list[str],
    pad_id: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    probs = predict(model, examples, pad_id)
    y_pred = [label_names[int(k)] for k in probs.argmax(axis=1)] if len(examples) else []
    result = extra | report([t.label for t in texts], y_pred, label_names)
    write_report(folder, result, texts, probs, label_names)
    return result


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
                scores = _score(
                    run_dir, model, data.val, data.val_texts, data.labels, pad_id, {"data": split}
                )
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


def evaluate(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    limit: int | None = None,
) -> tuple[dict[str, Any], labelled.LabelReport]:
    """Score a saved classifier (store name or folder) on a labelled file (its first `limit` usable lines); writes
    the report files to `out`. Lines whose label the classifier does not have are skipped and counted as
    unknown_label."""
    dev = runtime.resolve_device(device)
    ck = checkpoint.load(store.resolve(model), device=dev, dtype=runtime.resolve_dtype(dtype, dev))
    if not isinstance(ck.model, SequenceClassifier):
        raise UserError(
            f"{model} is a language model, not a classifier; train one with `lmforge finetune ... task=classification`"
        )
    names = list(ck.model.labels)
    texts, read_report = labelled.read(data, known_labels=names)
    texts = texts[:limit] if limit else texts
    if not texts:
        raise UserError(f"nothing to evaluate: {read_report.summary()}")
    ids = {name: i for i, name in enumerate(names)}
    examples, truncated = labelled.tokenize(texts, ck.tokenizer, ck.config.max_seq_len, ids)
    pad_id = ck.model.pad_token_id if ck.model.pad_token_id is not None else pad_id_of(ck.tokenizer)
    extra = {
        "model": str(ck.path),
        "data": str(data),
        "data_report": read_report.summary(),
        "truncated": truncated,
    }
    return _score(Path(out), ck.model, examples, texts, names, pad_id, extra), read_report
