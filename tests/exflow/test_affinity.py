"""Affinity statistics against hand-computed arrays and a naive mutual-information loop; routing traces
against the router logits of a forward pass stepped through the layers by hand."""

import math

import numpy as np
import pytest
import torch

from effdl.core.config import ModelConfig
from effdl.core.transformer import Transformer, rope_cos_sin
from effdl.errors import EffdlError
from effdl.exflow.affinity import affinity_score, conditional_probs, plot_affinity, transition_counts
from effdl.exflow.trace import RoutingTrace, record_trace

# ------------------------------------------------------------------ transition counts

# Three tokens through three layers of three experts, top-1: (N, L, k) = (3, 3, 1).
TOP1_TRACE = np.array([[0, 1, 2], [0, 1, 1], [2, 0, 1]])[..., None]
TOP1_COUNTS = np.array(
    [
        [[0, 2, 0], [0, 0, 0], [1, 0, 0]],  # layer 0 -> 1: 0->1 twice, 2->0 once
        [[0, 1, 0], [0, 1, 1], [0, 0, 0]],  # layer 1 -> 2: 1->2, 1->1, 0->1
    ],
    dtype=float,
)


def test_transition_counts_top1_by_hand():
    counts = transition_counts(TOP1_TRACE, 3)
    assert counts.shape == (2, 3, 3) and counts.dtype == np.float64
    np.testing.assert_array_equal(counts, TOP1_COUNTS)
    np.testing.assert_array_equal(transition_counts(TOP1_TRACE.astype(np.int16), 4)[:, :3, :3], TOP1_COUNTS)
    assert transition_counts(TOP1_TRACE, 4)[:, 3].sum() == transition_counts(TOP1_TRACE, 4)[:, :, 3].sum() == 0
    assert transition_counts(TOP1_TRACE[:, :1], 3).shape == (0, 3, 3)  # one layer: no transition


def test_transition_counts_top2_weights_each_pair_by_a_quarter():
    # token 0: {0, 1} -> {2, 0}; token 1: {2, 1} -> {2, 1}. Each of a token's 4 pairs counts 1/4.
    trace = np.array([[[0, 1], [2, 0]], [[2, 1], [2, 1]]])
    want = np.array([[[0.25, 0, 0.25], [0.25, 0.25, 0.5], [0, 0.25, 0.25]]])
    np.testing.assert_array_equal(transition_counts(trace, 3), want)
    assert transition_counts(trace, 3).sum() == 2  # every token adds exactly one per transition


def test_transition_counts_against_naive_loop():
    rng = np.random.default_rng(0)
    n_tokens, n_layers, k, n_experts = 50, 4, 3, 6
    trace = np.stack([[rng.choice(n_experts, k, replace=False) for _ in range(n_layers)] for _ in range(n_tokens)])
    want = np.zeros((n_layers - 1, n_experts, n_experts))
    for token in trace:
        for layer in range(n_layers - 1):
            for i in token[layer]:
                for j in token[layer + 1]:
                    want[layer, i, j] += 1 / k**2
    np.testing.assert_allclose(transition_counts(trace, n_experts), want, rtol=1e-12)


def test_transition_counts_bad_input():
    with pytest.raises(EffdlError, match=r"expert ids must lie in \[0, 3\), found 0\.\.3"):
        transition_counts(np.array([[[0], [3]]]), 3)
    with pytest.raises(EffdlError, match=r"expert ids must lie in \[0, 3\), found -1\.\.2"):
        transition_counts(np.array([[[-1], [2]]]), 3)
    with pytest.raises(EffdlError, match=r"expert ids must be \(tokens, layers, k\), got shape \(3, 3\)"):
        transition_counts(TOP1_TRACE[..., 0], 3)


# ------------------------------------------------------------------ conditional probabilities and score


