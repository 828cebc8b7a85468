"""``/metrics`` as Prometheus text under vLLM's names, parsed by prometheus_client's own parser."""

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from effdl.core.config import ModelConfig
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.engine import Engine
from effdl.flover.server import create_app, serve_in_thread

TOK = ByteTokenizer()


def _families(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family, suffix: str = "", **labels) -> float:
    return next(s.value for s in family.samples if s.name == family.name + suffix
                and all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_metric_parses_and_counts_what_was_served():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    engine = AsyncEngine(Engine(model, TOK, max_slots=4, max_len=128))
    prompts = ["def f(x):", "import os", "class A:"]
    with serve_in_thread(create_app(engine, "tiny", TOK)) as url:
        before = _families(url)
        assert _value(before["vllm:num_requests_running"]) == 0
        assert _value(before["vllm:kv_cache_usage_perc"]) == 0
        for i, prompt in enumerate(prompts):
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 5 + i,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
        families = _families(url)
    expected = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
        "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
        "vllm:request_success": "counter", "vllm:time_to_first_token_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
        "flover_free_slots": "gauge", "flover_tokens_per_s": "gauge"}
    assert {name: f.type for name, f in families.items()} == expected
    for name, family in families.items():
        if name.startswith("vllm:"):
            assert all(s.labels.get("model_name") == "tiny" for s in family.samples), name
    assert _value(families["vllm:num_requests_running"]) == 0
    assert _value(families["vllm:num_requests_waiting"]) == 0
    assert _value(families["flover_free_slots"]) == 4
    assert _value(families["vllm:prompt_tokens"], "_total") == sum(len(TOK.encode(p)) for p in prompts)
    assert _value(families["vllm:generation_tokens"], "_total") == 5 + 6 + 7
    assert _value(families["vllm:request_success"], "_total", finished_reason="length") == 3
    assert _value(families["vllm:prefix_cache_queries"], "_total") == sum(len(TOK.encode(p)) for p in prompts)
    assert _value(families["vllm:prefix_cache_hits"], "_total") == 0  # prompts shorter than a block
    for name in ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds"):
        family = families[name]
        assert _value(family, "_count") == 3, name
        buckets = [s.value for s in family.samples if s.name.endswith("_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == 3, name  # cumulative, +Inf holds every request
    ttft, e2e = (_value(families[n], "_sum") for n in ("vllm:time_to_first_token_seconds",
                                                       "vllm:e2e_request_latency_seconds"))
    assert 0 < ttft < e2e


def test_kv_cache_usage_counts_the_tokens_live_requests_hold():
    torch.manual_seed(0)
    engine = Engine(Transformer(ModelConfig.preset("tiny")).eval(), TOK, max_slots=2, max_len=64)
    engine.add_request([1] * 10, None)
    engine.step()  # prefill and the first token: 11 of 2 x 64 positions
    assert engine.gauges()["kv_cache_usage"] == 11 / 128


def test_prefix_cache_counters_count_the_tokens_served_from_the_cache():
    torch.manual_seed(0)
    engine = AsyncEngine(Engine(Transformer(ModelConfig.preset("tiny")).eval(), TOK, max_slots=2, max_len=128))
    shared = "You are a helpful assistant. Answer briefly.\nQ: "  # 48 bytes: three 16-token blocks
    prompts = [shared + "2+2?", shared + "capital of France?"]
    with serve_in_thread(create_app(engine, "tiny", TOK)) as url:
        for prompt in prompts:  # one after another: the second finds the first's blocks
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2,
                                                          "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
        families = _families(url)
    assert _value(families["vllm:prefix_cache_queries"], "_total") == sum(len(TOK.encode(p)) for p in prompts)
    assert _value(families["vllm:prefix_cache_hits"], "_total") == 48
