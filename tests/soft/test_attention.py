"""SOFT's math against independent references: torch.linalg.pinv, finite differences, dense kernels."""

import math

import pytest
import torch

from effdl.errors import EffdlError
from effdl.soft import SoftAttention, gaussian_kernel, newton_pinv, nystrom_gaussian_attention
from effdl.soft.attention import _newton_schulz


def _psd(m: int, cond: float, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Random symmetric PSD matrices with eigenvalues spread log-uniformly over [1/cond, 1]."""
    q, _ = torch.linalg.qr(torch.randn(batch, m, m, dtype=torch.float64))
    eig = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64)
    return (q * eig) @ q.transpose(-1, -2)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cond", [2.0, 10.0, 100.0])
def test_newton_pinv_matches_linalg_pinv_on_psd(cond):
    A = _psd(32, cond).float()
    assert _rel_err(newton_pinv(A), torch.linalg.pinv(A.double()).float()) < 1e-3


def test_newton_pinv_on_gaussian_landmark_matrices():
    torch.manual_seed(1)
    landmarks = torch.randn(2, 4, 49, 32) / 32**0.25 * 1.5
    A2 = gaussian_kernel(landmarks, landmarks)  # (2, 4, 49, 49)
    assert _rel_err(newton_pinv(A2), torch.linalg.pinv(A2.double()).float()) < 1e-3


def test_adaptive_mode_converges_where_20_fixed_steps_cannot():
    A = _psd(32, 5_000.0, batch=2)  # 20 Newton steps reach condition ~1,000 at best
    assert _rel_err(_newton_schulz(A, iters=20, mode="adaptive"), torch.linalg.pinv(A)) < 1e-6


def _landmark_kernel(spread: float) -> torch.Tensor:
    torch.manual_seed(2)
    landmarks = torch.randn(2, 3, 49, 16, dtype=torch.float64) * spread
    return gaussian_kernel(landmarks, landmarks)  # (2, 3, 49, 49), positive entries, diagonal 1


def test_soft_mode_is_the_inverse_of_the_ridged_kernel_where_20_steps_converge():
    A2 = _landmark_kernel(spread=0.6)
    eye = torch.eye(49, dtype=torch.float64)
    assert _rel_err(newton_pinv(A2, 20, mode="soft"), torch.linalg.inv(A2 + 0.01 * eye)) < 1e-8
    # ... and not the plain inverse: weights trained with the reference operator expect the ridge.
    assert _rel_err(newton_pinv(A2, 20, mode="soft"), torch.linalg.pinv(A2)) > 1e-3


def test_soft_norm_mode_converges_to_the_pseudo_inverse_on_well_conditioned_kernels():
    A2 = _landmark_kernel(spread=0.6)
    assert _rel_err(newton_pinv(A2, 20, mode="soft_norm"), torch.linalg.pinv(A2)) < 1e-8


def test_reference_modes_stop_at_the_given_number_of_steps():
    A2 = _landmark_kernel(spread=0.1)  # landmarks close together: badly conditioned
    for mode in ("soft", "soft_norm"):
        assert _rel_err(newton_pinv(A2, 20, mode=mode), newton_pinv(A2, 40, mode=mode)) > 1e-3


def test_unknown_pinv_mode_is_named():
    with pytest.raises(EffdlError, match="unknown pinv mode 'exact'"):
        newton_pinv(torch.eye(3), mode="exact")


def test_newton_pinv_of_singular_psd_is_the_moore_penrose_inverse():
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    A = x @ x.transpose(-1, -2)  # rank 5 of 12
    assert _rel_err(newton_pinv(A, iters=30), torch.linalg.pinv(A, hermitian=True)) < 1e-6


def test_newton_pinv_gradient_against_finite_differences():
    A = _psd(6, 10.0, batch=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: newton_pinv(a), (A,), eps=1e-6, atol=1e-5)


def test_newton_pinv_rejects_non_square():
    with pytest.raises(EffdlError, match="square"):
        newton_pinv(torch.randn(3, 4))


def test_gaussian_kernel_against_explicit_formula_and_in_low_precision():
    a, b = torch.randn(2, 50, 16) * 3, torch.randn(2, 7, 16) * 3
    dense = torch.exp(-((a[:, :, None] - b[:, None]) ** 2).sum(-1) / 2)
    torch.testing.assert_close(gaussian_kernel(a, b), dense, atol=1e-6, rtol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):  # inputs rounded, distances still in fp32
        low = gaussian_kernel(a.to(dtype), b.to(dtype))
        assert low.dtype == torch.float32 and torch.isfinite(low).all()
        reference = gaussian_kernel(a.to(dtype).float(), b.to(dtype).float())
        torch.testing.assert_close(low, reference)


def test_gaussian_kernel_gradient_against_finite_differences():
    a = torch.randn(2, 30, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gaussian_kernel, (a, b))


def test_identity_bottleneck_gives_full_gaussian_attention():
    """With every token its own landmark (m = n), the Nyström product is exactly S @ V."""
    q = torch.randn(2, 3, 16, 8) * 0.5
    v = torch.randn(2, 3, 16, 8)
    dense = gaussian_kernel(q, q) @ v  # (B, H, N, D): the full N x N attention
    torch.testing.assert_close(nystrom_gaussian_attention(q, q, v), dense, atol=1e-3, rtol=1e-3)


def test_soft_attention_with_stride_one_equals_dense_kernel_attention():
    """SOFT attention with a 1x1 bottleneck conv set to identity reproduces S(Q', Q') V + dwconv(V)."""
    attn = SoftAttention(dim=16, num_heads=2, sr_ratio=1, conv_size=3, pinv="adaptive")
    with torch.no_grad():
        attn.landmark.weight.copy_(torch.eye(8)[:, :, None, None])
    x = torch.randn(2, 4 * 4, 16)
    with torch.no_grad():
        out = attn(x, (4, 4))
        q = attn.q(x).view(2, 16, 2, 8).transpose(1, 2) / 8**0.25
        landmarks = torch.nn.functional.gelu(attn.landmark_norm(q))
        v = attn.v(x).view(2, 16, 2, 8).transpose(1, 2)
        A1, A2 = gaussian_kernel(q, landmarks), gaussian_kernel(landmarks, landmarks)
        nystrom = A1 @ torch.linalg.pinv(A2.double()).float() @ A1.transpose(-1, -2) @ v
        v_grid = v.reshape(2, 2, 4, 4, 8).permute(0, 4, 1, 2, 3).reshape(16, 2, 4, 4)
        local = attn.v_conv(v_grid).view(2, 8, 2, 16).permute(0, 2, 3, 1)
        ref = attn.proj((nystrom + local).transpose(1, 2).reshape(2, 16, 16))
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_non_finite_input_is_named():
    q = torch.randn(1, 1, 8, 4)
    q[0, 0, 3, 1] = float("nan")
    with pytest.raises(EffdlError, match="non-finite"):
        nystrom_gaussian_attention(q, q[:, :, :2], torch.randn(1, 1, 8, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_finite_output_close_to_fp32(dtype):
    """Inputs rounded to bf16/fp16 (8/11-bit mantissa) change the output by under 2% (relative norm)."""
    torch.manual_seed(3)
    q = torch.randn(1, 2, 256, 32) / 32**0.25 * 4
    landmarks = q[:, :, ::16] + 0.1
    v = torch.randn(1, 2, 256, 32)
    reference = nystrom_gaussian_attention(q, landmarks, v)
    low = nystrom_gaussian_attention(q.to(dtype), landmarks.to(dtype), v.to(dtype))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert _rel_err(low, reference) < 0.02


def test_landmark_grid_is_capped_so_larger_inputs_keep_m_fixed(monkeypatch):
    import effdl.soft.attention as attention

    seen = []
    real = attention.nystrom_gaussian_attention
    monkeypatch.setattr(attention, "nystrom_gaussian_attention", lambda q, lm, *args: seen.append(lm.shape) or
                        real(q, lm, *args))
    capped, uncapped = SoftAttention(32, 2, 8, 3), SoftAttention(32, 2, 8, 3, landmark_grid=None)
    uncapped.load_state_dict(capped.state_dict())
    x = torch.randn(2, 56 * 56, 32)
    torch.testing.assert_close(capped(x, (56, 56)), uncapped(x, (56, 56)))  # 224 px: the cap changes nothing
    big = torch.randn(1, 112 * 112, 32)
    capped(big, (112, 112))
    uncapped(big, (112, 112))
    assert [s[2] for s in seen] == [49, 49, 49, 196]  # 448 px: M stays 7 x 7 instead of 14 x 14
