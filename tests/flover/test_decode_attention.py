"""The live-length decode kernel against attention written out in float64, and its refusals."""

import warnings

import pytest
import torch

from effdl.flover import decode_attention as module
from effdl.flover.decode_attention import decode_attention


def naive(q, k, v, lengths, window):
    """softmax(q k^T / sqrt(Dh)) v per row and head, over the row's visible keys, in float64."""
    B, H, Dh = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, H, Dh, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        first = max(0, n - window) if window else 0
        for h in range(H):
            keys, values = k[b, h // group, first:n].double(), v[b, h // group, first:n].double()
            weights = (keys @ q[b, h].double() / Dh ** 0.5).softmax(0)  # (n - first,)
            out[b, h] = weights @ values
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (8, 2, None), (4, 2, 3)],
                         ids=["mha", "gqa", "sliding window"])
def test_equals_a_float64_softmax_over_each_rows_own_keys(heads, kv_heads, window):
    gen = torch.Generator().manual_seed(0)
    slots, S, Dh = 7, 40, 16
    cache_k, cache_v = (torch.randn(slots, kv_heads, S, Dh, generator=gen) for _ in range(2))
    rows = slice(1, 6)  # consecutive slots out of a larger cache, as a decode group is
    lengths = torch.tensor([1, 40, 17, 2, 33])  # a first token, a full row and lengths in between
    q = torch.randn(5, heads, Dh, generator=gen)
    out = decode_attention(q, cache_k[rows], cache_v[rows], lengths, window)
    expected = naive(q, cache_k[rows], cache_v[rows], lengths, window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (8, 2, None), (4, 2, 3)],
                         ids=["mha", "gqa", "sliding window"])
def test_new_keys_are_written_at_each_rows_last_position_and_attended(heads, kv_heads, window):
    gen = torch.Generator().manual_seed(2)
    slots, S, Dh = 7, 40, 16
    cache_k, cache_v = (torch.randn(slots, kv_heads, S, Dh, generator=gen) for _ in range(2))
    rows, lengths = slice(1, 6), torch.tensor([1, 40, 17, 2, 33])
    q = torch.randn(5, heads, Dh, generator=gen)
    new_k, new_v = (torch.randn(5, kv_heads, Dh, generator=gen) for _ in range(2))
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    for b, n in enumerate(lengths.tolist()):  # what a scatter into the cache before attention would leave
        expected_k[rows.start + b, :, n - 1], expected_v[rows.start + b, :, n - 1] = new_k[b], new_v[b]
    out = decode_attention(q, cache_k[rows], cache_v[rows], lengths, window, new_k, new_v)
    assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)  # and nothing else touched
    torch.testing.assert_close(out.double(), naive(q, expected_k[rows], expected_v[rows], lengths, window),
                               rtol=1e-5, atol=1e-5)


def test_keys_past_a_rows_length_are_never_read():
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    q, lengths = torch.randn(2, 4, 8, generator=gen), torch.tensor([5, 9])
    clean = decode_attention(q, k, v, lengths)
    k[0, :, 5:], v[0, :, 5:], k[1, :, 9:], v[1, :, 9:] = float("nan"), float("nan"), float("inf"), float("inf")
    torch.testing.assert_close(decode_attention(q, k, v, lengths), clean, rtol=0, atol=0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda q, k, v, n: (q.double(), k, v, n), "fp32 CPU tensors"),
    (lambda q, k, v, n: (q[:, :3], k, v, n), "H a multiple of K"),
    (lambda q, k, v, n: (q, k, v[:, :, :5], n), "of one shape"),
    (lambda q, k, v, n: (q, k, v, n.int()), "lengths must be int64"),
    (lambda q, k, v, n: (q, k, v, torch.tensor([0, 3])), r"lengths must lie in \[1, 12\]"),
    (lambda q, k, v, n: (q, k, v, torch.tensor([13, 3])), r"lengths must lie in \[1, 12\]"),
    (lambda q, k, v, n: (q, k, v, n, None, torch.randn(2, 2, 8)), "give both or neither"),
    (lambda q, k, v, n: (q, k, v, n, None, torch.randn(2, 4, 8), torch.randn(2, 4, 8)), r"must be \(B, K, Dh\)"),
    (lambda q, k, v, n: (q, k, v, n, None, torch.randn(2, 2, 8).double(), torch.randn(2, 2, 8)), "fp32 CPU"),
])
def test_bad_inputs_are_refused_with_what_is_wrong(change, message):
    q, k, v, n = torch.randn(2, 4, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8), torch.tensor([5, 9])
    with pytest.raises(ValueError, match=message):
        decode_attention(*change(q, k, v, n))


def test_a_kernel_that_cannot_be_built_is_a_warning_and_masked_sdpa(monkeypatch):
    import torch.utils.cpp_extension

    from effdl.core.config import ModelConfig
    from effdl.core.transformer import Transformer
    from effdl.flover.runner import ModelRunner

    def no_compiler(**_):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    module.load_decode_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*command not found.*masked SDPA"):
            assert module.load_decode_kernel() is None
        model = Transformer(ModelConfig(vocab_size=31, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32,
                                        max_seq_len=32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per process, not once per runner
            assert not ModelRunner(model, 2, 16).live_decode
    finally:
        monkeypatch.undo()
        module.load_decode_kernel.cache_clear()
    assert ModelRunner(model, 2, 16).live_decode  # built (or found built) again once a compiler is back
