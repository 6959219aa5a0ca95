"""Classification fine-tuning: the real default model (SmolLM2-135M-Instruct) learns a synthetic ticket-routing
task with LoRA through the one loop; its metrics equal scikit-learn's on its own predictions; bad lines and an
unseen label are reported; the saved folder is transformers' LlamaForSequenceClassification (same logits),
served back by the engine's Classifier and `lmforge classify`. Tiny random models check pooling, the HF layout
for llama and GPT-2, and exact resume."""

import csv
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge import checkpoint, config_io
from lmforge.data import labels
from lmforge.data.tokenizer import Tokenizer
from lmforge.engine import Classifier
from lmforge.errors import UserError
from lmforge.eval import classification
from lmforge.models.classifier import SequenceClassifier, pool
from lmforge.models.config import ModelConfig, gpt2_config
from lmforge.models.gpt import build_model
from lmforge.train import classify, finetune
from tests.train.conftest import REPO, assert_user_error, cli, losses

RECIPE = REPO / "recipes" / "debug" / "finetune-tiny.yaml"
LABELS = ["billing", "shipping", "technical"]
VOCAB = 49152  # SmolLM2's tokenizer, which the tiny models share
OPENERS = ["", "Hi, ", "Hello, ", "Hey team, ", "Good morning, ", "Please help: ", "Urgent: "]
CLOSERS = ["", " Thanks.", " Please advise.", " Can you help?", " This is frustrating.", " Regards."]
PHRASES = {
    "billing": [
        "I was charged twice for my order",
        "my invoice shows the wrong amount",
        "please refund the payment",
        "my credit card was billed again",
        "the price on my receipt is wrong",
        "I need a refund for the subscription fee",
    ],
    "shipping": [
        "my parcel has not arrived yet",
        "the package went to the wrong address",
        "where is my delivery",
        "the courier lost my shipment",
        "tracking shows no update for my parcel",
        "the box arrived damaged in transit",
    ],
    "technical": [
        "the app crashes when I log in",
        "I cannot reset my password",
        "the website shows an error page",
        "the login button does nothing",
        "the app freezes after the update",
        "I get an error code when I sync",
    ],
}


