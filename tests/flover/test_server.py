"""The OpenAI-compatible server, through httpx and the official openai client, on a free local port."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from effdl.core.generate import generate
from effdl.core.tokenizer import ByteTokenizer
from effdl.flover import Engine
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import RunnerFailure
from effdl.flover.server import create_app, serve_in_thread

TOK = ByteTokenizer()


def _serve(engine: AsyncEngine, name: str = "tiny"):
    return serve_in_thread(create_app(engine, name, TOK))


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
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("vllm:num_requests_running{")))


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
    ({"model": "tiny", "prompt": "a", "n": 17}, 400, "n must be between 1 and 16"),
    ({"model": "tiny", "prompt": "a", "n": 0}, 400, "n must be between 1 and 16"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty must be in [-2, 2]"),
    ({"model": "tiny", "prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty must be in [-2, 2]"),
    ({"model": "tiny", "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty must be > 0"),
    ({"model": "tiny", "prompt": "a", "min_tokens": 20}, 400, "min_tokens must be in [0, max_tokens=16]"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"5": 200}}, 400, "logit_bias values must be in [-100, 100]"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias keys must be token ids"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"258": 1}}, 400, "outside the vocabulary [0, 258)"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 non-empty strings"),
    ({"model": "tiny", "prompt": "a", "stop": ""}, 400, "at most 4 non-empty strings"),
    ({"model": "tiny", "prompt": "a", "echo": True, "logprobs": 2}, 400, "echo together with logprobs"),
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


def test_client_disconnect_frees_the_slots_of_every_choice(model, served):
    url, engine = served

    async def main():
        body = {"model": "tiny", "prompt": "for i in", "max_tokens": 200, "ignore_eos": True, "n": 3, "stream": True}
        async with httpx.AsyncClient(timeout=120) as client, client.stream(
                "POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first chunk

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while _live_slots(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_slots(url) == 0 and not engine.engine.requests


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
        # n = 3 choices queued at once overflow a queue of one: refused whole, the choice that got in aborted.
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 50, "n": 3})
        assert r.status_code == 503
        deadline = time.monotonic() + 10
        while (engine.engine.requests or _live_slots(url)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.engine.requests and _live_slots(url) == 0
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2},
                          timeout=60).status_code == 200
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
                    waiting = 'vllm:num_requests_waiting{model_name="tiny"} 1'
                    while waiting not in (await client.get(f"{url}/metrics")).text:
                        await asyncio.sleep(0.005)
                    fail.set()
                    chunks += [line async for line in lines]
                return [c for c in chunks if c], await queued, await client.post(f"{url}/v1/completions", json=body)

        chunks, queued, later = asyncio.run(main())
    assert chunks[-1] == "data: [DONE]" and "rank 1 failed a step" in json.loads(chunks[-2][6:])["error"]["message"]
    for refused in (queued, later):
        assert refused.status_code == 503 and "the engine has stopped" in refused.json()["error"]["message"]


# -- the fields real OpenAI clients send ---------------------------------------------------------------------


def _naive_greedy(model, prompt: list[int], n: int, process) -> list[int]:
    """Greedy by full forwards (no KV cache), ``process(logits list, output) -> logits list`` before each argmax;
    stops after the model's eos, which it includes."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = process(model(torch.tensor([tokens]))[0, -1].tolist(), tokens[len(prompt):])
            tokens.append(max(range(len(logits)), key=logits.__getitem__))
            if tokens[-1] == model.config.eos_id:
                break
    return tokens[len(prompt):]


def _complete(url: str, **fields) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "temperature": 0, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_content_as_text_parts_and_a_non_text_part_is_a_400(model, served):
    url, _ = served
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    body = {"model": "tiny", "max_tokens": 8, "temperature": 0}
    as_parts = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={**body, "messages": [
        {"role": "system", "content": parts}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"][0]["message"]["content"] == _expected(
        model, "system: be\nbrief\nuser: hi\nassistant:", 8)  # parts joined by newlines, as vLLM joins them
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={**body, "messages": [
        {"role": "user", "content": [parts[0], image]}]})
    assert r.status_code == 400 and "'image_url'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages.0.content"


