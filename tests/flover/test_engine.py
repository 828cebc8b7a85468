"""The engine against transformers' greedy generate, request by request, under staggered arrivals."""

import asyncio
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import effdl.flover.sampling as sampling_module
from effdl.core.config import ModelConfig
from effdl.core.hf import load_checkpoint
from effdl.core.tokenizer import ByteTokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover import Engine, QueueFull, SamplingParams
from effdl.flover.async_engine import AsyncEngine, EngineStopped
from effdl.flover.engine import RunnerFailure, StepOutcome
from effdl.flover.sampling import find_stop, held_back, logprob_entry, sample_token, stop_reason


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random Llama in transformers and the same checkpoint loaded by effdl."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # wide weights: discriminative logits, so greedy ties cannot blur the comparison
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return hf, load_checkpoint(folder).eval()


def _workload(n: int, seed: int = 0) -> list[tuple[int, list[int], int]]:
    """(arrival step, prompt, max_tokens): Poisson arrivals in units of engine steps, mixed lengths."""
    rng = random.Random(seed)
    step, out = 0, []
    for _ in range(n):
        step += round(rng.expovariate(1 / 3))
        out.append((step, [rng.randrange(300) for _ in range(rng.randint(1, 40))], rng.randint(1, 24)))
    return out


def _serve(engine: Engine, workload) -> list[list[int]]:
    """Add each request at its arrival step; returns every request's output tokens, in workload order."""
    pending, ids, outputs, step = list(workload), [], {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, n = pending.pop(0)
            ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n)))
            outputs[ids[-1]] = []
        for out in engine.step().outputs:
            assert out.error is None, out.error
            outputs[out.id] += out.new_token_ids
        step += 1
    return [outputs[i] for i in ids]


@pytest.fixture(scope="module")
def hf_reference(hf_pair):
    hf, _ = hf_pair
    workload = _workload(10)
    expected = []
    for _, prompt, n in workload:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    return workload, expected


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("max_slots", [1, 3, 8])
def test_fused_matches_transformers_per_request(hf_pair, hf_reference, shuffle, max_slots):
    _, model = hf_pair
    workload, expected = hf_reference
    engine = Engine(model, max_slots=max_slots, max_len=96, policy="fused", shuffle=shuffle, prefill_chunk=16)
    assert _serve(engine, workload) == expected
    assert engine.scheduler.slots.n_free == max_slots


@pytest.mark.parametrize("policy", ["static", "sequential"])
def test_baseline_policies_match_transformers(hf_pair, hf_reference, policy):
    _, model = hf_pair
    workload, expected = hf_reference
    assert _serve(Engine(model, max_slots=4, max_len=96, policy=policy), workload) == expected


def test_shuffle_shrinks_the_decode_window(hf_pair):
    _, model = hf_pair
    # Requests that finish out of order leave holes; the shuffle closes them.
    workload = [(0, [1 + i, 2, 3], n) for i, n in enumerate([3, 30, 4, 30, 5, 30, 6, 30])]
    stats = {}
    for shuffle in (True, False):
        engine = Engine(model, max_slots=8, max_len=64, shuffle=shuffle)
        outputs = _serve(engine, workload)
        stats[shuffle] = engine.stats
    assert stats[True]["decode_rows"] == stats[False]["decode_rows"]
    assert stats[True]["moves"] > 0 and stats[True]["window_rows"] < stats[False]["window_rows"]
    assert [len(o) for o in outputs] == [n for *_, n in workload]


