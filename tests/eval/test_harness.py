"""End-to-end runs on the default model: reports, determinism, compare, and the multiple-choice rules."""

import json

import pytest

from lmforge.errors import UserError
from lmforge.eval import harness, tasks
from lmforge.eval.harness import EvalConfig


@pytest.fixture(scope="module")
def two_runs(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = dict(model="unused", tasks=("wiki-ppl", "shop-faq", "arith", "en-zh"), limit=2, progress=False)
    cfg |= dict(max_length=64, stride=32, num_fewshot=1, max_new_tokens=8, batch_size=4)
    a = harness.run(EvalConfig(**cfg, out=str(out / "a")), checkpoint=smollm2)
    b = harness.run(EvalConfig(**cfg, out=str(out / "b")), checkpoint=smollm2)
    return out, a, b


def test_rerun_gives_identical_numbers(two_runs):
    _, a, b = two_runs
    assert {k: v["metrics"] for k, v in a["tasks"].items()} == {
        k: v["metrics"] for k, v in b["tasks"].items()
    }
    assert a["tasks"]["wiki-ppl"]["metrics"]["bits_per_byte"] > 0
    assert a["tasks"]["shop-faq"]["metrics"]["num_items"] == 2
    assert set(a["tasks"]["arith"]["metrics"]) >= {"exact_match", "contains_match", "bleu", "chrf"}


def test_reports_and_compare(two_runs, tmp_path):
    out, a, _ = two_runs
    saved = json.loads((out / "a" / "results.json").read_text())
    assert saved["tasks"] == a["tasks"] and saved["config"]["seed"] == 1234
    report = (out / "a" / "report.md").read_text()
    assert "| shop-faq | multiple_choice | acc_norm |" in report and "Smoke-level" in report
    samples = [json.loads(line) for line in (out / "a" / "samples" / "en-zh.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "reference", "prediction"} <= set(samples[0])

    table = harness.compare([out / "a", out / "b"], tmp_path / "cmp.png")
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "wiki-ppl (bits_per_byte ↓)" in lines[0]
    assert f"{a['tasks']['shop-faq']['metrics']['acc_norm']:.4f}" in lines[2]
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="not an eval run folder"):
        harness.compare([tmp_path])


def test_multiple_choice_predictions_follow_acc_and_acc_norm(two_runs):
    out, a, _ = two_runs
    rows = [json.loads(line) for line in (out / "a" / "samples" / "shop-faq.jsonl").read_text().splitlines()]
    acc = acc_norm = 0
    for r in rows:
        lps = r["logprobs"]
        per_byte = [lp / len(c.encode("utf-8")) for lp, c in zip(lps, r["choices"], strict=True)]
        assert r["pred"] == lps.index(max(lps))
        assert r["pred_norm"] == per_byte.index(max(per_byte))
        assert r["context"].count("\n\n") >= 1  # one few-shot example before the question
        acc += r["pred"] == r["gold"]
        acc_norm += r["pred_norm"] == r["gold"]
    assert a["tasks"]["shop-faq"]["metrics"]["acc"] == acc / len(rows)
    assert a["tasks"]["shop-faq"]["metrics"]["acc_norm"] == acc_norm / len(rows)


def test_bad_inputs_fail_before_loading_the_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: field 'gold'"):
        harness.run(EvalConfig(model="missing", tasks=("multiple_choice",), data=(str(bad),)))
    cls = tmp_path / "cls.jsonl"
    cls.write_text('{"text": "great", "label": "pos"}\n')
    with pytest.raises(UserError, match="classification tasks need a classifier .* separate runs"):
        harness.run(EvalConfig(model="missing", tasks=("classification", "arith"), data=(str(cls),)))
    with pytest.raises(UserError, match="stride"):
        EvalConfig(model="m", tasks=("arith",), max_length=8, stride=9)


def test_truncate_at_stop_strings():
    assert harness.truncate(" 12\nQuestion: next", ("\n",)) == " 12"
    assert harness.truncate("no stop", ("\n",)) == "no stop"
    assert harness.truncate("a.b\nc", ("\n", ".")) == "a"
    assert tasks.BUILTIN["arith"].until == ("\n",)