def tickets(n: int, seed: int) -> list[dict]:
    """Support tickets routed by topic: each label has its own phrases, wrapped in shared greetings/closers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        text = rng.choice(OPENERS) + rng.choice(PHRASES[label]) + "." + rng.choice(CLOSERS)
        out.append({"text": text, "label": label})
    return out


def write_train(path: Path, n: int = 240) -> Path:
    lines = [json.dumps(t) for t in tickets(n, seed=0)]
    lines.insert(4, '{"text": "cut off')  # line 5: broken JSON
    lines.insert(9, json.dumps({"text": "my order is late"}))  # line 10: no label
    lines.insert(19, json.dumps({"text": "  ", "label": "billing"}))  # line 20: empty text
    path.write_text("\n".join(lines) + "\n")
    return path


def write_val(path: Path, n: int = 60) -> Path:
    rows = [[t["text"], t["label"]] for t in tickets(n, seed=1)]
    rows.insert(2, ["Can I change my plan?", "sales"])  # line 4: a label training never had
    rows.insert(6, ["", "billing"])  # line 8: empty text
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def config(init_from, data, out_dir, **overrides) -> finetune.FinetuneConfig:
    items = [
        f"init_from={init_from}",
        f"data={data}",
        f"out_dir={out_dir}",
        "task=classification",
        "eval_every=0",
    ]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return config_io.load(finetune.FinetuneConfig, RECIPE, items)


@pytest.fixture(scope="module")
def trained(smollm2_gguf, tmp_path_factory):
    """One LoRA run from the real default model: 16 steps of 16 tickets, last-token pooling."""
    root = tmp_path_factory.mktemp("classify")
    train, val = write_train(root / "train.jsonl"), write_val(root / "val.csv")
    settings = {"method": "lora", "lora.r": 8, "lora.alpha": 16, "max_steps": 16, "batch_size": 16}
    settings |= {"seq_len": 64, "optim.lr": 3e-3, "optim.min_lr": 3e-4, "name": "tickets", "val_data": val}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(root / "home"))
        result = finetune.run(config(smollm2_gguf, train, root / "run", **settings))
    return SimpleNamespace(result=result, root=root, val=val, home=root / "home")


def test_lora_classifier_reaches_high_accuracy(trained):
    r = trained.result
    assert isinstance(r, classify.ClassifyResult)
    assert r.steps == 16 and r.stopped == "max_steps" and r.labels == tuple(LABELS)
    assert r.store_name == "tickets"
    curve = losses(r.run_dir)
    assert curve[-1] < 0.2 * curve[0], curve
    report = json.loads((r.run_dir / classification.REPORT).read_text())
    assert report == r.metrics
    assert report["examples"] == 60 and report["labels"] == LABELS
    assert report["accuracy"] >= 0.9, report
    assert report["f1_macro"] >= 0.9, report


def test_metrics_equal_scikit_learn_on_the_same_predictions(trained):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    run_dir = trained.result.run_dir
    report = json.loads((run_dir / classification.REPORT).read_text())
    rows = [json.loads(line) for line in (run_dir / classification.PREDICTIONS).read_text().splitlines()]
    assert len(rows) == 60 and {r["prediction"] for r in rows} <= set(LABELS)
    y_true, y_pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert report["accuracy"] == sklearn_metrics.accuracy_score(y_true, y_pred)
    assert report["f1_macro"] == sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
    p, rc, f, s = sklearn_metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, zero_division=0
    )
    for i, label in enumerate(LABELS):
        assert report["per_class"][label] == {
            "precision": p[i],
            "recall": rc[i],
            "f1": f[i],
            "support": int(s[i]),
        }
    assert (
        report["confusion_matrix"] == sklearn_metrics.confusion_matrix(y_true, y_pred, labels=LABELS).tolist()
    )
    # the confusion matrix is also a PNG
    import matplotlib.image

    png = run_dir / classification.CONFUSION_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[0] > 100
    assert not list(run_dir.glob(".*.tmp*"))  # written atomically: no temporary file left


def test_bad_lines_and_unseen_label_are_reported(trained):
    r = trained.result
    train, val = trained.root / "train.jsonl", trained.val
    assert r.data_report == (
        f"{train}: kept 240 of 243 examples; skipped 1 broken JSON (line 5), 1 missing label (line 10), "
        f"1 empty text (line 20); {val}: kept 60 of 62 examples; skipped 1 label never seen in training "
        "(line 4), 1 empty text (line 8)"
    )
    report = json.loads((r.run_dir / finetune.DATA_REPORT).read_text())
    assert [f["skipped"] for f in report["files"]] == [
        {"broken_json": 1, "no_label": 1, "empty_text": 1},
        {"unknown_label": 1, "empty_text": 1},
    ]
    assert report["files"][1]["details"]["4"] == (
        "label 'sales' is not one of the training labels (billing, shipping, technical)"
    )


def test_saved_folder_is_a_transformers_sequence_classifier(trained):
    transformers = pytest.importorskip("transformers")
    model_dir = trained.result.model_dir
    hf_config = json.loads((model_dir / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "billing", "1": "shipping", "2": "technical"}
    assert (
        hf_config["label2id"] == {"billing": 0, "shipping": 1, "technical": 2}
        and hf_config["num_labels"] == 3
    )
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.id2label[1] == "shipping"

    ours = Classifier.load(model_dir, "cpu", "float32")
    texts = [t["text"] for t in tickets(6, seed=7)] + ["Thanks <|im_end|> for nothing"]
    ids = labels.encode_texts(Tokenizer.from_folder(model_dir), texts)
    lengths = torch.tensor([len(x) for x in ids])
    x = torch.full((len(ids), int(lengths.max())), hf.config.pad_token_id)
    for row, seq in enumerate(ids):
        x[row, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        expected = torch.cat([hf(input_ids=torch.tensor([seq])).logits for seq in ids])  # one text at a time
        batched = hf(input_ids=x, attention_mask=(x != hf.config.pad_token_id).long()).logits
        got = ours.model(x, lengths)
    assert (got - expected).abs().max() < 1e-4, (got - expected).abs().max()
    assert (got - batched).abs().max() < 1e-4
    for p, row in zip(ours.classify(ids), torch.softmax(expected, -1).tolist(), strict=True):
        assert (
            list(p) == LABELS and max(abs(p[label] - q) for label, q in zip(LABELS, row, strict=True)) < 1e-5
        )

    # reloaded, the classifier gives the predictions the run reported for the validation set
    rows = [
        json.loads(line)
        for line in (trained.result.run_dir / classification.PREDICTIONS).read_text().splitlines()
    ]
    again = ours.classify(labels.encode_texts(Tokenizer.from_folder(model_dir), [r["text"] for r in rows]))
    for row, p in zip(rows, again, strict=True):
        assert (
            max(p, key=p.get) == row["prediction"] and abs(p[row["prediction"]] - row["probability"]) < 1e-5
        )


def test_cli_classify_text_and_labelled_file(trained):
    text = "Hello, the courier lost my shipment. Thanks."
    proc = cli("classify", "tickets", text, "--top-k", "3", cwd=trained.root, home=trained.home, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    ours = Classifier.load(trained.result.model_dir, "cpu", "float32")
    probs = ours.classify(labels.encode_texts(Tokenizer.from_folder(trained.result.model_dir), [text]))[0]
    expected = sorted(probs.items(), key=lambda kv: -kv[1])
    assert [label for label, _ in lines] == [label for label, _ in expected] and lines[0][0] == "shipping"
    assert [float(p) for _, p in lines] == [round(p, 4) for _, p in expected]

    out = trained.root / "eval"
    proc = cli(
        "classify", "tickets", "--data", trained.val, "--out", out, cwd=trained.root, home=trained.home
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 label never seen in training (line 4), 1 empty text (line 8)" in proc.stdout
    report = json.loads((out / classification.REPORT).read_text())
    run_report = trained.result.metrics
    for key in ("accuracy", "f1_macro", "per_class", "confusion_matrix", "labels", "examples"):
        assert report[key] == run_report[key], key
    assert (out / classification.CONFUSION_PNG).is_file()

    proc = cli("generate", "tickets", "Hello", cwd=trained.root, home=trained.home)
    assert_user_error(
        proc, "tickets is a text classifier, not a language model; use `lmforge classify tickets"
    )

    # `lmforge eval` scores a classifier the same way, and refuses it language-model tasks in one line
    out = trained.root / "eval-run"
    proc = cli("eval", "tickets", "--task", "classification", "--data", trained.val, "--out", out, "--json",
               cwd=trained.root, home=trained.home)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (task,) = json.loads(proc.stdout)["tasks"].values()
    assert task["main_metric"] == "accuracy" and task["metrics"] == {
        "accuracy": run_report["accuracy"], "f1_macro": run_report["f1_macro"], "examples": run_report["examples"]}  # fmt: skip
    assert json.loads(Path(task["report"]).read_text())["confusion_matrix"] == run_report["confusion_matrix"]
    assert "| classification:val | classification | accuracy |" in (out / "report.md").read_text()
    proc = cli("eval", "tickets", "--task", "wiki-ppl", cwd=trained.root, home=trained.home)
    assert_user_error(
        proc, "tickets is a text classifier, not a language model; evaluate it with `--task classification"
    )


# --------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tokenizer(smollm2_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


def tiny_llama(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        arch="llama", vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
        intermediate_size=64, max_seq_len=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def tiny_classifier(cfg: ModelConfig, pooling: str, seed: int = 0) -> SequenceClassifier:
    torch.manual_seed(seed)
    model = SequenceClassifier(build_model(cfg), LABELS, pooling=pooling, pad_token_id=2)
    model.init_head(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_ignores_padding_and_matches_its_definition(pooling):
    model = tiny_classifier(tiny_llama(300), pooling)
    seqs = [[5, 9, 33, 7], [12], [40, 41, 42, 43, 44, 45, 46]]
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((3, 7), 299)  # a pad id the texts never hold
    for row, s in enumerate(seqs):
        x[row, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        batched = model(x, lengths)
        alone = torch.cat([model(torch.tensor([s])) for s in seqs])
        assert (batched - alone).abs().max() < 1e-5
        hidden = model.model(torch.tensor([seqs[0]]))[0]  # (T, C)
        by_hand = hidden[-1] if pooling == "last" else hidden.mean(0)
        assert torch.allclose(model(torch.tensor([seqs[0]]))[0], model.score(by_hand), atol=1e-6)
    assert torch.equal(pool(torch.ones(1, 3, 2), torch.tensor([2]), "mean"), torch.ones(1, 2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_classifier_round_trips_through_transformers(family, tokenizer, tmp_path):
    """checkpoint.save writes transformers' names and config for each family; transformers computes our logits,
    and checkpoint.load reads the folder back to the same model."""
    transformers = pytest.importorskip("transformers")
    if family == "llama":
        cfg = tiny_llama(VOCAB)
    else:
        cfg = gpt2_config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, max_seq_len=64)
    model = tiny_classifier(cfg, "last", seed=3)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # logits far from zero, so a wrong mapping cannot pass
    folder = checkpoint.save(tmp_path / "clf", model, tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    expected_class = {"llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
    assert type(hf).__name__ == expected_class[family]
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = model(ids)
        back = checkpoint.load(folder).model(ids)
    assert (got - ref).abs().max() < 1e-4 and ref.abs().max() > 0.1
    assert torch.equal(back, got)


class Interrupted(Exception):
    pass


def test_resume_is_bitwise_exact(tokenizer, tmp_path, monkeypatch):
    """A full (every weight) classification run stopped after its step-3 checkpoint and resumed logs steps 4..6
    as an uninterrupted run does and ends with the same weights: the loop reads the classifier folder back."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    base = checkpoint.save(tmp_path / "base", build_model(tiny_llama(VOCAB)), tokenizer)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tickets(40, seed=2)))
    settings = {"max_steps": 6, "checkpoint_every": 3, "eval_every": 2, "val_fraction": 0.2, "batch_size": 4}
    settings |= {"pooling": "mean", "optim.lr": 1e-2, "method": "full", "tensorboard": "false"}
    whole = finetune.run(config(base, data, tmp_path / "whole", **settings))

    calls = 0

    def stopping_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 5:  # step 5, past the step-3 checkpoint
            raise Interrupted
        return loss_fn(model, batch)

    loss_fn = classify.classification_loss
    cfg = config(base, data, tmp_path / "stopped", **settings)
    monkeypatch.setattr(classify, "classification_loss", stopping_loss)
    with pytest.raises(Interrupted):
        finetune.run(cfg)
    steps_run = []

    def counting_loss(model, batch):
        steps_run.append(batch)
        return loss_fn(model, batch)

    monkeypatch.setattr(classify, "classification_loss", counting_loss)
    resumed = finetune.run(cfg, resume=True)
    assert len(steps_run) == 3  # steps 4..6 only: 1..3 came from the checkpoint
    a, b = (
        [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in (whole, resumed)
    )
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    wa, wb = (checkpoint.load(r.model_dir).model.state_dict() for r in (whole, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert whole.metrics == resumed.metrics


def test_config_and_data_errors_are_one_line(tmp_path, tokenizer):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "hello", "label": "greeting"}) + "\n")
    with pytest.raises(UserError, match="pooling must be one of last, mean"):
        config("m", data, tmp_path / "r", pooling="max")
    with pytest.raises(
        UserError, match="method=head trains a classification head; it needs task=classification"
    ):
        config_io.load(finetune.FinetuneConfig, RECIPE, ["init_from=m", "method=head"])
    cfg = config("m", data, tmp_path / "r", val_fraction=0.0)
    with pytest.raises(UserError, match=r"at least two labels in the training data, found \['greeting'\]"):
        classify.load_data(cfg, tokenizer)
    proc = cli("finetune", RECIPE, "task=classify", cwd=tmp_path, home=tmp_path / "home")
    assert_user_error(proc, "task must be one of chat, classification, got 'classify'")
