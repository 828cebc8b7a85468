"""300 requests with Poisson arrivals against a live server: malformed ones, clients that disconnect mid-stream
and clients that give up on a timeout. Nothing may be lost or leaked: every well-formed request gets the tokens a
greedy decode in ``transformers`` gives on the same checkpoint, every bad one a 4xx, and the engine ends with every
slot free and nothing queued."""

import asyncio
import json
import random

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from effdl.core.hf import save_checkpoint
from effdl.core.tokenizer import ByteTokenizer
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import Engine
from effdl.flover.server import create_app, serve_in_thread

TOK = ByteTokenizer()
PROMPTS = ["def f(x):", "import os\n", "class A:", "for i in range(", "return ", "x = [", "# note", "while True:"]
MALFORMED = [
    (b"{not json", 400),
    (json.dumps({"model": "tiny"}).encode(), 400),  # no prompt
    (json.dumps({"model": "tiny", "prompt": "a", "max_tokens": -1}).encode(), 400),
    (json.dumps({"model": "tiny", "prompt": "a", "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "tiny", "prompt": "a", "tools": []}).encode(), 400),  # unsupported field
    (json.dumps({"model": "other", "prompt": "a"}).encode(), 404),
    (json.dumps({"model": "tiny", "prompt": "a" * 200, "max_tokens": 100}).encode(), 400),  # past max_len
]


@pytest.fixture(scope="module")
def hf_greedy(model, tmp_path_factory):
    """The reference: ``transformers``' greedy ``generate`` on the served model's own checkpoint; (prompt, n) ->
    the text of its first n tokens (an eos, if it ends there, is not shown, as the server does not show it)."""
    hf = LlamaForCausalLM.from_pretrained(save_checkpoint(model, tmp_path_factory.mktemp("served"))).eval()
    eos = model.config.eos_id

    def greedy(prompt: str, n: int) -> str:
        ids = torch.tensor([TOK.encode(prompt)])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        return TOK.decode(out[:-1] if out and out[-1] == eos else out)

    return greedy


def test_poisson_load_with_malformed_disconnecting_and_abandoning_clients(model, hf_greedy):
    rng = random.Random(0)
    kinds = ["ok"] * 225 + ["malformed"] * 30 + ["disconnect"] * 30 + ["abandon"] * 15
    rng.shuffle(kinds)
    arrivals, t = [], 0.0
    for _ in kinds:
        t += rng.expovariate(1 / 0.01)  # mean 10 ms between arrivals
        arrivals.append(t)
    plans = [(kind, at, rng.choice(PROMPTS), rng.randint(2, 8), rng.randrange(len(MALFORMED)))
             for kind, at in zip(kinds, arrivals, strict=True)]
    expected = {(p, n): hf_greedy(p, n) for _, _, p, n, _ in plans}
    engine = AsyncEngine(Engine(model, TOK, max_slots=8, max_len=160, max_queue=1024))

    async def one(client: httpx.AsyncClient, url: str, kind: str, at: float, prompt: str, n: int, bad: int):
        await asyncio.sleep(at)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
        if kind == "ok":
            stream = n % 2 == 0
            if stream:
                async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert r.status_code == 200 and lines[-1] == "data: [DONE]"
                return "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]), (prompt, n)
            r = await client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], (prompt, n)
        if kind == "malformed":
            payload, status = MALFORMED[bad]
            r = await client.post(f"{url}/v1/completions", content=payload,
                                  headers={"content-type": "application/json"})
            assert r.status_code == status, (payload, r.text)
            assert "error" in r.json() and "Traceback" not in r.text
            return None
        long = {**body, "max_tokens": 120, "ignore_eos": True}  # still running when the client goes
        if kind == "disconnect":
            async with client.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # read one chunk, then hang up
            return None
        # only the wait for the answer times out: on a busy machine a 50-ms connect or write timeout would give up
        # before the server has the request, and there would be nothing to abort
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{url}/v1/completions", json=long, timeout=httpx.Timeout(120, read=0.05))
        return None

    async def main(url: str):
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
            results = await asyncio.gather(*(one(client, url, *plan) for plan in plans))
            for _ in range(500):  # the aborted requests free their slots within a few steps
                metrics = (await client.get(f"{url}/metrics")).text
                if ('vllm:num_requests_running{model_name="tiny"} 0' in metrics
                        and 'vllm:num_requests_waiting{model_name="tiny"} 0' in metrics):
                    break
                await asyncio.sleep(0.02)
            after = await client.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0],
                                                                     "max_tokens": 4, "temperature": 0})
            return results, metrics, after, (await client.get(f"{url}/health")).json()

    with serve_in_thread(create_app(engine, "tiny", TOK)) as url:
        results, metrics, after, health = asyncio.run(main(url))
    completed = [r for r in results if r is not None]
    assert len(completed) == 225
    assert all(text == expected[key] for text, key in completed)
    assert 'vllm:num_requests_running{model_name="tiny"} 0' in metrics
    assert 'vllm:num_requests_waiting{model_name="tiny"} 0' in metrics
    assert "flover_free_slots 8" in metrics
    # Every client that left was aborted rather than run to its 120 tokens: 30 disconnected, 15 gave up.
    assert 'vllm:request_success_total{model_name="tiny",finished_reason="abort"} 45' in metrics
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == hf_greedy(PROMPTS[0], 4)
    assert health == {"status": "ok"}