def test_abort_mid_run_leaves_the_others_unchanged(hf_pair, hf_reference):
    _, model = hf_pair
    workload, expected = hf_reference
    engine = Engine(model, max_slots=4, max_len=96)
    ids = [engine.add_request(p, SamplingParams(max_tokens=n)) for _, p, n in workload[:6]]
    outputs = {i: [] for i in ids}
    for step in range(200):
        if step == 3:
            engine.abort(ids[1])
        for out in engine.step().outputs:
            outputs[out.id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert len(outputs[ids[1]]) < len(expected[1])
    assert [outputs[i] for k, i in enumerate(ids) if k != 1] == [e for k, e in enumerate(expected[:6]) if k != 1]
    assert engine.scheduler.slots.n_free == 4 and not engine.requests


def test_a_failing_request_fails_alone(hf_pair, monkeypatch):
    _, model = hf_pair
    real = sampling_module.sample_next

    def flaky(logits, temperature, *args):
        if temperature == 0.5:
            raise FloatingPointError("bad logits")
        return real(logits, temperature, *args)

    monkeypatch.setattr(sampling_module, "sample_next", flaky)
    engine = Engine(model, max_slots=4, max_len=64)
    good = [engine.add_request([5, 6, 7 + i], SamplingParams(max_tokens=6)) for i in range(3)]
    bad = engine.add_request([9, 9], SamplingParams(max_tokens=6, temperature=0.5))
    outs = {}
    while engine.has_unfinished():
        for out in engine.step().outputs:
            outs.setdefault(out.id, []).append(out)
    assert outs[bad][-1].finish_reason == "error" and "bad logits" in outs[bad][-1].error
    assert all(sum(len(o.new_token_ids) for o in outs[g]) == 6 for g in good)
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4))[0]  # still serving


def test_a_failing_forward_fails_its_requests_and_the_engine_recovers(hf_pair, monkeypatch):
    _, model = hf_pair
    engine = Engine(model, max_slots=2, max_len=64)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda plan: (_ for _ in ()).throw(RuntimeError("device lost")))
    (out,) = engine.step().outputs
    assert out.id == rid and out.finish_reason == "error" and "device lost" in out.error
    monkeypatch.setattr(engine.runner, "execute", real)
    assert engine.scheduler.slots.n_free == 2
    assert len(engine.generate([[4, 5]], SamplingParams(max_tokens=3))[0]) == 3


def test_stop_strings_and_stop_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_slots=2, max_len=128)
    full = engine.generate(["stop test"], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    text = tok.decode(full)
    stop = text[10:13]
    rid = engine.add_request("stop test", SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step().outputs:
            deltas.append(out.new_text)
            last = out
    assert last.id == rid and last.finish_reason == "stop"
    assert "".join(deltas) == text[:text.find(stop)] and stop not in "".join(deltas)
    by_id = engine.generate(["stop test"], SamplingParams(max_tokens=40, stop_token_ids=(full[5],), ignore_eos=True))
    assert by_id[0] == full[:full.index(full[5]) + 1]


def test_seeded_sampling_does_not_depend_on_the_batch(hf_pair):
    _, model = hf_pair
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    alone = Engine(model, max_slots=1, max_len=64).generate([[3, 1, 4]], params)[0]
    crowd = Engine(model, max_slots=4, max_len=64).generate([[2, 7], [3, 1, 4], [1, 8, 2, 8]], params)
    assert crowd[1] == alone


def test_bad_requests_are_refused_clearly(hf_pair):
    _, model = hf_pair
    engine = Engine(model, max_slots=1, max_len=32, max_queue=2)
    with pytest.raises(EffdlError, match="more than this engine's max_len of 32"):
        engine.add_request(list(range(30)), SamplingParams(max_tokens=8))
    with pytest.raises(EffdlError, match="empty"):
        engine.add_request([])
    with pytest.raises(EffdlError, match=r"\[0, 300\)"):
        engine.add_request([1, 300])
    with pytest.raises(EffdlError, match="no tokenizer"):
        engine.add_request("text")
    with pytest.raises(EffdlError, match="max_tokens must be positive"):
        SamplingParams(max_tokens=0)
    with pytest.raises(EffdlError, match="unknown policy"):
        Engine(model, policy="greedy")
    engine.add_request([1]), engine.add_request([2])
    with pytest.raises(QueueFull):
        engine.add_request([3])


def test_async_engine_streams_and_aborts_on_early_exit(hf_pair, hf_reference):
    _, model = hf_pair
    workload, expected = hf_reference
    engine = AsyncEngine(Engine(model, max_slots=3, max_len=96)).start()

    async def run(prompt, n):
        return [t async for out in engine.generate(prompt, SamplingParams(max_tokens=n)) for t in out.new_token_ids]

    async def leave_early():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=60)):
            break  # a client that went away

    async def main():
        results = await asyncio.gather(leave_early(), *(run(p, n) for _, p, n in workload))
        await engine.shutdown()
        return results[1:]

    assert asyncio.run(main()) == expected
    assert engine.engine.scheduler.slots.n_free == 3 and not engine.engine.requests


