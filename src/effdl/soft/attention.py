"""SOFT's softmax-free attention: a Gaussian kernel, Nyström low rank, Newton–Raphson pseudo-inverse.

Dimension legend: B batch, H heads, N tokens (h*w grid), M bottleneck tokens,
D head dim.

Softmax attention needs the full N x N score matrix. SOFT replaces the
normalised dot product by an unnormalised Gaussian kernel
S_ij = exp(-||q_i - q_j||^2 / 2) with tied queries and keys. S is symmetric
PSD, so it has the Nyström approximation S ~= A1 pinv(A2) A1^T built from M
bottleneck tokens (A1 = S(Q, Q~) is N x M, A2 = S(Q~, Q~) is M x M), and
S V is computed right to left in O(N M D): nothing N x N is ever formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.errors import EffdlError


def gaussian_kernel(a: Tensor, b: Tensor) -> Tensor:
    """exp(-||a_i - b_j||^2 / 2) for a (..., N, D) and b (..., M, D) -> (..., N, M) in fp32 (fp64 for fp64 input).

    Distances are formed in fp32 whatever the input dtype (in bf16 the
    expansion |a|^2 + |b|^2 - 2ab loses up to ~45%, in fp16 it overflows).
    Both sides are first shifted by b's mean, which leaves every distance
    unchanged but removes the common offset that makes the expansion cancel;
    then a single matmul of augmented vectors [a, |a|^2, 1] . [b, -1/2, -|b|^2/2]
    yields -||a - b||^2 / 2 directly, within ~1e-6 of explicit differences.
    Cost: O(N M D) time, O(N M) memory.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)  # fp32, or fp64 when given fp64
    a, b = a.to(dtype), b.to(dtype)
    center = b.mean(dim=-2, keepdim=True)  # (..., 1, D)
    a, b = a - center, b - center
    a_aug = torch.cat([a, a.square().sum(-1, keepdim=True), torch.ones_like(a[..., :1])], dim=-1)  # (..., N, D+2)
    b_aug = torch.cat([b, torch.full_like(b[..., :1], -0.5), -0.5 * b.square().sum(-1, keepdim=True)],
                      dim=-1)  # (..., M, D+2)
    return (a_aug @ b_aug.transpose(-1, -2)).clamp_max_(0).exp_()  # (..., N, M)


PINV_MODES = ("adaptive", "soft", "soft_norm")


def _initial_inverse(A: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """The matrix P to invert and the Newton–Schulz start V0 for each ``mode`` (see ``newton_pinv``).

    Convergence needs ||I - P V0|| < 1, i.e. V0 = alpha P with alpha < 2 / lambda_max(P)^2; the row sum
    bounds lambda_max of a non-negative matrix, which is where every mode's alpha comes from.
    """
    if mode == "adaptive":
        alpha = 1.8 / A.abs().sum(-1).amax(-1) ** 2  # (...,) per matrix
        return A, alpha[..., None, None] * A
    if mode == "soft":
        alpha = 0.9 * 2 / A.sum(-1).amax(-1) ** 2  # (...,) per matrix, from A before the ridge
        P = A + 0.01 * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        return P, alpha[..., None, None] * P
    if mode == "soft_norm":
        # SOFT++: one alpha for the whole call (all images and heads), halved up to 10 times until
        # the worst column sum of |I - A V0| over the call is at most 1.01.
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        A_squared = A @ A  # A V0 = alpha A^2: one product serves every halving
        alpha = 2 / A.sum(-1).max() ** 2  # scalar
        for _ in range(10):
            if float((eye - alpha * A_squared).abs().sum(-2).max()) <= 1.01:
                break
            alpha = alpha / 2
        return A, alpha * A
    raise EffdlError(f"unknown pinv mode {mode!r}; choose one of {', '.join(PINV_MODES)}")


def _newton_schulz(A: Tensor, iters: int, mode: str) -> Tensor:
    """Pseudo-inverse of symmetric PSD matrices A (..., M, M) by Newton–Schulz iteration V <- 2V - V P V.

    Each step squares the error, so ``iters`` steps suffice up to condition number ~ 2^(iters/2)
    (20 steps: ~1,000). ``mode="adaptive"`` goes on (up to 5x ``iters``) until the relative update
    falls below 1e3 machine epsilons or stops shrinking, which handles worse-conditioned and singular
    matrices; the reference modes run exactly ``iters`` steps. Cost: 2 M^3 per step.
    """
    P, V = _initial_inverse(A, mode)
    adaptive = mode == "adaptive"
    tol = 1e3 * torch.finfo(A.dtype).eps
    last_change = float("inf")
    for step in range(5 * iters if adaptive else iters):
        V_next = 2 * V - V @ P @ V
        if adaptive and step >= iters - 1:
            change = float(((V_next - V).norm(dim=(-2, -1)) / V_next.norm(dim=(-2, -1)).clamp_min(1e-30)).max())
            if change < tol:
                return V_next
            if change > last_change:
                # Converged as far as rounding allows: on (near-)singular A, noise in the null space
                # doubles every step, so stop before it grows.
                return V
            last_change = change
        V = V_next
    return V


class _NewtonPinv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, iters: int, mode: str) -> Tensor:
        V = _newton_schulz(A, iters, mode)
        ctx.save_for_backward(V)
        return V

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (V,) = ctx.saved_tensors
        Vt = V.transpose(-1, -2)
        return -(Vt @ grad @ Vt), None, None  # d(A^-1) = -A^-T dA A^-T


