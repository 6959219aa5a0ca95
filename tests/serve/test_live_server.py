"""`lmforge serve` with the real engine and the default model, driven by the official openai SDK over loopback.

These are about serving, so the server runs open (`--no-auth`); metering has its own tests (test_metered_*).
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.servers import free_port, metric, wait_ready

openai = pytest.importorskip("openai")

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three fruits.", "Who wrote Hamlet?",
    "What is 12 times 7?", "Describe a cat.", "What is Python?", "Tell me a joke.", "How do birds fly?",
    "Name a famous painter.", "Why is the sky blue?", "Give me a tip for sleeping better.", "What is a noun?",
    "How many legs does a spider have?", "What is the opposite of cold?", "Suggest a name for a dog.",
]  # fmt: skip


class Server:
    def __init__(self, model, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LMFORGE_THREADS": "2"}
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--served-name", "smol",
               "--port", str(self.port), "--log-level", "warning", "--no-auth", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_ready(self.url, self.proc, self.proc.stdout.read)

    def metric(self, name: str) -> float:
        return metric(self.url, name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    srv = Server(smollm2_gguf)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_ids(tok, question):
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    )


def reference(smollm2, prompt_ids, n):
    from lmforge.engine.generate import generate
    from lmforge.engine.types import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0)
    ids = [t.id for t in generate(smollm2.model, prompt_ids, params, eos_ids=smollm2.eos_ids)]
    return smollm2.tokenizer.decode(ids, skip_special_tokens=True), ids


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["smol"]


def test_chat_sync_text_and_usage(client, smollm2):
    q = "What is the capital of France?"
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0
    )
    text, ids = reference(smollm2, chat_ids(smollm2.tokenizer, q), 12)
    assert resp.choices[0].message.content == text
    assert resp.usage.prompt_tokens == len(chat_ids(smollm2.tokenizer, q))
    assert resp.usage.completion_tokens == len(ids)
    assert resp.choices[0].finish_reason == ("stop" if ids[-1] in smollm2.eos_ids else "length")


def test_completion_sync_text_and_usage(client, smollm2):
    prompt = "The three primary colours are"
    resp = client.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0)
    text, ids = reference(smollm2, smollm2.tokenizer.encode(prompt), 10)
    assert resp.choices[0].text == text
    assert resp.usage.prompt_tokens == len(smollm2.tokenizer.encode(prompt))
    assert resp.usage.completion_tokens == 10 and resp.choices[0].finish_reason == "length"


def test_async_streaming_with_usage(server, smollm2):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Name a famous painter."}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(main())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref_text, ids = reference(smollm2, chat_ids(smollm2.tokenizer, "Name a famous painter."), 16)
    assert text == ref_text
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_sixteen_concurrent_streams_equal_each_alone(server, client):
    def one(q):
        stream = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [one(q) for q in QUESTIONS]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def stream_one(q):
            stream = await aclient.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": q}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        out = await asyncio.gather(*(stream_one(q) for q in QUESTIONS))
        await aclient.close()
        return out

    assert asyncio.run(together()) == alone


def test_disconnect_frees_the_sequence_within_a_second(server):
    body = {
        "model": "smol",
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        assert server.metric("lmforge_num_requests_running") == 1
    left = time.monotonic()
    while server.metric("lmforge_num_requests_running") != 0:
        assert time.monotonic() - left < 1.0, "the engine kept generating for a gone client"
        time.sleep(0.05)


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt=[1] * 9000, max_tokens=4)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and "8192" in err["message"] and "9000" in err["message"]


def test_bad_parameters_are_400(server):
    for body in (
        b"{not json",
        json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}
        ).encode(),
        json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}
        ).encode(),
        json.dumps({"model": "smol", "messages": "hi"}).encode(),
    ):
        r = httpx.post(
            server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_queue_full_429_and_graceful_sigterm(smollm2_gguf):
    # and the engine without packed weights (--no-pack-weights: the memory-saving configuration) serves alike
    srv = Server(
        smollm2_gguf, "--max-batch", "1", "--max-queue", "0", "--drain-timeout", "60", "--no-pack-weights"
    )
    try:
        body = {"model": "smol", "prompt": "Count with me: one, two,", "max_tokens": 40, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            busy = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
            assert busy.status_code == 429 and "retry-after" in busy.headers
            assert busy.json()["error"]["type"]
            srv.proc.send_signal(signal.SIGTERM)  # drain: the running stream still completes
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()


def test_disconnect_aborts_a_non_streamed_request(server):
    body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the server generates
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.5))
    left = time.monotonic()
    while server.metric("lmforge_num_requests_running") != 0:
        assert time.monotonic() - left < 1.0, "the engine kept generating for a gone client"
        time.sleep(0.05)
