"""examples/customer_service: the dataset make_data.py writes (counts, determinism, held-out questions apart
from training, every answer stating its fact), and the whole pipeline — make_data, `lmforge finetune` with the
example's config cut to two steps, evaluate — run end to end on the real default model."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.data import sft

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "customer_service"


def load(name):
    spec = importlib.util.spec_from_file_location(f"customer_service_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data, evaluate = load("make_data"), load("evaluate")


def run(*args, home, timeout=120):
    env = {**os.environ, "LMFORGE_HOME": str(home), "LMFORGE_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("cs") / "data"
    run(EXAMPLE / "make_data.py", "--out", out, home=out.parent / "home")
    return out


def test_dataset_counts_facts_and_held_out_questions(data):
    facts = json.loads((data / "facts.json").read_text())
    assert len(facts) == 10
    keys = {topic: f["key_fact"] for topic, f in facts.items()}
    assert keys["returns"] == "30 days" and keys["shipping_cost"] == "$4.99"

    conversations, report = sft.read_jsonl(data / "train.jsonl", strict=True)
    assert report.kept == len(conversations) == 400
    turns = [[m for m in c if m["role"] != "system"] for c in conversations]
    assert all(c[0] == {"role": "system", "content": make_data.SYSTEM} for c in conversations)
    assert all(len(t) in (2, 4) for t in turns) and 50 < sum(len(t) == 4 for t in turns) < 150
    stated = {topic: 0 for topic in keys}
    for t in turns:
        for message in t[1::2]:
            found = [topic for topic, key in keys.items() if evaluate.has_fact(message["content"], key)]
            assert found, message  # every answer states a key fact
            for topic in found:
                stated[topic] += 1
    assert min(stated.values()) >= 40, stated  # every fact is taught, about equally

    val, report = sft.read_jsonl(data / "val.jsonl", strict=True)
    assert report.kept == 40
    assert not {json.dumps(c) for c in val} & {json.dumps(c) for c in conversations}  # none seen in training

    heldout = lines(data / "heldout.jsonl")
    assert len(heldout) == 60
    assert {topic: sum(r["topic"] == topic for r in heldout) for topic in keys} == dict.fromkeys(keys, 6)
    questions = [r["messages"][1]["content"] for r in heldout]
    assert len(set(questions)) == 60
    asked_in_training = {m["content"] for t in turns for m in t[0::2]}
    assert not set(questions) & asked_in_training
    answered_in_training = {m["content"] for t in turns for m in t[1::2]}
    for r in heldout:
        assert r["key_fact"] == keys[r["topic"]] and r["messages"][0]["content"] == make_data.SYSTEM
        assert evaluate.has_fact(r["messages"][2]["content"], r["key_fact"])
        assert r["messages"][2]["content"] not in answered_in_training
    for topic in keys:  # the held-out phrasings are other templates, not other fillings of the same ones
        assert not set(make_data.HELDOUT_QUESTIONS[topic]) & set(make_data.TRAIN_QUESTIONS[topic])


def test_dataset_is_deterministic_in_the_seed(data, tmp_path):
    for seed, same in ((0, True), (1, False)):
        out = tmp_path / f"seed{seed}"
        run(EXAMPLE / "make_data.py", "--out", out, "--seed", seed, home=tmp_path / "home")
        for name in ("train.jsonl", "val.jsonl", "heldout.jsonl"):
            assert ((out / name).read_bytes() == (data / name).read_bytes()) is same, (seed, name)


def test_key_fact_match():
    assert evaluate.has_fact("Standard shipping costs $4.99 per order.", "$4.99")
    assert evaluate.has_fact("Delivery takes 3\u20135 Business Days.", "3-5 business days")
    assert evaluate.has_fact("Write to HELP@lumenandoak.com.", "help@lumenandoak.com")
    assert not evaluate.has_fact("Orders over $500 ship free.", "$50")
    assert not evaluate.has_fact("You have 130 days.", "30 days")
    assert not evaluate.has_fact("It costs 4.99.", "$4.99")


def test_pipeline_runs_end_to_end(tmp_path, smollm2_gguf):
    """make_data -> `lmforge finetune` (the example's config, two steps) -> evaluate on a few questions."""
    home, data = tmp_path / "home", tmp_path / "data"
    run(EXAMPLE / "make_data.py", "--out", data, "--train", 40, "--val", 8, home=home)
    overrides = [
        f"init_from={smollm2_gguf}",
        f"data={data / 'train.jsonl'}",
        f"val_data={data / 'val.jsonl'}",
    ]
    overrides += [f"out_dir={tmp_path / 'run'}"]
    overrides += ["max_steps=2", "batch_size=2", "eval_every=0", "tensorboard=false", "threads=1"]
    proc = run("-m", "lmforge", "finetune", EXAMPLE / "finetune.yaml", *overrides, home=home)
    assert "model stored as 'customer-service'" in proc.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    out = tmp_path / "results.json"
    args = ["--base", smollm2_gguf, "--data", data, "--out", out, "--limit", 4, "--max-tokens", 8]
    proc = run(EXAMPLE / "evaluate.py", *args, "--threads", 1, home=home)
    assert "| fine-tuned: customer-service |" in proc.stdout
    results = json.loads(out.read_text())
    base, tuned = results["base"], results["tuned"]
    assert base["questions"] == tuned["questions"] == len(results["questions"]) == 4
    assert results["val_conversations"] == 4
    for key in ("val_loss", "heldout_loss"):
        assert math.isfinite(base[key]) and math.isfinite(tuned[key])
    assert tuned["val_loss"] < base["val_loss"]  # two small steps already move towards the shop's answers
    assert len({q["topic"] for q in results["questions"]}) == 4  # --limit spreads over the topics
    for q in results["questions"]:
        assert q["base_match"] == evaluate.has_fact(q["base_answer"], q["key_fact"])
        assert q["tuned_match"] == evaluate.has_fact(q["tuned_answer"], q["key_fact"])
