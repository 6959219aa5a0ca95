"""Fine-tuning on chat data: a tiny random llama with SmolLM2's tokenizer learns a handful of synthetic
conversations (full and LoRA), the loss comes from the assistant tokens only, and bad lines are reported."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmforge import checkpoint, config_io
from lmforge.data import chat_format, sft
from lmforge.data.tokenizer import pad_id_of
from lmforge.errors import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import build_model
from lmforge.models.lora import ADAPTER_WEIGHTS, load_adapter
from lmforge.train import finetune
from lmforge.train.losses import next_token_loss
from tests.train.conftest import REPO, assert_user_error, cli, losses

RECIPE = REPO / "recipes" / "debug" / "finetune-tiny.yaml"
COLOURS = "red green blue yellow black white".split()


@pytest.fixture(scope="module")
def tiny_chat_model(smollm2, tmp_path_factory):
    """A random 2-layer llama with SmolLM2's tokenizer and chat template, as an HF folder."""
    cfg = ModelConfig(
        arch="llama",
        vocab_size=smollm2.config.vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=32,
        intermediate_size=64,
        max_seq_len=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    checkpoint.save(folder, model, smollm2.tokenizer)
    return folder


def conversation(rng: random.Random) -> dict:
    colour = rng.choice(COLOURS)
    messages = [{"role": "user", "content": f"Say {colour}."}, {"role": "assistant", "content": colour}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": "Repeat the colour."})
    return {"messages": messages}


def write_data(path, n=24, bad=()):
    rng = random.Random(0)
    lines = [json.dumps(conversation(rng)) for _ in range(n)]
    for at, text in bad:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path, model, **overrides) -> finetune.FinetuneConfig:
    base = ["tensorboard=false", "threads=1", "max_steps=30", "seq_len=64", "eval_every=0", "batch_size=8"]
    base += ["optim.lr=2e-2", "optim.min_lr=2e-3"]
    items = [f"init_from={model}", f"data={tmp_path / 'chat.jsonl'}", f"out_dir={tmp_path / 'run'}", *base]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return config_io.load(finetune.FinetuneConfig, RECIPE, items)


def test_full_finetune_learns_and_reports_bad_lines(tmp_path, tiny_chat_model, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    bad = [
        (2, '{"messages": [{"role": "user"'),
        (5, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
    ]
    write_data(tmp_path / "chat.jsonl", bad=bad)
    result = finetune.run(config(tmp_path, tiny_chat_model, val_fraction=0.25, max_steps=60))
    assert result.steps == 60 and result.store_name == "finetune-tiny"
    curve = losses(result.run_dir)
    assert sum(curve[-5:]) / 5 < 0.5 * curve[0], curve
    assert result.val_loss is not None and result.val_loss < curve[0]
    assert "kept 24 of 26 conversations" in result.data_report
    assert "1 broken JSON (line 3)" in result.data_report
    assert "1 no assistant message (line 6)" in result.data_report
    saved = json.loads((result.run_dir / finetune.DATA_REPORT).read_text())
    assert saved["files"][0]["lines"] == {"broken_json": [3], "no_assistant": [6]}
    # the stored folder is a complete model that answers in the trained form: a colour, then end of turn
    ck = checkpoint.load(tmp_path / "home" / "models" / "finetune-tiny")
    tok = ck.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Say blue."}], add_generation_prompt=True)
    )
    with torch.no_grad():
        answer = int(ck.model(torch.tensor([prompt]))[0, -1].argmax())
        end = int(ck.model(torch.tensor([prompt + [answer]]))[0, -1].argmax())
    assert tok.decode([answer]) in COLOURS and tok.decode([end]) == "<|im_end|>"


def test_lora_finetune_saves_adapter_equal_to_merged_model(tmp_path, tiny_chat_model, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    write_data(tmp_path / "chat.jsonl")
    # a random model's logits are near zero; adapting the (untied) head lets a few steps move them
    targets = "[q_proj, v_proj, down_proj, lm_head]"
    lora = {"lora.r": 8, "lora.alpha": 16, "lora.target_modules": targets, "optim.lr": 5e-2}
    cfg = config(tmp_path, tiny_chat_model, method="lora", max_steps=30, **lora)
    result = finetune.run(cfg)
    curve = losses(result.run_dir)
    assert sum(curve[-5:]) / 5 < 0.7 * curve[0], curve
    assert (result.adapter_dir / "adapter_config.json").is_file()
    merged = checkpoint.load(result.model_dir).model
    base = checkpoint.load(tiny_chat_model).model
    assert load_adapter(base, result.adapter_dir).r == 8
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(ids) - base(ids)).abs().max()
        assert diff < 1e-4 * base(ids).abs().max(), diff
        assert not torch.allclose(merged(ids), checkpoint.load(tiny_chat_model).model(ids), atol=1e-4)


class Interrupted(Exception):
    pass


def test_lora_resume_is_bitwise_exact(tmp_path, tiny_chat_model, monkeypatch):
    """test_resume's property for LoRA: a run stopped after its step-4 checkpoint and resumed logs steps 5..8
    bitwise as an uninterrupted run does (LoRA dropout on, so the restored RNG state matters), and ends with
    the same adapter and the same merged model. The model/ folder holds merged weights; A and B come back
    from train_state/."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    write_data(tmp_path / "chat.jsonl")
    settings = {"method": "lora", "lora.dropout": 0.1, "lora.target_modules": "[q_proj, v_proj, lm_head]"}
    settings |= {"max_steps": 8, "grad_accum": 2, "checkpoint_every": 4, "eval_every": 2, "val_fraction": 0.2}
    whole = finetune.run(config(tmp_path, tiny_chat_model, out_dir=tmp_path / "whole", **settings))

    calls = 0

    def stopping_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 13:  # grad_accum 2: the first micro-step of step 7, past the step-4 checkpoint
            raise Interrupted
        return next_token_loss(model, batch)

    cfg = config(tmp_path, tiny_chat_model, out_dir=tmp_path / "stopped", **settings)
    monkeypatch.setattr(finetune, "next_token_loss", stopping_loss)
    with pytest.raises(Interrupted):
        finetune.run(cfg)
    monkeypatch.setattr(finetune, "next_token_loss", next_token_loss)
    assert [r["step"] for r in metrics(tmp_path / "stopped")] == list(range(1, 7))
    resumed = finetune.run(cfg, resume=True)

    a, b = metrics(whole.run_dir), metrics(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra, rb)
        assert ra.get("val_loss") == rb.get("val_loss"), (ra, rb)
    assert whole.val_loss == resumed.val_loss
    for name, tensor in load_file(whole.adapter_dir / ADAPTER_WEIGHTS).items():
        assert torch.equal(tensor, load_file(resumed.adapter_dir / ADAPTER_WEIGHTS)[name]), name
    merged_a, merged_b = (load_file(r.model_dir / "model.safetensors") for r in (whole, resumed))
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)
    # every step's tokens are its conversations' real tokens, padding excluded
    assert tokens_logged(resumed.model_dir) == tokens_logged(whole.model_dir) == sft_tokens(cfg, 8)

    other = config(tmp_path, tiny_chat_model, out_dir=tmp_path / "stopped", **settings | {"lora.r": 4})
    with pytest.raises(UserError, match="trained other parameters than this run"):
        finetune.run(other, resume=True)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tokens_logged(model_dir) -> int:
    return json.loads((model_dir / "lmforge.json").read_text())["metrics"]["tokens"]


def sft_tokens(cfg, steps) -> int:
    """The non-padding tokens of the first `steps` optimizer steps of cfg's run, counted from its batches."""
    data = finetune.load_data(cfg, checkpoint.load(cfg.init_from).tokenizer)
    pad = -1  # an id no conversation holds, so padding is exactly the positions that equal it
    batches = sft.SFTBatches(data.train, cfg.batch_size, pad_id=pad, seed=cfg.seed)
    return sum(int((batches.next_batch()[0] != pad).sum()) for _ in range(steps * cfg.grad_accum))


def test_loss_comes_from_assistant_tokens_only(smollm2, tiny_chat_model):
    tok = smollm2.tokenizer
    model = checkpoint.load(tiny_chat_model).model
    rng = random.Random(1)
    convs = [conversation(rng)["messages"] + [{"role": "user", "content": "Again"}] for _ in range(3)]
    convs[0] += [{"role": "assistant", "content": "again and again"}]
    examples = sft.tokenize(convs, tok, seq_len=64)
    x, y = sft.collate(examples, pad_id=pad_id_of(tok))
    loss = next_token_loss(model, (x, y))
    # by hand: mean of -log p(next token) over the positions whose next token is an assistant token
    logp = torch.log_softmax(model(x).detach(), dim=-1)
    terms = []
    for row, messages in enumerate(convs):
        ids, mask = chat_format.tokenize_conversation(tok, messages)
        terms += [-logp[row, t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    # no gradient reaches the logits of user, system, header or padding positions
    logits = model(x).detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    untrained = y == -100
    assert logits.grad[untrained].abs().max() == 0 and logits.grad[~untrained].abs().sum(-1).min() > 0


def test_full_finetune_resumes(tmp_path, tiny_chat_model, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    write_data(tmp_path / "chat.jsonl")
    first = finetune.run(config(tmp_path, tiny_chat_model, max_steps=4))
    again = finetune.run(config(tmp_path, tiny_chat_model, max_steps=6), resume=True)
    assert (first.steps, again.steps) == (4, 6)
    assert len(losses(again.run_dir)) == 6


def test_cli_finetune_and_clear_data_errors(tmp_path, tiny_chat_model):
    write_data(tmp_path / "chat.jsonl", n=6, bad=[(0, "oops")])
    args = ["finetune", RECIPE, f"init_from={tiny_chat_model}", f"data={tmp_path / 'chat.jsonl'}"]
    args += [f"out_dir={tmp_path / 'run'}", "max_steps=2", "seq_len=64", "eval_every=0"]
    proc = cli(*args, cwd=tmp_path, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept 6 of 7 conversations; skipped 1 broken JSON (line 1)" in proc.stdout
    assert "model stored as 'finetune-tiny'" in proc.stdout
    proc = cli(*args, "strict_data=true", cwd=tmp_path, home=tmp_path / "home")
    assert_user_error(proc, "broken JSON (line 1)")
    proc = cli(*args, "method=qlora", cwd=tmp_path, home=tmp_path / "home")
    assert_user_error(proc, "method must be one of full, lora")