def test_conditional_probs_by_hand_and_rows_sum_to_one():
    probs = conditional_probs(TOP1_COUNTS)
    want = np.array(
        [
            [[0, 1, 0], [0, 0, 0], [1, 0, 0]],  # expert 1 of layer 0 is never visited: a zero row
            [[0, 1, 0], [0, 0.5, 0.5], [0, 0, 0]],
        ]
    )
    np.testing.assert_array_equal(probs, want)

    counts = np.random.default_rng(1).integers(0, 5, (3, 7, 7)).astype(float)
    counts[1, 4] = 0  # an unvisited row
    sums = conditional_probs(counts).sum(axis=-1)
    np.testing.assert_allclose(sums, np.where(counts.sum(axis=-1) > 0, 1.0, 0.0), rtol=1e-12)
    assert sums[1, 4] == 0


def _naive_score(counts: np.ndarray) -> float:
    """Mean over non-empty transitions of I(X; Y) / H(Y), with plain loops over the joint table."""
    scores = []
    for c in counts:
        total = c.sum()
        if total == 0:
            continue
        n = len(c)
        p_x = [sum(c[i, j] for j in range(n)) / total for i in range(n)]
        p_y = [sum(c[i, j] for i in range(n)) / total for j in range(n)]
        mutual = sum(
            c[i, j] / total * math.log(c[i, j] / total / (p_x[i] * p_y[j]))
            for i in range(n)
            for j in range(n)
            if c[i, j] > 0
        )
        entropy = -sum(p * math.log(p) for p in p_y if p > 0)
        scores.append(mutual / entropy if entropy > 0 else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def test_affinity_score_extremes_and_naive_mutual_information():
    p_src, p_dst = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.5, 0.25, 0.125, 0.125])
    independent = np.stack([1000 * np.outer(p_src, p_dst), 37 * np.outer(p_dst, p_src)])
    assert affinity_score(independent) == pytest.approx(0.0, abs=1e-12)

    permutation = np.zeros((2, 4, 4))
    permutation[0, [0, 1, 2, 3], [2, 0, 3, 1]] = [5, 1, 7, 3]  # each expert sends all its tokens to one expert
    permutation[1, [0, 1, 2, 3], [1, 3, 0, 2]] = [2, 2, 9, 4]
    assert affinity_score(permutation) == pytest.approx(1.0, rel=1e-12)
    assert affinity_score(np.concatenate([permutation, np.zeros((1, 4, 4))])) == pytest.approx(1.0)  # empty: skipped
    assert affinity_score(np.zeros((2, 4, 4))) == 0.0
    one_target = np.zeros((1, 3, 3))
    one_target[0, :, 1] = [1, 2, 3]  # H(Y) = 0: every token goes to one expert
    assert affinity_score(one_target) == 0.0

    counts = np.random.default_rng(2).integers(0, 6, (4, 6, 6)).astype(float)
    score = affinity_score(counts)
    assert 0 < score < 1
    assert score == pytest.approx(_naive_score(counts), rel=1e-10)


# ------------------------------------------------------------------ routing traces


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(name, n_layers=3))
    model.reset_parameters(std=0.1)
    return model


