"""`lmforge serve --lora NAME=PATH` with the real engine and the default model, driven by the official openai
SDK over loopback: adapters listed as models, chosen by `"model": "base:adapter"`, served side by side."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from lmforge.engine.types import SamplingParams
from tests.engine.test_lora_engine import alone, merged_model, write_adapter
from tests.serve.servers import free_port, wait_ready

openai = pytest.importorskip("openai")

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits."]


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    # the scales of tests/engine/test_lora_engine.py: every answer changes, greedy margins stay >= 0.03
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_adapter(
            smollm2.model, root / "a", ("q_proj", "v_proj", "gate_proj"), r=8, seed=1, std=0.05
        ),
        "b": write_adapter(
            smollm2.model, root / "b", ("o_proj", "up_proj", "down_proj"), r=4, seed=3, std=0.2
        ),
    }


@pytest.fixture(scope="module")
def server(smollm2_gguf, adapters):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lmforge", "serve", str(smollm2_gguf), "--served-name", "smol", "--no-auth",
           "--port", str(port), "--log-level", "warning",
           "--lora", f"a={adapters['a']}", "--lora", f"b={adapters['b']}"]  # fmt: skip
    env = {**os.environ, "LMFORGE_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_ready(url, proc, proc.stdout.read)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_lists_base_and_adapters(client):
    cards = client.models.list().data
    assert [c.id for c in cards] == ["smol", "smol:a", "smol:b"]
    base, a, _ = (c.model_dump() for c in cards)
    assert base["parent"] is None and base["root"] == "smol"
    assert a["parent"] == "smol" and a["root"] == "a" and a["max_model_len"] == base["max_model_len"]
    assert client.models.retrieve("smol:b").id == "smol:b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smol:c")


def test_unknown_adapter_is_404(client):
    for model in ("smol:c", "smol:", "other:a"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "model_not_found" and "'smol:a'" in e.value.body["message"]


def test_adapters_side_by_side_equal_alone_and_merged(server, client, smollm2, adapters):
    tok = smollm2.tokenizer
    jobs = [
        ("smol:a", QUESTIONS[0]),
        ("smol:b", QUESTIONS[1]),
        ("smol", QUESTIONS[2]),
        ("smol:a", QUESTIONS[1]),
    ]

    def ask(model, q):
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
        )
        assert resp.model == model
        return resp.choices[0].message.content

    served_alone = [ask(m, q) for m, q in jobs]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)

        async def stream_one(model, q):
            stream = await aclient.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            pieces, times = [], []
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    pieces.append(c.choices[0].delta.content)
                    times.append(time.monotonic())
            return "".join(pieces), times[0], times[-1]

        out = await asyncio.gather(*(stream_one(m, q) for m, q in jobs))
        await aclient.close()
        return out

    batched = asyncio.run(together())
    # they were generated at the same time: every stream's first token came before every stream's last
    assert max(first for _, first, _ in batched) < min(last for _, _, last in batched)
    assert [text for text, _, _ in batched] == served_alone

    params = SamplingParams(max_tokens=24, temperature=0)
    models = {
        "smol": smollm2.model,
        **{f"smol:{k}": merged_model(smollm2.model, f) for k, f in adapters.items()},
    }
    for (model, q), text in zip(jobs, served_alone, strict=True):
        prompt = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        )
        ref = alone(models[model], prompt, params, smollm2.eos_ids)
        assert text == tok.decode(ref, skip_special_tokens=True)
        if model != "smol":  # the adapter changed the answer
            assert ref != alone(smollm2.model, prompt, params, smollm2.eos_ids)


def test_bad_lora_option_exits_2(smollm2_gguf, tmp_path):
    # both checked before the model loads (a folder that is not an adapter: tests/models/test_lora.py)
    for spec, message in (("a", "NAME=PATH"), (f"a={tmp_path / 'nowhere'}", "PEFT adapter folder")):
        r = subprocess.run(
            [sys.executable, "-m", "lmforge", "serve", str(smollm2_gguf), "--no-auth", "--lora", spec],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
