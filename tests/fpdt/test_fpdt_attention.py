"""chunked_attention against torch SDPA: outputs and every gradient, causal or not, GQA, odd lengths."""

import pytest
import torch
import torch.nn.functional as F

from effdl.errors import EffdlError
from effdl.fpdt import chunked_attention
from effdl.fpdt.attention import merge_partials, pair_forward

CASES = [  # (query heads, key/value heads, length, chunk)
    (4, 4, 64, 16),  # divisible, multi-head
    (4, 2, 37, 8),  # GQA, a short last chunk
    (6, 2, 50, 64),  # one chunk longer than the sequence
    (2, 1, 33, 1),  # chunk of one token
]


def _inputs(H, K, T, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, T, 16, generator=gen, dtype=dtype).requires_grad_() for h in (H, K, K)]


def _relative_error(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("backend", ["flash", "math"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("H", "K", "T", "chunk"), CASES)
def test_matches_sdpa_fp32(backend, causal, H, K, T, chunk):
    q, k, v = _inputs(H, K, T, torch.float32)
    out = chunked_attention(q, k, v, chunk, causal, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != K)
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    assert _relative_error(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert _relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32_reference(dtype):
    q, k, v = _inputs(4, 2, 100, dtype)
    out = chunked_attention(q, k, v, 32, True)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), torch.ones_like(ref))
    assert out.dtype == dtype
    assert _relative_error(out, ref) < 1e-2
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype and _relative_error(got, want) < 3e-2


def test_float64_gradcheck():
    q, k, v = (t.detach()[:1, :, :9].requires_grad_() for t in _inputs(2, 1, 9, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_attention(a, b, c, 4, True), (q, k, v))


def test_merge_of_two_halves_is_attention_over_both():
    q, k, v = (t.detach() for t in _inputs(2, 2, 12, torch.float32))
    out_a, lse_a = pair_forward(q, k[:, :, :5], v[:, :, :5], False, 0.25)
    out_b, lse_b = pair_forward(q, k[:, :, 5:], v[:, :, 5:], False, 0.25)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ((q @ k.transpose(-1, -2)) * 0.25).logsumexp(-1), rtol=1e-5, atol=1e-6)


def test_bad_input():
    q, k, v = (t.detach() for t in _inputs(3, 2, 8, torch.float32))
    with pytest.raises(EffdlError, match="not a multiple"):
        chunked_attention(q, k, v, 4)
    with pytest.raises(EffdlError, match="chunk_size must be positive"):
        chunked_attention(k, k, v, 0)
    with pytest.raises(EffdlError, match=r"must be \(B, H, T, D\)"):
        chunked_attention(k[0], k, v, 4)
    with pytest.raises(EffdlError, match="unknown attention backend"):
        chunked_attention(k, k, v, 4, backend="cudnn")
