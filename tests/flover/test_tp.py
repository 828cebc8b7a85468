"""Tensor parallelism over 2 gloo CPU ranks against the same model in one process."""

import time

import numpy as np
import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer
from effdl.distributed import spawn
from effdl.errors import EffdlError
from effdl.flover import Engine, SamplingParams
from effdl.flover.engine import DEFAULT_MAX_LEN, RunnerFailure
from effdl.flover.runner import ModelRunner
from effdl.flover.tp import shard_model, tp_engine

# The tiny preset has 4 query heads and 2 kv heads (GQA), both divisible by 2 ranks; 2 layers keep it quick.
TINY = ModelConfig.preset("tiny", n_layers=2)
PROMPTS = [list(range(5, 5 + n)) for n in (3, 11, 1, 7, 16)]  # mixed lengths; more prompts than slots
# Chunked prefills, slot reuse and shuffles; 4-token blocks, so that later prompts hit the earlier ones' blocks.
ENGINE_OPTIONS = dict(max_slots=3, max_len=64, prefill_chunk=8, prefix_block_size=4)
# Greedy; eos and these stop ids end requests at different steps, so slots free in the middle of the window.
PARAMS = SamplingParams(max_tokens=12, stop_token_ids=(76, 31))


def _seeded_model(cfg: ModelConfig) -> Transformer:
    """The same weights in every process: seeded, widened to N(0, 0.1) (biases too) for discriminative logits."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


LOGIT_CONFIGS = [
    TINY,
    TINY.replace(qkv_bias=True, vocab_size=257),  # biases split with their rows; a zero-padded vocab shard
    TINY.replace(n_kv_heads=4, tie_embeddings=True),  # plain multi-head; a tied LM head is split all the same
]


def _rank_checks(rank: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[int]] | None]:
    """(full and sharded logits (B, T, V) for each of LOGIT_CONFIGS, TP greedy generations or None on rank 1)."""
    logits = []
    for cfg in LOGIT_CONFIGS:
        model = _seeded_model(cfg)
        tokens = torch.randint(cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, T)
        with torch.inference_mode():
            logits.append((model(tokens).numpy(), shard_model(model, rank, 2)(tokens).numpy()))

    engine = tp_engine(_seeded_model(TINY), **ENGINE_OPTIONS)
    if engine is None:
        return logits, None  # rank 1 followed until rank 0 stopped it
    try:
        return logits, engine.generate(PROMPTS, PARAMS)
    finally:
        engine.runner.stop()


@pytest.fixture(scope="module")
def two_ranks() -> list[tuple[list[tuple[np.ndarray, np.ndarray]], list[list[int]] | None]]:
    """One 2-rank run serves every test here: starting the processes costs more than the checks.

    Results travel back as numpy arrays and lists (tensors would go through
    shared memory that dies with the rank).
    """
    return spawn(_rank_checks, 2, timeout_s=90)


def test_sharded_logits_match_the_full_model(two_ranks):
    for logits, _ in two_ranks:
        for cfg, (full, sharded) in zip(LOGIT_CONFIGS, logits, strict=True):
            assert sharded.shape == full.shape == (2, 9, cfg.vocab_size)
            np.testing.assert_allclose(sharded, full, rtol=0, atol=1e-5)


def test_tp_engine_decodes_like_one_process(two_ranks):
    reference = Engine(_seeded_model(TINY), **ENGINE_OPTIONS)
    expected = reference.generate(PROMPTS, PARAMS)
    # The workload covers slot moves and filler rows in the decode window, not only the easy path.
    assert reference.stats["moves"] > 0 and reference.stats["window_rows"] > reference.stats["decode_rows"]
    assert reference.stats["prefix_cache_hits"] > 0  # every rank loads and saves blocks in its own store
    assert [generated for _, generated in two_ranks] == [expected, None]


@pytest.mark.parametrize(("cfg", "world_size", "message"), [
    (TINY.replace(n_heads=6, n_kv_heads=3, head_dim=32), 2, "n_kv_heads 3 is not divisible by 2"),
    (TINY, 4, "n_kv_heads 2 is not divisible by 4"),
    (TINY.replace(ffn_dim=100), 8, "n_heads 4, n_kv_heads 2, ffn_dim 100 are not divisible by 8"),
    (ModelConfig.preset("moe-tiny"), 2, "does not split MoE models"),
])
def test_indivisible_shapes_and_moe_are_refused(cfg, world_size, message):
    with pytest.raises(EffdlError, match=message):
        shard_model(Transformer(cfg), 0, world_size)


# A long-context model: a default KV pool of its full length is what Engine avoids and tp_engine must too.
LONG = TINY.replace(max_seq_len=8 * DEFAULT_MAX_LEN)


def _default_pool_len(rank: int) -> tuple[int, int]:
    """(engine.max_len, tokens per slot of the KV pool actually allocated) of a tp_engine given no max_len."""
    engine = tp_engine(_seeded_model(LONG), max_slots=1)
    try:
        return engine.max_len, engine.runner.pool.cache.k.shape[3]  # (L, B, K, S, Dh)
    finally:
        engine.runner.stop()


def test_tp_engine_defaults_max_len_like_engine():
    expected = Engine(_seeded_model(LONG), max_slots=1).max_len  # the single-device engine's default
    assert expected < LONG.max_seq_len
    assert spawn(_default_pool_len, 1, timeout_s=90) == [(expected, expected)]


def _follower_fails(rank: int) -> tuple[str, float]:
    """Rank 1's runner raises on its first step; each rank returns the error it ended with and how long it took."""
    if rank == 1:
        def broken(self, plan):
            raise RuntimeError("injected follower failure")

        ModelRunner.execute = broken  # this process only: rank 0's TPRunner still runs the real step
    model = _seeded_model(TINY)
    started = time.monotonic()
    try:
        engine = tp_engine(model, **ENGINE_OPTIONS)  # rank 1 follows in here
        if engine is not None:
            engine.generate(PROMPTS, PARAMS)
    except RunnerFailure as error:
        return str(error), time.monotonic() - started
    return "no error", time.monotonic() - started


def test_a_failing_follower_ends_the_group_instead_of_hanging():
    # The group's collectives time out after spawn's 120 s: an error well before that is the follower's, not a timeout.
    (leader, leader_s), (follower, _) = spawn(_follower_fails, 2, timeout_s=120)
    assert "tensor-parallel rank 1 failed" in follower and "injected follower failure" in follower
    assert "tensor-parallel rank 0 lost its group mid-step: another rank failed" in leader
    assert leader_s < 30