def test_n_choices_seeded_streamed_and_summed(model, served):
    url, _ = served
    greedy = _complete(url, prompt="class ", max_tokens=6, n=3)
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert {c["text"] for c in greedy["choices"]} == {_expected(model, "class ", 6)}
    body = dict(prompt="hello", max_tokens=8, temperature=1.0, ignore_eos=True, seed=5)
    seeded = _complete(url, **body, n=3)
    texts = [c["text"] for c in seeded["choices"]]
    assert len(set(texts)) == 3  # independent choices
    assert texts == [_complete(url, **{**body, "seed": 5 + i})["choices"][0]["text"] for i in range(3)]
    assert seeded["usage"] == {"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29}
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", **body, "n": 3, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = _sse(r)
    by_index = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
                for i in range(3)}
    assert [by_index[i] for i in range(3)] == texts and chunks[-1]["usage"] == seeded["usage"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    chat_body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5, seed=1,
                     temperature=1.0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**chat_body)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    parts = list(client.chat.completions.create(**chat_body, stream=True))
    assert ["".join(p.choices[0].delta.content or "" for p in parts if p.choices[0].index == i)
            for i in range(2)] == [c.message.content for c in chat.choices]


def _naive_penalties(prompt, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """Per-step processing as plain loops: logit bias, then repetition (prompt + output), frequency, presence."""
    def process(logits, output):
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in range(len(logits)):
            count = output.count(token)
            if repetition != 1.0 and (token in prompt or count):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            logits[token] -= frequency * count + presence * (count > 0)
        return logits
    return process


@pytest.mark.parametrize("fields", [
    dict(presence_penalty=1.5), dict(frequency_penalty=0.8), dict(repetition_penalty=1.6),
    dict(presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={"228": -5.0})])
def test_penalties_end_to_end_match_a_naive_greedy_loop(model, served, fields):
    url, _ = served
    prompt = TOK.encode("the cat")  # greedy repeats token 228, so every penalty changes the output
    got = _complete(url, prompt=prompt, max_tokens=12, ignore_eos=True, logprobs=0, **fields)
    bias = {int(k): v for k, v in fields.get("logit_bias", {}).items()}
    want = _naive_greedy(model, prompt, 12, _naive_penalties(prompt, fields.get("presence_penalty", 0.0),
                                                             fields.get("frequency_penalty", 0.0),
                                                             fields.get("repetition_penalty", 1.0), bias))
    assert got["choices"][0]["logprobs"]["token_ids"] == want
    assert want != _naive_greedy(model, prompt, 12, lambda logits, output: logits)


def test_logit_bias_bans_the_greedy_token_and_min_tokens_delays_eos(model, served):
    url, _ = served
    plain = _complete(url, prompt="class ", max_tokens=4, logprobs=0)["choices"][0]["logprobs"]["token_ids"]
    banned = _complete(url, prompt="class ", max_tokens=4, logprobs=0, logit_bias={str(plain[0]): -100})
    assert banned["choices"][0]["logprobs"]["token_ids"][0] != plain[0]
    # Greedy after this prompt ends with eos as its 6th token; min_tokens masks eos until 9 are out.
    early = _complete(url, prompt="def add(a, b):", max_tokens=20, logprobs=0)["choices"][0]
    assert early["finish_reason"] == "stop" and len(early["logprobs"]["token_ids"]) == 6
    late = _complete(url, prompt="def add(a, b):", max_tokens=20, min_tokens=9, logprobs=0)["choices"][0]
    eos = model.config.eos_id
    want = _naive_greedy(model, TOK.encode("def add(a, b):"), 20, lambda logits, output: [
        -float("inf") if t == eos and len(output) < 9 else x for t, x in enumerate(logits)])
    assert late["logprobs"]["token_ids"] == want and len(want) >= 9 and eos not in want[:9]


def test_echo_and_max_completion_tokens(model, served):
    url, _ = served
    echoed = _complete(url, prompt="class ", max_tokens=6, echo=True)["choices"][0]["text"]
    assert echoed == "class " + _expected(model, "class ", 6)
    assert _complete(url, prompt=TOK.encode("class "), max_tokens=6, echo=True)["choices"][0]["text"] == echoed
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "class ", "max_tokens": 6, "temperature": 0, "echo": True,
            "stream": True}) as r:
        chunks = _sse(r)
    assert chunks[0]["choices"][0]["text"].startswith("class ")
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_completion_tokens": 5}, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 5
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_completion_tokens": 5, "max_tokens": 5})
    assert r.status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_completion_tokens": 5, "max_tokens": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_stop_strings_across_token_boundaries(model, served):
    url, _ = served
    full = _expected(model, "class ", 12)
    assert full.startswith("BeBeB\x1b")  # byte tokens: a 3-character stop spans 3 tokens, after a false start
    for stop in ("eB\x1b", ["zz", "eB\x1b"]):
        done = _complete(url, prompt="class ", max_tokens=12, stop=stop)["choices"][0]
        assert (done["text"], done["finish_reason"]) == ("BeB", "stop")
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "class ", "max_tokens": 12, "temperature": 0, "stop": stop,
                "stream": True}) as r:
            texts = [c["choices"][0]["text"] for c in _sse(r)]
        shown = ""
        for text in texts:
            shown += text
            assert "BeB".startswith(shown)  # never more than the final text, so no partial stop shown
        assert shown == "BeB"


