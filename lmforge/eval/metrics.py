"""Metric functions: plain numbers in, plain numbers out (no torch, no model).

Generation: exact match and contains-match on whitespace-stripped strings, BLEU and chrF as sacrebleu corpus
scores. Classification: accuracy, macro/micro F1, per-class precision/recall/F1/support and the confusion matrix,
with scikit-learn's definitions (a class with no predicted or no true items gets 0 for the undefined ratio, as
sklearn does with zero_division=0). Multiple choice: `choose` picks acc / acc_norm predictions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import sacrebleu

# ---------------------------------------------------------------------------------------------- generation


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    _check_lengths(predictions, references)
    return _mean([p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)])


def contains_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that contain their (stripped) reference anywhere, e.g. "The answer is 12." for "12"."""
    _check_lengths(predictions, references)
    return _mean([r.strip() in p for p, r in zip(predictions, references, strict=True)])


def bleu(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """sacrebleu corpus BLEU (0-100); tokenize="zh" for Chinese targets."""
    _check_lengths(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100): character n-grams, so it needs no word tokenizer."""
    _check_lengths(predictions, references)
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


# ---------------------------------------------------------------------------------------------- multiple choice


def choose(logprobs: Sequence[float], num_bytes: Sequence[int]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction): argmax of summed logprob, and of logprob per UTF-8 byte of choice.

    Ties go to the lowest index (numpy's argmax).
    """
    acc = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    norm = [lp / max(n, 1) for lp, n in zip(logprobs, num_bytes, strict=True)]
    acc_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return acc, acc_norm


# ---------------------------------------------------------------------------------------------- classification


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    _check_lengths(y_true, y_pred)
    return _mean([t == p for t, p in zip(y_true, y_pred, strict=True)])


def labels_of(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> list:
    """Sorted union of the labels seen, as scikit-learn orders them."""
    return sorted(set(y_true) | set(y_pred))


def confusion_matrix(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> list[list[int]]:
    """matrix[i][j] = number of items of true class labels[i] predicted as labels[j]."""
    _check_lengths(y_true, y_pred)
    labels = list(labels) if labels is not None else labels_of(y_true, y_pred)
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


def per_class(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> dict[Hashable, dict[str, float]]:
    """{label: {"precision", "recall", "f1", "support"}} (sklearn's precision_recall_fscore_support)."""
    labels = list(labels) if labels is not None else labels_of(y_true, y_pred)
    m = confusion_matrix(y_true, y_pred, labels)
    out = {}
    for i, label in enumerate(labels):
        tp = m[i][i]
        predicted = sum(row[i] for row in m)
        support = sum(m[i])
        precision = _ratio(tp, predicted)
        recall = _ratio(tp, support)
        out[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "support": support,
        }
    return out


def f1_macro(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Unweighted mean of per-class F1 over every label seen in y_true or y_pred."""
    return _mean([c["f1"] for c in per_class(y_true, y_pred).values()])


def f1_micro(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """F1 of the pooled counts; equals accuracy for single-label classification."""
    m = confusion_matrix(y_true, y_pred)
    tp = sum(m[i][i] for i in range(len(m)))
    total = sum(map(sum, m))
    # pooled precision = pooled recall = tp / total, so F1 is the same ratio
    return _ratio(tp, total)


def classification_report(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> dict:
    labels = labels_of(y_true, y_pred)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "f1_macro": f1_macro(y_true, y_pred),
        "f1_micro": f1_micro(y_true, y_pred),
        "per_class": {str(k): v for k, v in per_class(y_true, y_pred, labels).items()},
        "labels": [str(label) for label in labels],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels),
    }


# ---------------------------------------------------------------------------------------------- helpers


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")
