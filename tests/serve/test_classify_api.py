"""POST /v1/classifications over real HTTP (uvicorn on 127.0.0.1) with a real engine Classifier (a tiny random
llama with SmolLM2's tokenizer): the response shape, probabilities equal to the classifier's own, usage, and
OpenAI-shaped errors. The generation engine is the fake one: this route does not use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import torch

from lmforge import checkpoint
from lmforge.data.labels import encode_texts
from lmforge.engine import Classifier
from lmforge.errors import UserError
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model
from lmforge.serve import auth, metering
from lmforge.serve.app import create_app
from lmforge.serve.routes.classify import ServedClassifier, classification_usage, load_served
from lmforge.serve.settings import Settings
from tests.serve.conftest import assert_ledger_consistent
from tests.serve.fake_engine import FakeEngine
from tests.serve.servers import bearer, free_port, ledger_rows, serving_app, wait_ready

LABELS = ["billing", "shipping", "technical"]
MAX_SEQ_LEN = 32


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    """A random 2-layer llama classifier saved as an HF folder (head scaled up so the labels differ clearly)."""
    cfg = ModelConfig(
        arch="llama", vocab_size=49152, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64,
        max_seq_len=MAX_SEQ_LEN, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SequenceClassifier(build_model(cfg), LABELS, pad_token_id=2)
    model.init_head(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.score.weight.mul_(100)
    return checkpoint.save(tmp_path_factory.mktemp("clf") / "tickets", model, tokenizer)


@pytest.fixture(scope="module")
def served(folder) -> ServedClassifier:
    served = load_served(f"tickets={folder}", "cpu", "float32")
    assert served.name == "tickets" and served.classifier.labels == tuple(LABELS)
    return served


@pytest.fixture(scope="module")
def base_url(served, tokenizer) -> Iterator[str]:
    app = create_app(Settings(model_name="smollm2-test"), FakeEngine(), tokenizer, classifier=served)
    with serving_app(app) as url:
        yield url


@pytest.fixture
def http(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def expected(served: ServedClassifier, texts: list[str]) -> list[dict[str, float]]:
    """The classifier's own answer on the texts tokenised as in training."""
    return served.classifier.classify(encode_texts(served.tokenizer, texts))


def test_one_text(http, served):
    text = "Hello, my parcel never arrived."
    r = http.post("/v1/classifications", json={"model": "tickets", "input": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "model", "data", "usage"}
    assert body["object"] == "classification" and body["model"] == "tickets" and body["id"].startswith("clf-")
    [item] = body["data"]
    want = expected(served, [text])[0]
    assert item["index"] == 0 and list(item["scores"]) == LABELS
    assert item["scores"] == pytest.approx(want, abs=1e-6) and sum(item["scores"].values()) == pytest.approx(
        1
    )
    assert item["label"] == max(want, key=want.get) and item["score"] == item["scores"][item["label"]]
    n = len(served.tokenizer.encode(text))
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


def test_a_batch_keeps_the_input_order_and_equals_one_by_one(http, served):
    texts = ["refund please", "the app crashes every time I open the settings page", "where is it", "x"]
    r = http.post("/v1/classifications", json={"model": "tickets", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3]
    for d, text in zip(data, texts, strict=True):
        alone = expected(served, [text])[0]  # unpadded, one at a time
        assert d["scores"] == pytest.approx(alone, abs=1e-5)
    labels_seen = {d["label"] for d in data}
    assert labels_seen <= set(LABELS)
    prompts = encode_texts(served.tokenizer, texts)
    assert r.json()["usage"] == classification_usage(prompts).model_dump()
    assert r.json()["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = "input") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"] == param
    return err["message"]


def test_unknown_model_is_404(http):
    r = http.post("/v1/classifications", json={"model": "smollm2-test", "input": "hi"})
    message = _error(r, 404, "model_not_found", "model")
    assert message == "The model 'smollm2-test' does not exist; this server classifies with 'tickets'."


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("", "The input is empty."),
        ("   ", "The input is empty."),
        ([], "The input is empty; give a string or a non-empty list of strings."),
        (["fine", ""], "Input 1 is empty."),
    ],
)
def test_empty_input_is_400(http, payload, message):
    r = http.post("/v1/classifications", json={"model": "tickets", "input": payload})
    assert _error(r, 400) == message


def test_too_long_and_badly_typed_inputs_are_400(http):
    r = http.post("/v1/classifications", json={"model": "tickets", "input": ["ok", "word " * 40]})
    message = _error(r, 400, "context_length_exceeded")
    assert message.startswith(
        f"This model's maximum context length is {MAX_SEQ_LEN} tokens. However, input 1"
    )
    r = http.post("/v1/classifications", json={"model": "tickets", "input": 5})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")  # the union's member named
    r = http.post("/v1/classifications", json={"input": "hi"})
    _error(r, 400, "invalid_value", "model")


def test_a_server_without_a_classifier_says_so(tokenizer):
    app = create_app(Settings(model_name="smollm2-test"), FakeEngine(), tokenizer)
    with serving_app(app) as url:
        r = httpx.post(f"{url}/v1/classifications", json={"model": "tickets", "input": "hi"})
        assert _error(r, 404, "model_not_found", "model").endswith("this server serves no classifier.")


