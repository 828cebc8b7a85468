"""Workloads, traces, the replay client (in-process and over HTTP) and the serving summary."""

import asyncio
import itertools
import json
import math
import statistics

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover import Engine, SamplingParams
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.server import create_app, serve_in_thread
from effdl.flover.workload import (
    RequestMetrics,
    WorkloadRequest,
    load_trace,
    poisson_workload,
    replay,
    save_trace,
    summarize,
)

# -- workloads ------------------------------------------------------------------------------------------------

def test_poisson_gaps_are_exponential_with_the_asked_mean():
    workload = poisson_workload(2000, mean_interval_ms=10.0, seed=3)
    arrivals = [r.arrival_s for r in workload]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] == 0.0 and min(gaps) >= 0.0
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.010, rel=0.08)  # the sample mean's sd is 2.2% at n = 1999
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, abs=0.1)  # exponential: sd = mean


def test_poisson_lengths_cover_the_inclusive_ranges():
    workload = poisson_workload(2000, 1.0, prompt_len=(3, 9), output_len=(1, 4), vocab_size=50)
    assert {len(r.prompt) for r in workload} == set(range(3, 10))
    assert {r.max_tokens for r in workload} == set(range(1, 5))
    assert {t for r in workload for t in r.prompt} == set(range(50))


def test_poisson_is_seeded_and_the_interval_only_scales_arrivals():
    a = poisson_workload(50, 8.0, seed=1)
    assert a == poisson_workload(50, 8.0, seed=1)
    assert a != poisson_workload(50, 8.0, seed=2)
    slow = poisson_workload(50, 32.0, seed=1)
    assert [(r.prompt, r.max_tokens) for r in slow] == [(r.prompt, r.max_tokens) for r in a]
    assert [r.arrival_s for r in slow] == pytest.approx([4 * r.arrival_s for r in a])
    assert all(r.arrival_s == 0.0 for r in poisson_workload(20, 0.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be a positive integer, got 0"),
    (dict(mean_interval_ms=-1.0), "mean_interval_ms .* got -1.0"),
    (dict(mean_interval_ms=math.inf), "mean_interval_ms .* got inf"),
    (dict(prompt_len=(8, 4)), r"prompt_len .* got \(8, 4\)"),
    (dict(output_len=(0, 4)), r"output_len .* got \(0, 4\)"),
    (dict(vocab_size=0), "vocab_size must be positive, got 0"),
])
def test_poisson_rejects_bad_arguments(kwargs, message):
    with pytest.raises(EffdlError, match=message):
        poisson_workload(**{"n": 4, "mean_interval_ms": 1.0, **kwargs})


# -- traces ---------------------------------------------------------------------------------------------------

def test_trace_round_trip_and_prompt_len_lines(tmp_path):
    workload = poisson_workload(10, 5.0, seed=4)
    path = tmp_path / "trace.jsonl"
    save_trace(path, workload)
    assert len(path.read_text().splitlines()) == 10
    assert load_trace(path) == workload

    path.write_text('{"arrival_s": 0, "prompt_len": 7, "max_tokens": 3}\n\n'
                    '{"arrival_s": 0.5, "prompt": [1, 2], "max_tokens": 4}\n')
    first, second = load_trace(path, vocab_size=20)
    assert len(first.prompt) == 7 and all(0 <= t < 20 for t in first.prompt)
    assert first == load_trace(path, vocab_size=20)[0]  # seeded
    assert second == WorkloadRequest(0.5, [1, 2], 4)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "Expecting property name"),
    ('[1, 2]', "expected a JSON object"),
    ('{"arrival_s": 0, "max_tokens": 3}', "exactly one of prompt or prompt_len"),
    ('{"arrival_s": 0, "prompt": [1], "prompt_len": 1, "max_tokens": 3}', "exactly one of prompt or prompt_len"),
    ('{"arrival_s": 0, "prompt": [1], "max_tokens": -2}', "max_tokens must be a positive integer, got -2"),
    ('{"arrival_s": -1, "prompt": [1], "max_tokens": 2}', "arrival_s must be .* got -1"),
    ('{"arrival_s": 0, "prompt": [1, "a"], "max_tokens": 2}', r"integers >= 0, got \['a'\]"),
    ('{"arrival_s": 0, "prompt_len": 0, "max_tokens": 2}', "prompt_len must be a positive integer, got 0"),
])
def test_a_malformed_trace_line_is_named(tmp_path, bad_line, message):
    path = tmp_path / "trace.jsonl"
    good = json.dumps({"arrival_s": 0.0, "prompt": [1, 2], "max_tokens": 2})
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(EffdlError, match=f"trace.jsonl line 3: .*{message}"):
        load_trace(path)


# -- summarize ------------------------------------------------------------------------------------------------

def _metrics(index, arrival, start, token_times, prompt_len, error=None, finish=None):
    return RequestMetrics(index, arrival, prompt_len, start_s=start,
                          first_token_s=token_times[0] if token_times else None,
                          finish_s=finish if finish is not None else token_times[-1], token_times_s=token_times,
                          num_output_tokens=len(token_times), error=error)


SYNTHETIC = [
    _metrics(0, 0.0, 0.0, [0.1, 0.2, 0.4], 5),  # ttft 0.1, e2e 0.4, tpot 0.15, itl 0.1 0.2
    _metrics(1, 0.5, 0.5, [0.8, 0.9], 7),  # ttft 0.3, e2e 0.4, tpot 0.1, itl 0.1
    _metrics(2, 1.0, 1.0, [1.2], 3),  # ttft 0.2, e2e 0.2, one token: no tpot, no itl
    _metrics(3, 1.5, 1.6, [], 9, error="boom", finish=2.0),  # failed; sent 0.1 s late; ends the makespan
]