def newton_pinv(A: Tensor, iters: int = 20, mode: str = "adaptive") -> Tensor:
    """Pseudo-inverse of symmetric PSD matrices (..., M, M), differentiable, computed in fp32 (fp64 for fp64).

    ``mode`` picks the operator:
    - ``"adaptive"`` (effdl's): V0 = 1.8 A / ||A||_inf^2 per matrix, iterated until converged.
    - ``"soft"`` (the SOFT reference code's): the inverse of A + 0.01 I after exactly ``iters`` steps
      from V0 = alpha (A + 0.01 I), alpha = 1.8 / max_i(sum_j A_ij)^2 per matrix.
    - ``"soft_norm"`` (the SOFT++ reference code's): exactly ``iters`` steps from V0 = alpha A with one
      alpha = 2 / max(row sum)^2 over the whole call, halved until ||I - A V0||_1 <= 1.01. The result
      depends on the other matrices in the call, as the reference's does.

    Weights trained with a reference operator expect that operator, not the converged inverse. The
    forward runs without an autograd graph; the backward uses the closed form of the inverse's
    derivative, -V^T G V^T. Cost: O(iters M^3).
    """
    if A.shape[-1] != A.shape[-2]:
        raise EffdlError(f"newton_pinv needs square matrices, got shape {tuple(A.shape)}")
    if mode not in PINV_MODES:
        raise EffdlError(f"unknown pinv mode {mode!r}; choose one of {', '.join(PINV_MODES)}")
    dtype = A.dtype
    work = A if dtype == torch.float64 else A.float()
    return _NewtonPinv.apply(work, iters, mode).to(dtype)


def nystrom_gaussian_attention(q: Tensor, landmarks: Tensor, v: Tensor, iters: int = 20,
                               pinv_mode: str = "adaptive", normalized: bool = False) -> Tensor:
    """SOFT attention: S(Q, Q) V approximated as A1 (pinv(A2) (A1^T V)), right to left.

    q (B, H, N, D) tied queries/keys (already scaled), landmarks (B, H, M, D),
    v (B, H, N, D) -> (B, H, N, D) in fp32. With ``normalized`` (SOFT++) the
    inverse is scaled symmetrically by the landmark kernel's degrees,
    D^-1/2 pinv(A2) D^-1/2 with D = diag(A2 1), as the reference code does.
    Cost: O(N M D + M^3), memory O(N M).
    """
    A1 = gaussian_kernel(q, landmarks)  # (B, H, N, M)
    A2 = gaussian_kernel(landmarks, landmarks)  # (B, H, M, M)
    context = A1.transpose(-1, -2) @ v.to(A1.dtype)  # (B, H, M, D)
    # A NaN anywhere in q, landmarks or v reaches these two small tensors; checking them is O(M^2 + M D).
    if not (torch.isfinite(context).all() and torch.isfinite(A2).all()):
        raise EffdlError("non-finite values in the Gaussian kernel: the attention input holds NaN or inf")
    inverse = newton_pinv(A2, iters, pinv_mode)  # (B, H, M, M)
    if normalized:
        degree = A2.sum(-1, keepdim=True).rsqrt()  # (B, H, M, 1)
        inverse = degree * inverse * degree.transpose(-1, -2)
    return A1 @ (inverse @ context)  # (B, H, N, D)