def test_load_served_refuses_bad_specs_and_language_models(tokenizer, tmp_path):
    with pytest.raises(UserError, match="--classifier takes NAME=PATH"):
        load_served("tickets")
    lm = ModelConfig(arch="llama", vocab_size=49152, n_layer=1, n_head=2, n_embd=16, max_seq_len=16)
    folder = checkpoint.save(tmp_path / "lm", build_model(lm), tokenizer)
    with pytest.raises(UserError, match="is a language model, not a classifier"):
        load_served(f"x={folder}")
    assert load_served(None) is None


def test_classifier_batches_and_checks_its_inputs(served):
    clf = Classifier(served.classifier.model, max_batch=2)  # several batches of sorted lengths
    prompts = encode_texts(served.tokenizer, ["a b c d e f", "x", "refund my order now", "hello there"])
    one_by_one = [clf.classify([p])[0] for p in prompts]
    for got, want in zip(clf.classify(prompts), one_by_one, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(UserError, match="input 1 has 0 tokens"):
        clf.classify([[5], []])
    with pytest.raises(UserError, match="outside the vocabulary"):
        clf.classify([[49152]])


@pytest.mark.parametrize("lm", [True, False], ids=["beside-an-lm", "gateway"])
def test_lmforge_serve_with_a_classifier(lm, folder, served, tokenizer, tmp_path):
    """`lmforge serve LM --classifier NAME=PATH` over loopback: the classifier answers beside the LM, or alone in
    a gateway (`--no-model`)."""
    config = ModelConfig(arch="llama", vocab_size=49152, n_layer=1, n_head=2, n_embd=16, max_seq_len=64)
    model = [str(checkpoint.save(tmp_path / "lm", build_model(config), tokenizer))] if lm else ["--no-model"]
    port = free_port()
    env = {**os.environ, "LMFORGE_THREADS": "1", "LMFORGE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "lmforge", "serve", *model, "--port", str(port), "--no-auth",
           "--log-level", "warning", "--classifier", f"tickets={folder}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, proc.stdout.read, poll_s=0.2)
        texts = ["where is my parcel", "refund"]
        r = httpx.post(url + "/v1/classifications", json={"model": "tickets", "input": texts}, timeout=30)
        assert r.status_code == 200, r.text
        for item, want in zip(r.json()["data"], expected(served, texts), strict=True):
            assert item["scores"] == pytest.approx(want, abs=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    if not lm:
        return
    bad = subprocess.run(
        [*cmd[:-2], "--classifier", "tickets"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "lmforge: error: --classifier takes NAME=PATH (a classifier folder), got 'tickets'"
    ]


def test_metered_classification_bills_the_usage_the_client_got(served, tokenizer, database, monkeypatch):
    """On a metered server a classification is admitted (rate limits, the budget hold of its prompt tokens)
    before the classifier runs and settled with the usage the client is told; /v1/models lists the classifier."""
    app = create_app(
        Settings(model_name="smollm2-test"), FakeEngine(), tokenizer, db=database, classifier=served
    )
    auth.create_tenant(database, "acme")
    _, secret = auth.create_key(database, "acme", rpm=10)
    headers = bearer(secret)
    metering.set_price(database, "tickets", input_usd="2", output_usd="3")
    texts = ["where is my parcel", "refund please"]
    with serving_app(app) as url:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            models = http.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["smollm2-test", "tickets"]
            assert models[1]["max_model_len"] == MAX_SEQ_LEN and models[1]["owned_by"] == "lmforge"

            r = http.post("/v1/classifications", json={"model": "tickets", "input": texts})
            assert r.status_code == 200, r.text
            told, first_id = r.json()["usage"], r.json()["id"]
            assert told["prompt_tokens"] == sum(len(p) for p in encode_texts(served.tokenizer, texts))
            assert r.headers["x-ratelimit-remaining-requests"] == "9"
            assert (
                http.post("/v1/classifications", json={"model": "tickets", "input": "x"}).status_code == 200
            )

            # the budget is checked before the classifier runs: what is left fits no more requests
            metering.set_budget(database, "acme", metering.format_usd(told["prompt_tokens"] * 2_000_000))
            r = http.post("/v1/classifications", json={"model": "tickets", "input": texts})
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"

            metering.set_budget(database, "acme", "1")

            def broken(prompts):  # a fault inside the classifier, after the request was admitted
                raise RuntimeError("classifier exploded")

            monkeypatch.setattr(served.classifier, "classify", broken)
            r = http.post("/v1/classifications", json={"model": "tickets", "input": "hi"})
            assert r.status_code == 500
    rows = ledger_rows(database)
    assert [(x.model, x.status) for x in rows] == [("tickets", "completed")] * 2 + [("tickets", "failed")]
    first = rows[0]
    assert first.request_id == first_id
    assert (first.prompt_tokens, first.completion_tokens) == (told["prompt_tokens"], 0)
    assert first.cost_pusd == told["prompt_tokens"] * 2_000_000
    assert (rows[2].prompt_tokens, rows[2].completion_tokens, rows[2].cost_pusd) == (0, 0, 0)
    assert "classifier exploded" in rows[2].error
    assert_ledger_consistent(database)