def test_summarize_against_hand_computed_numbers():
    s = summarize(SYNTHETIC)
    expected = {
        "completed": 3, "failed": 1, "total_input_tokens": 15, "total_output_tokens": 6, "makespan_s": 2.0,
        "request_throughput": 1.5, "output_throughput": 3.0,
        "mean_ttft_s": 0.2, "median_ttft_s": 0.2, "p99_ttft_s": 0.2 + 0.98 * 0.1,
        "mean_tpot_s": 0.125, "median_tpot_s": 0.125, "p99_tpot_s": 0.1 + 0.99 * 0.05,
        "mean_itl_s": 0.4 / 3, "median_itl_s": 0.1, "p99_itl_s": 0.1 + 0.98 * 0.1,
        "mean_e2e_s": 1.0 / 3, "median_e2e_s": 0.4, "p99_e2e_s": 0.4,
        "goodput": None, "max_send_lag_s": 0.1,
    }
    assert s.keys() == expected.keys()
    for key, value in expected.items():
        assert s[key] == (value if value is None or isinstance(value, int) else pytest.approx(value)), key


@pytest.mark.parametrize("slo_ttft_s, slo_tpot_s, good", [
    (0.25, None, 2),  # requests 0 and 2
    (None, 0.12, 2),  # request 1, and request 2 (one token meets any TPOT SLO)
    (0.25, 0.12, 1),  # request 2 alone
])
def test_goodput_counts_requests_meeting_every_slo(slo_ttft_s, slo_tpot_s, good):
    assert summarize(SYNTHETIC, slo_ttft_s, slo_tpot_s)["goodput"] == pytest.approx(good / 2.0)


def test_summarize_of_nothing_completed():
    s = summarize([SYNTHETIC[3]])
    assert s["completed"] == 0 and s["failed"] == 1 and s["request_throughput"] == 0.0
    assert math.isnan(s["mean_ttft_s"]) and math.isnan(s["p99_e2e_s"])


# -- replay ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval()


WORKLOAD = poisson_workload(5, 15.0, prompt_len=(3, 12), output_len=(2, 6), seed=5)


def _assert_timeline(m: RequestMetrics) -> None:
    assert m.error is None and m.finish_reason == "length", m.error
    assert m.start_s >= m.arrival_s - 1e-3  # sent on schedule (asyncio may wake a clock tick early)
    assert m.start_s <= m.first_token_s == m.token_times_s[0]
    assert m.token_times_s == sorted(m.token_times_s) and m.token_times_s[-1] == m.finish_s


def test_replay_in_process_runs_every_request_to_its_length(tiny):
    async def run():
        engine = AsyncEngine(Engine(tiny, ByteTokenizer(), max_slots=3, max_len=32)).start()
        try:
            return await replay(WORKLOAD, engine)
        finally:
            await engine.shutdown()

    metrics = asyncio.run(run())
    offline = Engine(tiny, max_slots=1, max_len=32)
    for m, request in zip(metrics, WORKLOAD, strict=True):
        _assert_timeline(m)
        assert m.num_output_tokens == len(m.output_ids) == len(m.token_times_s) == request.max_tokens
        assert m.output_ids == offline.generate([request.prompt], SamplingParams(max_tokens=request.max_tokens,
                                                                                ignore_eos=True))[0]
    assert summarize(metrics)["completed"] == len(WORKLOAD)


def test_replay_timeout_aborts_the_request_and_frees_its_slot(tiny):
    async def run():
        engine = AsyncEngine(Engine(tiny, max_slots=2, max_len=128)).start()
        try:
            (m,) = await replay([WorkloadRequest(0.0, [1, 2, 3], 100)], engine, timeout_s=0.01)
            for _ in range(100):  # the loop thread applies the abort between steps
                if engine.engine.scheduler.slots.n_free == 2:
                    break
                await asyncio.sleep(0.01)
            return m, engine.engine.scheduler.slots.n_free
        finally:
            await engine.shutdown()

    m, free = asyncio.run(run())
    assert m.error == "timed out after 0.01 s" and free == 2


def test_replay_over_http_matches_in_process(tiny):
    app = create_app(AsyncEngine(Engine(tiny, ByteTokenizer(), max_slots=3, max_len=32)), "tiny", ByteTokenizer())
    with serve_in_thread(app) as url:
        metrics = asyncio.run(replay(WORKLOAD, url, model="tiny"))
        with_ids = asyncio.run(replay(WORKLOAD, url, model="tiny", token_ids=True))
        (wrong,) = asyncio.run(replay(WORKLOAD[:1], url, model="other"))
    tokenizer = ByteTokenizer()
    offline = Engine(tiny, max_slots=1, max_len=32)
    expected = [offline.generate([r.prompt], SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))[0]
                for r in WORKLOAD]
    for m, request, tokens in zip(metrics, WORKLOAD, expected, strict=True):
        _assert_timeline(m)
        assert m.num_output_tokens == len(m.token_times_s) == request.max_tokens and m.output_ids is None
        assert m.text == tokenizer.decode(tokens)
    assert [m.output_ids for m in with_ids] == expected
    assert wrong.error.startswith("EffdlError: HTTP 404") and "`other` does not exist" in wrong.error


def test_replay_refuses_a_bad_http_target():
    with pytest.raises(EffdlError, match="base URL like http://host:port, got 'localhost:8000'"):
        asyncio.run(replay(WORKLOAD, "localhost:8000", model="tiny"))
    with pytest.raises(EffdlError, match="needs the served model's name"):
        asyncio.run(replay(WORKLOAD, "http://localhost:8000"))
