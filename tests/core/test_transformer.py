"""The model against independent references: a naive attention written here, a per-token MoE loop,
and transformers' RoPE initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from effdl.core.config import ModelConfig
from effdl.core.generate import generate, generate_batch, sample_next
from effdl.core.moe import MoEFeedForward
from effdl.core.transformer import KVCache, Transformer, rope_inv_freq


def _model(**overrides):
    return Transformer(ModelConfig.preset("tiny", **overrides)).eval()


def test_forward_shape_and_input_check():
    model = _model()
    assert model(torch.randint(0, 258, (3, 11))).shape == (3, 11, 258)
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        model(torch.randint(0, 258, (11,)))


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_kv_cache_decode_equals_full_forward(preset):
    model = Transformer(ModelConfig.preset(preset)).eval()
    tokens = torch.randint(0, 258, (2, 24))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
        cache = KVCache.allocate(model.config, 2, 32)
        pieces = [model(tokens[:, :10], positions=torch.tensor([0, 0]), cache=cache)]
        for t in range(10, 24):
            pieces.append(model(tokens[:, t:t + 1], positions=torch.tensor([t, t]), cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reach 33, past the KV cache length 32"):
        model(tokens[:, :2], positions=torch.tensor([0, 31]), cache=cache)


def test_rows_of_different_lengths_share_one_cache():
    """Rows at positions 5 and 13 decode in one batch; each must match its own full forward."""
    model = _model()
    seqs = [torch.randint(0, 258, (n,)) for n in (5 + 6, 13 + 6)]
    with torch.no_grad():
        cache = KVCache.allocate(model.config, 2, 32)
        padded = torch.zeros(2, 13, dtype=torch.long)
        padded[0, :5], padded[1, :13] = seqs[0][:5], seqs[1][:13]
        model(padded, positions=torch.tensor([0, 0]), cache=cache)
        lengths = torch.tensor([5, 13])
        for step in range(6):
            step_tokens = torch.stack([seqs[0][5 + step], seqs[1][13 + step]])[:, None]  # (2, 1)
            logits = model(step_tokens, positions=lengths + step, cache=cache)[:, -1]
            for row in range(2):
                upto = int(lengths[row]) + step + 1
                reference = model(seqs[row][None, :upto])[0, -1]
                torch.testing.assert_close(logits[row], reference, atol=1e-5, rtol=1e-5)


def _naive_attention(q, k, v, window=None):
    """Softmax attention written out: (B, H, T, Dh) queries, (B, K, T, Dh) keys/values."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    i = torch.arange(q.shape[2])
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_attention_layer_against_naive_softmax(window):
    model = _model(sliding_window=window)
    attn = model.layers[0].attention
    x = torch.randn(2, 12, 128)
    pos = torch.arange(12).expand(2, 12)
    from effdl.core.transformer import apply_rope, causal_mask, rope_cos_sin

    cos, sin = rope_cos_sin(pos, model.inv_freq)
    mask = causal_mask(pos, 12, window) if window else None
    with torch.no_grad():
        out = attn(x, cos, sin, mask, None, None)
        q, k, v = attn.wqkv(x).split([4 * 32, 2 * 32, 2 * 32], dim=-1)
        q = apply_rope(q.view(2, 12, 4, 32).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(2, 12, 2, 32).transpose(1, 2), cos, sin)
        v = v.view(2, 12, 2, 32).transpose(1, 2)
        ref = attn.wo(_naive_attention(q, k, v, window).transpose(1, 2).reshape(2, 12, 128))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_model_decode_matches_full_forward():
    model = _model(sliding_window=6)
    tokens = torch.randint(0, 258, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(model.config, 1, 20)
        steps = [model(tokens[:, t:t + 1], positions=torch.tensor([t]), cache=cache) for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_moe_matches_per_token_loop():
    moe = MoEFeedForward(dim=16, ffn_dim=24, n_experts=4, experts_per_token=2)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out = moe(x)
        ref = torch.zeros_like(x)
        for b in range(3):
            for t in range(5):
                probs = F.softmax(moe.gate(x[b, t]), dim=-1)  # Mixtral: softmax over all, renormalise top-k
                w, e = probs.topk(2)
                w = w / w.sum()
                for weight, expert in zip(w, e, strict=True):
                    w1, w3 = moe.w13[expert].chunk(2)
                    h = F.silu(w1 @ x[b, t]) * (w3 @ x[b, t])
                    ref[b, t] += weight * (moe.w2[expert] @ h)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.preset("tiny", rope_theta=50000.0, rope_scaling=scaling)
    hf = LlamaConfig(**cfg.to_hf())
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), expected.float())


def test_generate_batch_equals_one_at_a_time():
    model = _model(eos_id=None)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 17, 8)]
    batched = generate_batch(model, prompts, 12)
    assert batched == [generate(model, p, 12) for p in prompts]


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    assert sample_next(logits).tolist() == [2]
    g = torch.Generator().manual_seed(0)
    # top_k=1 and a tiny top_p both reduce sampling to the argmax.
    assert {int(sample_next(logits, 1.0, top_k=1, generator=g)) for _ in range(20)} == {2}
    assert {int(sample_next(logits, 1.0, top_p=0.01, generator=g)) for _ in range(20)} == {2}
    # top_p=0.9 keeps exactly the tokens whose preceding mass is below 0.9.
    probs = logits.softmax(-1)[0]
    seen = {int(sample_next(logits, 1.0, top_p=0.9, generator=g)) for _ in range(300)}
    kept = {2, 3} if probs[2] + probs[3] >= 0.9 else {1, 2, 3}
    assert seen == kept