class SoftAttention(nn.Module):
    """Softmax-free attention over an h x w token grid.

    Queries double as keys, scaled by D^-1/4 so the kernel sees D^-1/2. The M
    bottleneck tokens come from a strided conv (kernel = stride = ``sr_ratio``,
    shared across heads) + LayerNorm + GELU on the query grid. A depthwise
    conv over the value grid (kernel ``conv_size``) is added to the output, as
    in the paper's reference code (one filter per head, shared by its D channels).

    The bottleneck grid is capped at ``landmark_grid`` per side (7, the grid
    every stage has at 224 px): a larger input pools the conv's output down to
    it, so M stays fixed and the cost stays linear in the tokens instead of
    growing as N^2 / sr_ratio^4. At 224 px and below the cap changes nothing;
    ``landmark_grid=None`` keeps the reference's M = (h / sr_ratio) x (w / sr_ratio) at every size.

    ``normalized`` selects SOFT++'s degree-normalised kernel. ``pinv="reference"``
    uses the pseudo-inverse operator the reference code trained with (SOFT's or
    SOFT++'s, see ``newton_pinv``); ``pinv="adaptive"`` iterates to convergence.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, newton_iters: int = 20,
                 landmark_grid: int | None = 7, normalized: bool = False, pinv: str = "reference"):
        super().__init__()
        if dim % num_heads:
            raise EffdlError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if pinv not in ("reference", "adaptive"):
            raise EffdlError(f"pinv must be 'reference' or 'adaptive', got {pinv!r}")
        self.num_heads, self.head_dim, self.sr_ratio = num_heads, dim // num_heads, sr_ratio
        self.newton_iters, self.landmark_grid, self.normalized = newton_iters, landmark_grid, normalized
        self.pinv_mode = ("soft_norm" if normalized else "soft") if pinv == "reference" else "adaptive"
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.landmark = nn.Conv2d(self.head_dim, self.head_dim, sr_ratio, stride=sr_ratio, bias=False)
        self.landmark_norm = nn.LayerNorm(self.head_dim)
        self.v_conv = nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2, groups=num_heads,
                                bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        h, w = grid
        H, D = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, H, D).transpose(1, 2) / math.sqrt(math.sqrt(D))  # (B, H, N, D)
        v_tokens = self.v(x)  # (B, N, H*D)
        v = v_tokens.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)

        q_grid = q.reshape(B * H, h, w, D).permute(0, 3, 1, 2)  # (B*H, D, h, w)
        landmarks = self.landmark(q_grid)  # (B*H, D, h', w')
        if self.landmark_grid is not None and max(landmarks.shape[-2:]) > self.landmark_grid:
            capped = tuple(min(side, self.landmark_grid) for side in landmarks.shape[-2:])
            landmarks = F.adaptive_avg_pool2d(landmarks, capped)  # (B*H, D, <=7, <=7)
        landmarks = landmarks.flatten(2).transpose(1, 2)  # (B*H, M, D)
        landmarks = F.gelu(self.landmark_norm(landmarks)).view(B, H, -1, D)  # (B, H, M, D)
        out = nystrom_gaussian_attention(q, landmarks, v, self.newton_iters, self.pinv_mode,
                                         self.normalized).to(x.dtype)  # (B, H, N, D)

        # One filter per head, shared by the head's D channels, is a depthwise conv over all H*D channels
        # with each filter repeated D times. On the tokens' channels-last view it needs no copy, and it is
        # ~15x faster than convolving a (B*D, H, h, w) batch of H-channel images.
        v_map = v_tokens.view(B, h, w, C).permute(0, 3, 1, 2)  # (B, H*D, h, w), channels-last
        filters = self.v_conv.weight.repeat_interleave(D, dim=0)  # (H*D, 1, k, k)
        local = F.conv2d(v_map, filters, padding=self.v_conv.padding, groups=C)  # (B, H*D, h, w)
        out = out.transpose(1, 2).reshape(B, N, C) + local.permute(0, 2, 3, 1).reshape(B, N, C)  # (B, N, H*D)
        return self.proj(out)
