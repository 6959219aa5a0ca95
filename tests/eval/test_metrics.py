"""Metric functions against their independent references: scikit-learn and sacrebleu."""

import random

import pytest
import sacrebleu
from sklearn import metrics as skm

from lmforge.eval import metrics


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_equal_sklearn(seed):
    rng = random.Random(seed)
    labels = ["neg", "neu", "pos", "spam"][: rng.randint(2, 4)]
    y_true = [rng.choice(labels) for _ in range(60)]
    # a label only predicted, never true, on some seeds: exercises zero-division handling
    y_pred = [rng.choice([*labels, "other"] if seed % 2 else labels) for _ in range(60)]

    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert metrics.f1_macro(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    assert metrics.f1_micro(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, average="micro", zero_division=0)
    )
    order = metrics.labels_of(y_true, y_pred)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=order, zero_division=0)
    ours = metrics.per_class(y_true, y_pred)
    assert list(ours) == order
    for i, label in enumerate(order):
        assert ours[label]["precision"] == pytest.approx(p[i])
        assert ours[label]["recall"] == pytest.approx(r[i])
        assert ours[label]["f1"] == pytest.approx(f[i])
        assert ours[label]["support"] == s[i]
    assert (
        metrics.confusion_matrix(y_true, y_pred)
        == skm.confusion_matrix(y_true, y_pred, labels=order).tolist()
    )


def test_classification_report_integer_labels():
    report = metrics.classification_report([0, 1, 1, 2], [0, 1, 2, 2])
    assert report["accuracy"] == 0.75
    assert report["labels"] == ["0", "1", "2"]
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_exact_and_contains_match_hand_cases():
    preds = [" 42\n", "The answer is 42.", "42", "4", "Paris "]
    refs = ["42", "42", "43", "42", " Paris"]
    # stripped equality: " 42\n" and "Paris " match; the sentence does not
    assert metrics.exact_match(preds, refs) == pytest.approx(2 / 5)
    # containment: the sentence contains "42"; "4" does not contain "42"
    assert metrics.contains_match(preds, refs) == pytest.approx(3 / 5)
    assert metrics.exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metrics.exact_match(["a", "b"], ["a"])


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    preds = ["the cat sat on the mat", "a dog barked loudly", "hello world"]
    refs = ["the cat is on the mat", "the dog barked loudly", "hello there world"]
    assert metrics.bleu(preds, refs) == sacrebleu.corpus_bleu(preds, [refs]).score
    assert metrics.chrf(preds, refs) == sacrebleu.corpus_chrf(preds, [refs]).score
    zh_p, zh_r = ["我喜欢茶。", "早上好"], ["我喜欢喝茶。", "早上好。"]
    assert metrics.bleu(zh_p, zh_r, tokenize="zh") == sacrebleu.corpus_bleu(zh_p, [zh_r], tokenize="zh").score
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)


def test_choose_acc_and_acc_norm_by_bytes():
    # choice 0 has the higher total logprob, choice 1 the higher logprob per byte
    assert metrics.choose([-4.0, -6.0], [2, 6]) == (0, 1)
    # bytes, not characters: "日本" is 6 UTF-8 bytes, so -3 / 6 beats -2 / 2
    assert metrics.choose([-2.0, -3.0], [len(b"ab"), len("日本".encode())]) == (0, 1)
    assert metrics.choose([-1.0, -1.0], [3, 3]) == (0, 0)  # ties go to the first choice