@torch.no_grad()
def _route_by_hand(model: Transformer, windows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Experts and gate weights (W*T, L, k), stepping through the layers and calling each router directly."""
    cfg = model.config
    B, T = windows.shape
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), model.inv_freq)
    h = model.tok_embeddings(windows)  # (W, T, D)
    experts, weights = [], []
    for block in model.layers:
        h = h + block.attention(block.attention_norm(h), cos, sin, None, None, None)
        x = block.ffn_norm(h)
        probs = block.feed_forward.gate(x).float().softmax(dim=-1).flatten(0, 1)  # (W*T, E)
        top = probs.sort(dim=-1, descending=True)
        w = top.values[:, : cfg.experts_per_token]
        experts.append(top.indices[:, : cfg.experts_per_token])
        weights.append(w / w.sum(-1, keepdim=True) if cfg.norm_topk_prob else w)
        h = h + block.feed_forward(x)
    return torch.stack(experts, 1).numpy(), torch.stack(weights, 1).numpy()  # (W*T, L, k) each


@pytest.mark.parametrize(
    ("name", "fingerprint"),
    [
        ("gpt-moe-8e", "mixtral layers=3 experts=8 top1 dim=128"),
        ("moe-tiny", "mixtral layers=3 experts=8 top2 dim=128"),
    ],
    ids=["top1", "top2"],
)
def test_record_trace_equals_router_by_hand(name, fingerprint):
    model = _model(name)
    model.train()
    stream = torch.randint(0, 258, (3 * 16 + 5,), generator=torch.Generator().manual_seed(3))
    trace = record_trace(model, stream, seq_len=16, batch_size=2, source="test stream")  # 3 windows, tail dropped

    k = model.config.experts_per_token
    assert trace.experts.shape == trace.weights.shape == (48, 3, k)
    assert (trace.experts.dtype, trace.weights.dtype) == (np.int16, np.float32)
    assert (trace.n_tokens, trace.n_layers, trace.top_k, trace.n_experts) == (48, 3, k, 8)
    assert (trace.model, trace.source) == (fingerprint, "test stream")
    assert model.training  # restored
    assert all(not block.feed_forward.gate._forward_hooks for block in model.layers)  # hooks removed

    experts, weights = _route_by_hand(model, stream[:48].view(3, 16))
    np.testing.assert_array_equal(trace.experts, experts)
    np.testing.assert_allclose(trace.weights, weights, atol=1e-6, rtol=0)
    if k == 1:
        assert (trace.weights < 1).all()  # softmax-over-all probabilities, not renormalised
    else:
        np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-6)


def test_trace_save_load_and_model_check(tmp_path):
    model = _model("gpt-moe-8e")
    trace = record_trace(model, torch.arange(40) % 258, seq_len=8, batch_size=4, source="arange")
    path = trace.save(tmp_path / "sub" / "trace.npz")
    loaded = RoutingTrace.load(path)
    np.testing.assert_array_equal(loaded.experts, trace.experts)
    np.testing.assert_array_equal(loaded.weights, trace.weights)
    assert (loaded.experts.dtype, loaded.weights.dtype) == (np.int16, np.float32)
    assert (loaded.n_experts, loaded.model, loaded.source) == (8, "mixtral layers=3 experts=8 top1 dim=128", "arange")

    loaded.check_model(model.config)  # fits: no error
    with pytest.raises(EffdlError, match="the trace has 3 layers x 8 experts but the model has 4 x 8"):
        loaded.check_model(ModelConfig.preset("moe-tiny"))
    with pytest.raises(EffdlError, match="the trace has 3 layers x 8 experts but the model has 3 x 16"):
        loaded.check_model(ModelConfig.preset("gpt-moe-16e", n_layers=3))
    with pytest.raises(EffdlError, match=r"routing trace .*missing\.npz does not exist"):
        RoutingTrace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(EffdlError, match=r"junk\.npz is not a routing trace written by effdl"):
        RoutingTrace.load(tmp_path / "junk.npz")


def test_record_trace_bad_input():
    with pytest.raises(EffdlError, match=r"routing traces need a mixture-of-experts model \(n_experts > 0\)"):
        record_trace(Transformer(ModelConfig.preset("tiny", n_layers=1)), torch.arange(64))
    with pytest.raises(EffdlError, match="15 tokens do not fill one window of seq_len 16"):
        record_trace(_model("gpt-moe-8e"), torch.arange(15), seq_len=16)


def test_plot_affinity_writes_png(tmp_path):
    counts = np.random.default_rng(4).integers(0, 5, (5, 8, 8)).astype(float)
    path = plot_affinity(tmp_path / "plots" / "affinity.png", counts, "random", layers=[0, 3])
    assert path == tmp_path / "plots" / "affinity.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    default = plot_affinity(tmp_path / "default.png", counts, "first four")
    assert default.read_bytes().startswith(b"\x89PNG")
