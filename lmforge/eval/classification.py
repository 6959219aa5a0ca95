"""Scoring a text classifier on labelled examples: accuracy, per-class precision / recall / F1, macro F1 and the
confusion matrix (`eval.metrics`, scikit-learn's definitions), written as classification.json,
confusion_matrix.png and predictions.jsonl. Used at the end of a classification run (`train.classify`) and for a
saved classifier on a labelled file (`lmforge classify MODEL --data FILE`, `lmforge eval CLASSIFIER --task
classification --data FILE`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge import atomic, checkpoint, runtime, store
from lmforge.data import labels as labelled
from lmforge.data.tokenizer import pad_id_of
from lmforge.errors import UserError
from lmforge.eval import metrics
from lmforge.models.classifier import SequenceClassifier

REPORT = "classification.json"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS = "predictions.jsonl"
PREDICT_BATCH = 32  # rows per forward when classifying for a report


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
    return atomic.save_figure(fig, path)


def score(
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
    return score(Path(out), ck.model, examples, texts, names, pad_id, extra), read_report
