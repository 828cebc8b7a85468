"""One flat forward over a step's prefill chunks and decode rows equals each group run as its own cached forward."""

import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import KVCache, Transformer
from effdl.flover.ragged import AttentionGroup, ragged_forward

CONFIGS = {
    "mha": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64),
    "gqa": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64),
    "sliding window": ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  max_seq_len=64, sliding_window=5),
}
SLOTS, MAX_LEN = 8, 48


def history(model: Transformer, lengths: dict[int, int], seed: int) -> KVCache:
    """A cache whose slot s holds ``lengths[s]`` positions of a random prompt; the others hold noise."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache.allocate(model.config, SLOTS, MAX_LEN)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    for slot, n in lengths.items():
        if n:
            prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
            window = KVCache(cache.k[:, slot:slot + 1], cache.v[:, slot:slot + 1])
            model(prompt, torch.zeros(1, dtype=torch.long), window)
    return cache


@pytest.mark.parametrize("live_decode", [False, True], ids=["masked SDPA", "live-length kernel"])
@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_one_flat_pass_equals_each_group_as_its_own_forward(name, live_decode):
    torch.manual_seed(0)
    model = Transformer(CONFIGS[name]).eval()
    V = model.config.vocab_size
    # slot 0: a later chunk (positions 7..12); slot 2: a first chunk; slots 3..6: decode rows at their lengths.
    decode_starts = (9, 1, 20, 14)
    lengths = {0: 7, 2: 0, 3: 9, 4: 1, 5: 20, 6: 14}
    chunks = [(0, 7, torch.randint(0, V, (6,))), (2, 0, torch.randint(0, V, (11,)))]
    decode_tokens = torch.randint(0, V, (4,))
    ours, reference = history(model, lengths, seed=1), history(model, lengths, seed=1)

    groups, offset = [], 0
    for slot, start, tokens in chunks:
        groups.append(AttentionGroup(offset, slot, (start,), len(tokens)))
        offset += len(tokens)
    groups.append(AttentionGroup(offset, 3, decode_starts, 1))
    flat = torch.cat([t for _, _, t in chunks] + [decode_tokens])  # (N,)
    sample_at = torch.tensor([5, 16, 17, 18, 19, 20])  # both chunks' last tokens and every decode row
    logits = ragged_forward(model, flat, groups, ours, sample_at, live_decode)

    expected = []
    for slot, start, tokens in chunks:
        window = KVCache(reference.k[:, slot:slot + 1], reference.v[:, slot:slot + 1])
        expected.append(model(tokens[None], torch.tensor([start]), window)[0, -1])
    window = KVCache(reference.k[:, 3:7], reference.v[:, 3:7])
    expected += list(model(decode_tokens[:, None], torch.tensor(decode_starts), window)[:, -1])
    torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.k, reference.k, rtol=1e-5, atol=1e-5)  # same writes, nothing else touched
    torch.testing.assert_close(ours.v, reference.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("live_decode", [False, True], ids=["masked SDPA", "live-length kernel"])
@torch.inference_mode()
def test_flat_pass_of_decode_rows_alone_equals_a_naive_softmax_decode(live_decode):
    """Independent of the model's own cached path: attention written out as softmax(q k^T / sqrt(Dh)) v."""
    torch.manual_seed(0)
    cfg = CONFIGS["gqa"]
    model = Transformer(cfg).eval()
    starts = (4, 11, 2)
    cache = history(model, {1: 4, 2: 11, 3: 2}, seed=2)
    tokens = torch.randint(0, cfg.vocab_size, (3,))
    before = KVCache(cache.k.clone(), cache.v.clone())
    logits = ragged_forward(model, tokens, [AttentionGroup(0, 1, starts, 1)], cache, torch.arange(3), live_decode)

    h = model.embed(tokens[:, None])  # (B, 1, D)
    cos, sin = model.rope(torch.tensor(starts)[:, None])
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)  # (B, H, 1, Dh), (B, K, 1, Dh)
        outs = []
        for b, p in enumerate(starts):
            keys = torch.cat([before.k[i, 1 + b, :, :p], k[b]], dim=1)  # (K, p + 1, Dh)
            values = torch.cat([before.v[i, 1 + b, :, :p], v[b]], dim=1)
            keys, values = (t.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=0) for t in (keys, values))
            weights = (q[b] @ keys.transpose(-1, -2) / cfg.head_dim ** 0.5).softmax(-1)  # (H, 1, p + 1)
            outs.append(weights @ values)  # (H, 1, Dh)
        h = layer.ffn_residual(layer.attention_residual(h, torch.stack(outs)))
    torch.testing.assert_close(logits, model.head(h[:, 0]), rtol=1e-4, atol=1e-4)


def test_a_group_past_the_cache_length_is_refused_before_anything_is_written():
    model = Transformer(CONFIGS["mha"]).eval()
    cache = KVCache.allocate(model.config, SLOTS, MAX_LEN)
    with pytest.raises(ValueError, match=f"reach {MAX_LEN + 2}, past the KV cache length {MAX_LEN}"):
        ragged_forward(model, torch.zeros(4, dtype=torch.long), [AttentionGroup(0, 1, (MAX_LEN - 2,), 4)], cache,
                       torch.tensor([3]))
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0