def test_shutdown_without_drain_cancels_cleanly(hf_pair):
    _, model = hf_pair
    engine = AsyncEngine(Engine(model, max_slots=2, max_len=96)).start()

    async def main():
        async def consume():
            return [out async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=80))]

        streams = [asyncio.ensure_future(consume()) for _ in range(3)]  # two running, one queued
        while engine.metrics()["live_slots"] < 2:
            await asyncio.sleep(0.005)
        await engine.shutdown(drain=False)
        with pytest.raises(EffdlError, match="shutting down"):
            await anext(engine.generate([1], SamplingParams(max_tokens=2)))
        return await asyncio.gather(*streams)

    for outputs in asyncio.run(main()):
        assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert not engine.engine.requests and engine.engine.scheduler.slots.n_free == 2


def test_an_oversized_kv_pool_is_a_clear_error(hf_pair):
    _, model = hf_pair
    with pytest.raises(EffdlError, match=r"KV pool \(100000000 slots x 256 tokens\) needs .* GiB"):
        Engine(model, max_slots=100_000_000, max_len=256)


# -- Engine's public API, as AsyncEngine uses it ---------------------------------------------------------


def test_step_outcome_says_whether_work_ran(hf_pair):
    _, model = hf_pair
    engine = Engine(model, max_slots=2, max_len=64, policy="static", batch_window_s=60.0)
    assert not engine.has_unfinished() and engine.step() == StepOutcome(ran=False)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    waiting = engine.step()  # a static batch of one waits out its window for a second request
    arrival = next(iter(engine.requests.values())).arrival
    assert not waiting.ran and not waiting.outputs and waiting.due == pytest.approx(arrival + 60.0)
    assert engine.has_unfinished() and engine.gauges() == {"queue_length": 1, "live_slots": 0, "free_slots": 2,
                                                                "kv_cache_usage": 0.0}
    engine.add_request([4, 5], SamplingParams(max_tokens=2))  # the batch is full: it runs now
    first = engine.step()
    assert first.ran and first.due is None and len(first.outputs) == 2
    assert engine.gauges() == {"queue_length": 0, "live_slots": 2, "free_slots": 0, "kv_cache_usage": 7 / 128}
    while engine.has_unfinished():
        assert engine.step().ran
    assert engine.gauges() == {"queue_length": 0, "live_slots": 0, "free_slots": 2, "kv_cache_usage": 0.0}


def test_one_queue_bound_for_the_sync_and_async_paths(hf_pair):
    _, model = hf_pair
    engine = Engine(model, max_slots=1, max_len=32, max_queue=2)
    engine.check_room(pending=1)
    with pytest.raises(QueueFull, match="the queue holds 2 waiting requests") as sync_error:
        engine.check_room(pending=2)
    engine.add_request([1]), engine.add_request([2])
    with pytest.raises(QueueFull) as add_error:
        engine.add_request([3])
    assert str(add_error.value) == str(sync_error.value)
    engine.abort_all()
    assert not engine.requests and not engine.has_unfinished()

    async_engine = AsyncEngine(Engine(model, max_slots=1, max_len=64, max_queue=1)).start()

    async def main():
        async def run():
            return [out async for out in async_engine.generate([1, 2], SamplingParams(max_tokens=60))]

        running = asyncio.ensure_future(run())
        while async_engine.metrics()["live_slots"] < 1:
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(run())
        await asyncio.sleep(0)  # let it into the inbox
        with pytest.raises(QueueFull) as async_error:
            await anext(async_engine.generate([3], SamplingParams(max_tokens=2)))
        await asyncio.gather(running, queued)
        await async_engine.shutdown()
        return str(async_error.value)

    assert asyncio.run(main()) == "the queue holds 1 waiting requests; retry later"


