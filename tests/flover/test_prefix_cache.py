"""Automatic prefix caching: the index against a brute-force reference, and the engine's tokens with it on and off."""

import argparse
import random

import pytest
import torch

import effdl.flover.prefix_cache as prefix_cache_module
from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover import Engine, SamplingParams, cli, server
from effdl.flover.prefix_cache import PrefixIndex, block_keys
from effdl.flover.runner import ModelRunner
from effdl.flover.scheduler import BlockCopy, PrefillChunk, StepPlan

# -- the index against a naive dict of every cached prefix ------------------------------------------------


class NaivePrefixCache:
    """Every cached prefix (a tuple of whole blocks) with its last-use time; LRU by scanning them all."""

    def __init__(self, capacity: int, block_size: int):
        self.capacity, self.b = capacity, block_size
        self.used: dict[tuple[int, ...], int] = {}
        self.clock = 0

    def _prefixes(self, tokens: list[int], n: int) -> list[tuple[int, ...]]:
        return [tuple(tokens[:(i + 1) * self.b]) for i in range(n)]

    def _matched(self, tokens: list[int], limit: int) -> int:
        return next((i for i, p in enumerate(self._prefixes(tokens, limit)) if p not in self.used), limit)

    def _touch(self, prefixes: list[tuple[int, ...]]) -> None:
        for p in reversed(prefixes):  # the shorter a prefix, the more recent: it serves all its extensions
            self.clock += 1
            self.used[p] = self.clock

    def lookup(self, tokens: list[int]) -> int:
        k = self._matched(tokens, (len(tokens) - 1) // self.b)
        self._touch(self._prefixes(tokens, k))
        return k

    def insert(self, tokens: list[int]) -> tuple[int, int]:
        n = len(tokens) // self.b
        m = self._matched(tokens, n)
        chain = self._prefixes(tokens, m)
        self._touch(chain)
        new = self._prefixes(tokens, n)[m:m + self.capacity - m]
        for p in new:
            if len(self.used) == self.capacity:
                victim = min(self.used, key=self.used.get)
                assert not any(q[:len(victim)] == victim and q != victim for q in self.used), "evicted a parent"
                del self.used[victim]
            self.used[p] = 2**62  # newest until the touch below orders the chain
        self._touch(chain + new)
        return m, len(new)

    def discard(self, prefix: tuple[int, ...]) -> None:
        for q in [q for q in self.used if q[:len(prefix)] == prefix]:
            del self.used[q]


def _random_prompt(rng: random.Random, seen: list[list[int]]) -> list[int]:
    """Often an extension or a cut of an earlier prompt, so that prefixes are shared; tokens from {0, 1, 2}."""
    base = rng.choice(seen)[:rng.randint(0, 12)] if seen and rng.random() < 0.7 else []
    return base + [rng.randrange(3) for _ in range(rng.randint(1 if not base else 0, 8))]


@pytest.mark.parametrize("seed", range(40))
def test_index_matches_a_brute_force_reference(seed):
    rng = random.Random(seed)
    capacity, b = rng.randint(1, 8), rng.choice([1, 2, 3])
    index, naive = PrefixIndex(capacity, b), NaivePrefixCache(capacity, b)
    owner: dict[int, tuple[int, ...]] = {}  # block-store row -> the prefix it was filled with
    seen: list[list[int]] = []
    for _ in range(150):
        tokens = _random_prompt(rng, seen)
        seen.append(tokens)
        op = rng.random()
        if op < 0.45:
            rows = index.lookup(tokens)
            assert len(rows) == naive.lookup(tokens)
            assert [owner[r] for r in rows] == naive._prefixes(tokens, len(rows))
        elif op < 0.9:
            first, rows = index.insert(tokens)
            assert (first, len(rows)) == naive.insert(tokens)
            for i, row in enumerate(rows, start=first):
                owner[row] = tuple(tokens[:(i + 1) * b])
        elif index.blocks:
            row = rng.choice([block.row for block in index.blocks.values()])
            index.discard(row)
            naive.discard(owner[row])
        assert len(index) == len(naive.used) <= capacity
        assert {owner[block.row] for block in index.blocks.values()} == set(naive.used)
        assert len({block.row for block in index.blocks.values()}) == len(index)  # no row serves two blocks


def test_colliding_keys_never_serve_another_prefix(monkeypatch):
    def colliding(tokens, block_size):  # keys in {1, 2, 3}: almost every block collides with another
        return [1 + k % 3 for k in block_keys(tokens, block_size)]

    monkeypatch.setattr(prefix_cache_module, "block_keys", colliding)
    rng = random.Random(0)
    index, owner, seen = PrefixIndex(6, 2), {}, []
    for _ in range(300):
        tokens = _random_prompt(rng, seen)
        seen.append(tokens)
        first, rows = index.insert(tokens)
        for i, row in enumerate(rows, start=first):
            owner[row] = tuple(tokens[:(i + 1) * 2])
        probe = _random_prompt(rng, seen)
        rows = index.lookup(probe)
        assert [owner[r] for r in rows] == [tuple(probe[:(i + 1) * 2]) for i in range(len(rows))]


def test_lookup_leaves_the_last_token_to_compute():
    index = PrefixIndex(8, 4)
    assert index.insert(list(range(8))) == (0, [0, 1])
    assert index.lookup(list(range(8))) == [0]  # 8 tokens, 2 blocks cached: the second holds the last token
    assert index.lookup(list(range(9))) == [0, 1]
    assert index.lookup(list(range(3))) == []
    assert index.insert(list(range(12))) == (2, [2])


def test_a_bad_capacity_is_refused():
    with pytest.raises(EffdlError, match="positive capacity"):
        PrefixIndex(0)
    with pytest.raises(EffdlError, match="positive capacity"):
        Engine(Transformer(ModelConfig.preset("tiny", n_layers=1)), max_slots=1, max_len=32, prefix_cache_blocks=0)


# -- the engine: same greedy tokens with the cache on and off ---------------------------------------------

VOCAB = 256


@pytest.fixture(scope="module")
def model(widened_model):
    return widened_model(n_layers=2)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _run(engine: Engine, prompts: list[list[int]], max_tokens: list[int], every: int | None) -> list[list[int]]:
    """Greedy outputs; ``every`` None: all arrive at once; 0: each once the previous finished; k: every k steps."""
    pending, outputs, ids, step = list(zip(prompts, max_tokens, strict=True)), {}, [], 0
    while pending or engine.has_unfinished():
        due = not engine.has_unfinished() if every == 0 else every is None or step % every == 0
        while pending and due:
            prompt, n = pending.pop(0)
            ids.append(engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
            outputs[ids[-1]] = []
            due = every is None
        for out in engine.step().outputs:
            assert out.error is None, out.error
            outputs[out.id] += out.new_token_ids
        step += 1
    return [outputs[i] for i in ids]


def _workloads() -> dict[str, tuple[list[list[int]], list[int]]]:
    """(prompts, max_tokens) sharing long prefixes: a system prompt, few-shot examples."""
    rng = random.Random(1)
    system = _tokens(rng, 64)
    shots = [t for _ in range(3) for t in [*_tokens(rng, 14), 7, 7]]  # three examples, each ending in a separator
    return {
        "system prompt": ([system + _tokens(rng, rng.randint(1, 20)) for _ in range(6)], [3, 12, 5, 9, 2, 7]),
        "few-shot": ([shots + _tokens(rng, rng.randint(1, 12)) for _ in range(5)], [6, 2, 8, 4, 5]),
    }


@pytest.mark.parametrize("every", [None, 0, 3], ids=["together", "one after another", "every 3 steps"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "no shuffle"])
@pytest.mark.parametrize("workload", ["system prompt", "few-shot"])
def test_same_tokens_with_and_without_the_cache(model, workload, shuffle, every):
    prompts, max_tokens = _workloads()[workload]
    options = dict(max_slots=3, max_len=128, prefill_chunk=24, shuffle=shuffle)
    expected = _run(Engine(model, prefix_caching=False, **options), prompts, max_tokens, every)
    engine = Engine(model, **options)
    assert _run(engine, prompts, max_tokens, every) == expected
    assert engine.stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert engine.stats["prefix_cache_hits"] > 0 and engine.stats["prefix_cache_hits"] % 16 == 0


def test_the_runner_loads_before_the_moves_and_saves_after_the_prefill(model):
    """A request loaded into slot 0, moved to slot 2 in the same step and prefilled there gets the logits of a
    whole-prompt prefill; the blocks it saves from slot 2 are the ones its prefill wrote."""
    prompt = _tokens(random.Random(8), 40)
    runner = ModelRunner(model, n_slots=3, max_len=64, prefix_rows=4, block_size=16)
    whole = StepPlan(prefill=[PrefillChunk("a", 1, 0, prompt, sample=True)], saves=[BlockCopy(1, 0, [2, 3])])
    _, expected = runner.execute(whole)
    cached = StepPlan(loads=[BlockCopy(0, 0, [2, 3])], moves=[(0, 2, 32)],
                      prefill=[PrefillChunk("b", 2, 32, prompt[32:], sample=True)], saves=[BlockCopy(2, 1, [0])])
    _, logits = runner.execute(cached)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    k, v = runner.pool.cache.k, runner.pool.cache.v  # (L, slots, K, max_len, Dh)
    torch.testing.assert_close(k[:, 2, :, :40], k[:, 1, :, :40], rtol=0, atol=1e-5)
    torch.testing.assert_close(runner.store.k[:, 0], k[:, 2, :, 16:32], rtol=0, atol=0)  # (L, K, B, Dh)
    torch.testing.assert_close(runner.store.v[:, 2], v[:, 1, :, :16], rtol=0, atol=0)


def test_a_multi_turn_chat_reuses_the_previous_turn(model):
    rng = random.Random(3)
    turn1 = _tokens(rng, 40)
    results = {}
    for caching in (False, True):
        engine = Engine(model, max_slots=2, max_len=160, prefix_caching=caching)
        answer1 = _run(engine, [turn1], [12], None)[0]
        turn2 = turn1 + answer1 + _tokens(random.Random(4), 9)
        answer2 = _run(engine, [turn2], [10], None)[0]
        results[caching] = (answer1, answer2, engine.stats)
    assert results[True][:2] == results[False][:2]
    assert results[True][2]["prefix_cache_hits"] == 32  # turn 1's two full prompt blocks
    assert results[False][2]["prefix_cache_hits"] == results[False][2]["prefix_cache_queries"] == 0


def test_hits_count_the_shared_prefix_in_tokens(model):
    rng = random.Random(5)
    shared = _tokens(rng, 64)
    engine = Engine(model, max_slots=2, max_len=128)
    _run(engine, [shared + _tokens(rng, 5)], [3], None)
    assert engine.stats["prefix_cache_hits"] == 0
    _run(engine, [shared + _tokens(rng, 7)], [3], None)
    assert engine.stats["prefix_cache_hits"] == 64
    assert engine.stats["prefix_cache_queries"] == 69 + 71


def test_an_evicted_prefix_is_recomputed(model):
    rng = random.Random(6)
    a, b = _tokens(rng, 64), _tokens(rng, 64)
    prompts = [[*a, 1, 2], [*b, 3], [*a, 4, 5, 6]]
    expected = _run(Engine(model, max_slots=1, max_len=96, prefix_caching=False), prompts, [4, 4, 4], 0)
    engine = Engine(model, max_slots=1, max_len=96, prefix_cache_blocks=6)
    hits = []
    for prompt, out in zip(prompts, expected, strict=True):
        assert _run(engine, [prompt], [4], None) == [out]
        hits.append(engine.stats["prefix_cache_hits"])
        assert len(engine.scheduler.prefix) <= 6
    # b's 4 blocks took the 2 free rows and evicted a's last 2 blocks (the least recent leaves): a keeps 32 tokens.
    assert hits == [0, 0, 32]


def test_a_failed_step_uncaches_what_it_was_to_save(model, monkeypatch):
    rng = random.Random(7)
    shared = _tokens(rng, 32)
    engine = Engine(model, max_slots=1, max_len=64)
    run = engine.runner._run

    def fail(plan):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "_run", fail)
    engine.add_request([*shared, 1], SamplingParams(max_tokens=2))
    assert engine.step().outputs[0].error  # the forward failed: the 2 blocks it was to save never arrived
    assert len(engine.scheduler.prefix) == 0
    monkeypatch.setattr(engine.runner, "_run", run)
    expected = _run(Engine(model, max_slots=1, max_len=64, prefix_caching=False), [[*shared, 2]], [4], None)
    assert _run(engine, [[*shared, 2]], [4], None) == expected
    assert engine.stats["prefix_cache_hits"] == 0


def test_static_policy_uses_the_cache_too(model):
    prompts, max_tokens = _workloads()["system prompt"]
    options = dict(max_slots=2, max_len=128, policy="static")
    expected = _run(Engine(model, prefix_caching=False, **options), prompts, max_tokens, None)
    engine = Engine(model, **options)
    assert _run(engine, prompts, max_tokens, None) == expected
    assert engine.stats["prefix_cache_hits"] == 4 * 64  # every batch after the first


@pytest.mark.parametrize(("flags", "caching"), [([], True), (["--no-prefix-caching"], False)])
def test_the_serve_flag_reaches_the_engine_options(monkeypatch, flags, caching):
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["serve", *flags])
    seen = {}
    monkeypatch.setattr(server, "serve", lambda *_, **options: seen.update(options))
    args.func(args)
    assert seen["prefix_caching"] is caching