def test_tokenize_and_detokenize(served):
    url, _ = served
    r = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": "héllo"}).json()
    assert r == {"tokens": TOK.encode("héllo"), "count": 6, "max_model_len": 256}
    r = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert r["tokens"] == TOK.encode("user: hi\nassistant:")
    assert httpx.post(f"{url}/detokenize", json={"tokens": TOK.encode("héllo")}).json() == {"prompt": "héllo"}
    for path, body, message in (("/detokenize", {"tokens": [1, 258]}, "token ids must be in [0, 258)"),
                                ("/detokenize", {"tokens": [-1]}, "token ids must be in"),
                                ("/tokenize", {"prompt": "a", "messages": []}, "exactly one of prompt and messages"),
                                ("/tokenize", {}, "exactly one of prompt and messages"),
                                ("/tokenize", {"model": "gpt-5", "prompt": "a"}, "does not exist")):
        r = httpx.post(f"{url}{path}", json=body)
        assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], (path, body, r.text)


def test_api_key_guards_v1_and_tokenize_but_not_health(model, monkeypatch):
    engine = AsyncEngine(Engine(model, TOK, max_slots=1, max_len=64))
    with serve_in_thread(create_app(engine, "tiny", TOK, api_key="sekrit")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            for r in (httpx.get(f"{url}/v1/models", headers=headers),
                      httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a"}, headers=headers),
                      httpx.post(f"{url}/tokenize", json={"prompt": "a"}, headers=headers),
                      httpx.post(f"{url}/detokenize", json={"tokens": [97]}, headers=headers)):
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health").status_code == 200
        ok = {"Authorization": "Bearer sekrit"}
        assert httpx.post(f"{url}/tokenize", json={"prompt": "a"}, headers=ok).json()["tokens"] == [97]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit")
        assert client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()


def test_serve_and_the_cli_pass_the_api_key(monkeypatch):
    import argparse

    import uvicorn

    from effdl.flover import cli, server

    seen = {}
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.update(kw))
    args = parser.parse_args(["serve", "--api-key", "k1"])
    args.func(args)
    assert seen["api_key"] == "k1"
    monkeypatch.undo()
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("EFFDL_API_KEY", "from-env")
    server.serve("tiny", max_slots=1, max_len=64)
    with serve_in_thread(apps[0]) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


@pytest.mark.parametrize(("path", "extra", "field", "message"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", "not supported"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "not supported"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate", "not a field"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
     "messages.0.tool_calls", "not supported"),
    ("/v1/chat/completions", {"echo": True}, "echo", "not a field"),
    ("/v1/completions", {"best_of": 3}, "best_of", "best_of must equal n"),
    ("/v1/completions", {"suffix": "}"}, "suffix", "suffix is not supported"),
    ("/v1/completions", {"max_completion_tokens": 3}, "max_completion_tokens", "not a field"),
    ("/v1/completions", {"min_p": 0.1}, "min_p", "not a field"),
])
def test_unsupported_and_unknown_fields_get_a_400_naming_them(served, path, extra, field, message):
    url, _ = served
    base = ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} if "chat" in path
            else {"model": "tiny", "prompt": "a"})
    r = httpx.post(f"{url}{path}", json={**base, "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and field in error["message"] and error["param"] == field
    assert set(error) == {"message", "type", "param", "code"}


def test_fields_clients_send_by_default_are_accepted(served):
    url, _ = served
    ok = {"max_tokens": 2, "user": "u1", "seed": 3, "stream_options": None, "response_format": {"type": "text"},
          "temperature": None, "top_p": None, "n": None, "presence_penalty": None, "logit_bias": None}
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "best_of": 1, **ok},
                      timeout=30).status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "ann"}], "logprobs": True,
        "top_logprobs": 2, **ok})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2
    assert content[0]["top_logprobs"][0]["logprob"] >= content[0]["logprob"]
    r = httpx.get(f"{url}/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