def test_a_runner_failure_stops_the_async_engine(hf_pair, monkeypatch):
    _, model = hf_pair
    engine = Engine(model, max_slots=1, max_len=96)
    real, calls = engine.runner.execute, []

    def failing_after_five(plan):
        calls.append(plan)
        if len(calls) > 5:
            raise RunnerFailure("tensor-parallel rank 1 failed a step")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", failing_after_five)
    async_engine = AsyncEngine(engine).start()

    async def main():
        async def run(prompt):
            return [out async for out in async_engine.generate(prompt, SamplingParams(max_tokens=80))]

        streaming = asyncio.ensure_future(run([1, 2, 3]))
        while len(calls) < 2:
            await asyncio.sleep(0.001)
        late = asyncio.ensure_future(run([4, 5]))  # queued behind it, without a token when the runner fails
        outputs = await asyncio.wait_for(streaming, 10)
        with pytest.raises(EngineStopped, match="runner failed.*rank 1 failed a step"):
            await asyncio.wait_for(late, 10)
        with pytest.raises(EngineStopped, match="restart the server"):
            await anext(async_engine.generate([6], SamplingParams(max_tokens=2)))
        await asyncio.wait_for(async_engine.shutdown(), 10)  # the loop has ended: no hang
        return outputs

    outputs = asyncio.run(main())
    assert all(o.new_token_ids for o in outputs[:-1]) and len(calls) == 6
    last = outputs[-1]
    assert last.finished and last.finish_reason == "error" and "rank 1 failed a step" in last.error
    assert not engine.requests and engine.gauges() == {"queue_length": 0, "live_slots": 0, "free_slots": 1,
                                                     "kv_cache_usage": 0.0}


# -- the sampling and stop-string functions, against independent references ------------------------------


def test_logprob_entry_matches_log_softmax_and_a_sorted_top_n():
    torch.manual_seed(0)
    logits = torch.randn(300) * 4  # (V,)
    reference = torch.softmax(logits.double(), -1).log()  # (V,)
    for token, top_n in ((7, 0), (7, 5), (int(logits.argmax()), 3), (299, 20)):
        entry = logprob_entry(logits, token, top_n)
        order = sorted(range(300), key=lambda t: -float(reference[t]))[:top_n]
        assert set(entry) == {token, *order}
        for t, value in entry.items():
            assert value == pytest.approx(float(reference[t]), abs=1e-5)
    half = logits.half()  # fp16 logits: the log-softmax still runs in fp32
    assert logprob_entry(half, 3, 0)[3] == pytest.approx(float(torch.log_softmax(half.float(), -1)[3]))


def test_sample_token_greedy_and_top_k_one_are_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(50)
    best = int(logits.argmax())
    assert sample_token(logits, SamplingParams()) == best
    assert sample_token(logits, SamplingParams(temperature=1.5, top_k=1), torch.Generator().manual_seed(0)) == best
    draws = [sample_token(logits, SamplingParams(temperature=1.0, seed=3), torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert draws[0] == draws[1]  # a seeded generator decides the draw


def test_stop_reason_token_rules():
    p = SamplingParams(max_tokens=4, stop_token_ids=(9,))
    assert stop_reason(9, 1, p, eos_id=2) == "stop"
    assert stop_reason(2, 1, p, eos_id=2) == "stop"
    assert stop_reason(2, 1, SamplingParams(max_tokens=4, ignore_eos=True), eos_id=2) is None
    assert stop_reason(2, 4, SamplingParams(max_tokens=4, ignore_eos=True), eos_id=2) == "length"
    assert stop_reason(5, 3, p, eos_id=None) is None and stop_reason(5, 4, p, eos_id=None) == "length"
    assert stop_reason(9, 4, p, eos_id=None) == "stop"  # a stop token on the last allowed token is a stop


def _brute_find(text: str, stop: list[str]) -> int:
    hits = [i for i in range(len(text) + 1) for s in stop if text[i:i + len(s)] == s]
    return min(hits, default=-1)


def _brute_held_back(text: str, stop: list[str]) -> int:
    """The longest tail of ``text`` that is a proper prefix of a stop string (0 if none)."""
    return max((k for k in range(1, len(text) + 1) for s in stop if len(s) > k and s[:k] == text[len(text) - k:]),
               default=0)


def test_stop_strings_against_brute_force():
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        assert find_stop(text, stop) == _brute_find(text, stop), (text, stop)
        assert held_back(text, stop) == _brute_held_back(text, stop), (text, stop)
    assert held_back("ab\ufffd\ufffd", ["x"]) == 2  # an unfinished multi-byte character waits whole
