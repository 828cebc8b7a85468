"""The OpenAI-compatible server, through httpx and the official openai client, on a free local port."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.generate import generate
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.flover import Engine
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import RunnerFailure
from effdl.flover.server import create_app, serve_in_thread

TOK = ByteTokenizer()


def _serve(engine: AsyncEngine, name: str = "tiny"):
    return serve_in_thread(create_app(engine, name, TOK))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return m


@pytest.fixture(scope="module")
def served(model):
    engine = AsyncEngine(Engine(model, TOK, max_slots=4, max_len=256))
    with _serve(engine) as url:
        yield url, engine


def _expected(model, text: str, n: int) -> str:
    out = generate(model, TOK.encode(text), n)
    return TOK.decode(out[:-1] if out and out[-1] == model.config.eos_id else out)


def _sse(response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completion_streaming_and_not(model, served):
    url, _ = served
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 24, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["text"] == _expected(model, "def add(a, b):", 24)
    assert data["usage"]["prompt_tokens"] == len(TOK.encode("def add(a, b):"))
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = _sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == data["choices"][0]["text"]
    assert chunks[-1]["usage"] == data["usage"]


def test_token_id_prompt_and_logprobs(model, served):
    url, _ = served
    prompt = TOK.encode("import os")
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                         "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    tokens = list(prompt)
    with torch.no_grad():  # greedy by full forwards, no KV cache: eos does not stop it
        for _ in range(6):
            logits = model(torch.tensor([tokens]))[0, -1].log_softmax(-1)
            if len(tokens) == len(prompt):
                first = logits
            tokens.append(int(logits.argmax()))
    assert lp["token_ids"] == tokens[len(prompt):]
    assert lp["token_logprobs"][0] == pytest.approx(float(first.max()), abs=1e-4)
    top3 = first.topk(3)
    assert sorted(lp["top_logprobs"][0].values(), reverse=True) == pytest.approx(top3.values.tolist(), abs=1e-4)


def test_openai_client_completions_and_chat(model, served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="class ", max_tokens=12, temperature=0)
    assert done.choices[0].text == _expected(model, "class ", 12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="class ", max_tokens=12, temperature=0, stream=True))
    assert streamed == done.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = "system: be brief\nuser: hi\nassistant:"  # the documented default template
    assert chat.choices[0].message.content == _expected(model, prompt, 10)
    assert chat.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_concurrent_requests_get_their_own_answers(model, served):
    url, _ = served
    prompts = [f"x = {i}" * (i + 1) for i in range(8)]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "model": "tiny", "prompt": p, "max_tokens": 8 + i, "temperature": 0}) for i, p in enumerate(prompts)))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(main()) == [_expected(model, p, 8 + i) for i, p in enumerate(prompts)]


def _live_slots(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("flover_live_slots ")))


def test_client_disconnect_frees_its_slot(model, served):
    url, engine = served

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            other = asyncio.ensure_future(client.post(f"{url}/v1/completions", json={
                "model": "tiny", "prompt": "while True:", "max_tokens": 40, "temperature": 0}))
            async with client.stream("POST", f"{url}/v1/completions", json={
                    "model": "tiny", "prompt": "for i in", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # hang up after the first chunk
            return (await other).json()["choices"][0]["text"]

    assert asyncio.run(main()) == _expected(model, "while True:", 40)
    deadline = time.monotonic() + 10
    while _live_slots(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_slots(url) == 0 and not engine.engine.requests


@pytest.mark.parametrize(("body", "status", "message"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": "tiny"}, 400, "prompt: Field required"),
    ({"prompt": "a"}, 400, "model: Field required"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens must be positive"),
    ({"model": "tiny", "prompt": "a", "max_tokens": -3}, 400, "max_tokens must be positive"),
    ({"model": "gpt-5", "prompt": "a"}, 404, "`gpt-5` does not exist"),
    ({"model": "tiny", "prompt": "a" * 300}, 400, "max_len of 256"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "token ids must be integers"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": "tiny", "prompt": "a", "n": 2}, 400, "n must be 1"),
])
def test_bad_requests_get_openai_style_4xx(served, body, status, message):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", content=body if isinstance(body, str) else json.dumps(body),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2},
                      timeout=30).status_code == 200


def test_chat_bad_messages(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard",
                                                                                       "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]


def test_full_queue_answers_503_then_recovers(model):
    engine = AsyncEngine(Engine(model, TOK, max_slots=1, max_len=512, max_queue=1))
    with _serve(engine) as url:
        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                long = {"model": "tiny", "prompt": "a", "max_tokens": 400, "ignore_eos": True}
                first = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=long))
                while _live_slots(url) == 0:
                    await asyncio.sleep(0.01)
                queued = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=long))
                await asyncio.sleep(0.3)
                refused = await client.post(f"{url}/v1/completions", json=long)
                return refused, await first, await queued

        refused, first, queued = asyncio.run(main())
        assert refused.status_code == 503 and "queue" in refused.json()["error"]["message"]
        assert first.status_code == 200 and queued.status_code == 200
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_a_runner_failure_answers_503_and_the_server_stops_cleanly(model, monkeypatch):
    engine = Engine(model, TOK, max_slots=1, max_len=256)
    real, fail = engine.runner.execute, threading.Event()

    def execute(plan):
        if fail.is_set():
            raise RunnerFailure("tensor-parallel rank 1 failed a step")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    with _serve(AsyncEngine(engine)) as url:
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "ignore_eos": True}
                async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                    lines = aiter(r.aiter_lines())
                    chunks = [await anext(lines)]  # streaming: it holds the only slot
                    queued = asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body))
                    while "flover_queue_length 1" not in (await client.get(f"{url}/metrics")).text:
                        await asyncio.sleep(0.005)
                    fail.set()
                    chunks += [line async for line in lines]
                return [c for c in chunks if c], await queued, await client.post(f"{url}/v1/completions", json=body)

        chunks, queued, later = asyncio.run(main())
    assert chunks[-1] == "data: [DONE]" and "rank 1 failed a step" in json.loads(chunks[-2][6:])["error"]["message"]
    for refused in (queued, later):
        assert refused.status_code == 503 and "the engine has stopped" in refused.json()["error"]["message"]
