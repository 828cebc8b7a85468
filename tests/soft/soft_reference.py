"""A plain float64 oracle for the SOFT / SOFT++ image classifiers of the fudan-zvg/SOFT reference code.

Written from ``models/softmax_free_vision_transformer.py``, ``models/softmax_free_transformer.py`` and
``SOFT/kernel/inverse.py`` of https://github.com/fudan-zvg/SOFT, as functions over a state dict that uses the
reference code's own key names, so that a reference checkpoint and ``reference_state_dict`` look alike.
Nothing here imports effdl. The equations (Lu et al., "SOFT: Softmax-free Transformer with Linear
Complexity", NeurIPS 2021; "Softmax-free Linear Transformers", IJCV 2024 for SOFT++):

    Q = W_q x / d^(1/4),  K = Q,  V = W_v x                       (per head, head_dim d)
    L = GELU(LN(Conv_{r x r, stride r}(Q on the H x W grid)))       (landmarks, M = HW / r^2)
    A1 = exp(-||Q_i - L_j||^2 / 2)  (N x M),  A2 = exp(-||L_i - L_j||^2 / 2)  (M x M)
    out = (A1 A2^+) (A1^T V) + DWConv(V)
"""

import math

import torch
import torch.nn.functional as F

_DIMS = {
    "tiny": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 2, 3, 2)),
    "small": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 3, 20, 4)),  # the code's; the paper's Small is smaller
    "medium": ((64, 128, 288, 512), (2, 4, 9, 16), (1, 3, 29, 5)),
    "large": ((64, 128, 320, 512), (2, 4, 10, 16), (1, 3, 40, 5)),
    "huge": ((64, 128, 352, 512), (2, 4, 11, 16), (1, 5, 49, 5)),
}
ARCHS: dict[str, dict] = {
    f"soft_{prefix}{size}": {"embed_dims": dims, "num_heads": heads, "depths": depths, "kind": kind}
    for prefix, kind in (("", "soft"), ("norm_", "norm"))
    for size, (dims, heads, depths) in _DIMS.items()
}
SR_RATIOS = (8, 4, 2)  # landmark conv kernel = stride, stages 1-3 (stage 4 is a plain ViT)
CONV_SIZES = (9, 5, 3)  # depthwise conv over V, stages 1-3
POS_TOKENS = (3136, 784, 196, 50)  # 56^2, 28^2, 14^2, 7^2 + class token


# ---------------------------------------------------------------------------------------------------------------
# Random weights under the reference code's key names
# ---------------------------------------------------------------------------------------------------------------


def reference_state_dict(
    name: str, seed: int = 0, num_classes: int = 1000, in_chans: int = 3, near_singular: bool = False
) -> dict:
    """Float32 random weights with exactly the keys and shapes of the reference model's ``state_dict()``.

    Scales are chosen so that every term matters: biases and norm affines are non-zero, BatchNorm has
    non-trivial running statistics, and W_q / the landmark LayerNorm are scaled so that the Gaussian kernels
    A1 and A2 are O(0.1-1) rather than ~0 (with the reference's own init the Nystrom term would vanish next
    to the depthwise conv and the residual, and a wrong pseudo-inverse could not be seen).

    By default the landmarks stay spread out through all 60+ blocks (A2 well conditioned, float32 and float64
    forwards agree to ~1e-6). ``near_singular=True`` crowds the landmarks together (A2 near singular, the 20
    Newton steps only partly converge), which makes the exact alpha / 0.01 I / iteration count of the reference
    visible in the logits; float32 stays within ~1e-5 of float64 there only for the tiny models.
    """
    landmark_ln_scale, wv_std = (0.5, 0.02) if near_singular else (0.6, 0.004)
    arch = ARCHS[name]
    dims, heads, depths = arch["embed_dims"], arch["num_heads"], arch["depths"]
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    def trunc(*shape, std=0.02):  # like timm's trunc_normal_: a normal folded into (-2 std, 2 std); 30x faster
        return std * torch.fmod(torch.randn(*shape, generator=g), 2.0)

    sd = {}

    def linear(prefix, n_out, n_in, std=0.02):
        sd[prefix + ".weight"] = trunc(n_out, n_in, std=std)
        sd[prefix + ".bias"] = normal(n_out, std=0.02)

    def layer_norm(prefix, n, scale=1.0):
        sd[prefix + ".weight"] = normal(n, mean=scale, std=0.1 * scale)
        sd[prefix + ".bias"] = normal(n, std=0.05)

    def conv(prefix, c_out, c_in, k, bias=True, groups=1):
        sd[prefix + ".weight"] = normal(c_out, c_in // groups, k, k, std=math.sqrt(2.0 / (c_in // groups * k * k)))
        if bias:
            sd[prefix + ".bias"] = normal(c_out, std=0.02)

    def batch_norm(prefix, n):
        sd[prefix + ".weight"] = normal(n, mean=1.0, std=0.1)
        sd[prefix + ".bias"] = normal(n, std=0.1)
        sd[prefix + ".running_mean"] = normal(n, std=0.1)
        sd[prefix + ".running_var"] = 0.5 + torch.rand(n, generator=g)
        sd[prefix + ".num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)

    # nn.Module.state_dict() lists a module's own parameters first, then its children in creation order.
    for s, n_pos in enumerate(POS_TOKENS, start=1):
        sd[f"pos_embed{s}"] = trunc(1, n_pos, dims[s - 1], std=0.05)
    sd["cls_token"] = trunc(1, 1, dims[3], std=0.05)

    conv("patch_embed1.proj.0", 32, in_chans, 3)  # conv3x3/2, BN, ReLU, conv3x3, BN, ReLU, conv3x3/2, BN, ReLU
    batch_norm("patch_embed1.proj.1", 32)
    conv("patch_embed1.proj.3", 32, 32, 3)
    batch_norm("patch_embed1.proj.4", 32)
    conv("patch_embed1.proj.6", dims[0], 32, 3)
    batch_norm("patch_embed1.proj.7", dims[0])
    for s in (2, 3, 4):  # conv3x3/2, BN, ReLU
        conv(f"patch_embed{s}.proj.0", dims[s - 1], dims[s - 2], 3)
        batch_norm(f"patch_embed{s}.proj.1", dims[s - 1])

    for s in (1, 2, 3):
        dim, h = dims[s - 1], heads[s - 1]
        d, r, k = dim // h, SR_RATIOS[s - 1], CONV_SIZES[s - 1]
        for i in range(depths[s - 1]):
            p = f"block{s}.{i}.att."
            linear(p + "mha.W_q", dim, dim, std=0.7 / math.sqrt(dim))
            linear(p + "mha.W_v", dim, dim, std=wv_std)
            conv(p + "mha.attn.Qlandmark_op", d, d, r, bias=False)
            layer_norm(p + "mha.attn.Qnorm_act.0", d, scale=landmark_ln_scale)
            conv(p + "mha.attn.conv", h, h, k, bias=False, groups=h)
            linear(p + "mha.ff", dim, dim)
            layer_norm(p + "norm1", dim)
            linear(p + "ff1", 4 * dim, dim)
            linear(p + "ff2", dim, 4 * dim)
            layer_norm(p + "norm2", dim)

    dim = dims[3]
    for i in range(depths[3]):
        p = f"block4.{i}."
        layer_norm(p + "norm1", dim)
        linear(p + "attn.q", dim, dim, std=0.1)  # larger q so that the softmax is not uniform
        linear(p + "attn.kv", 2 * dim, dim)
        linear(p + "attn.proj", dim, dim)
        layer_norm(p + "norm2", dim)
        linear(p + "mlp.fc1", 4 * dim, dim)
        linear(p + "mlp.fc2", dim, 4 * dim)
    layer_norm("norm", dim)
    linear("head", num_classes, dim)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Layers, written out
# ---------------------------------------------------------------------------------------------------------------


def _linear(x, sd, prefix):
    """y = x W^T + b."""
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _layer_norm(x, sd, prefix, eps):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis, biased variance."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def _batch_norm_relu(x, sd, prefix):
    """Eval-mode BatchNorm2d (eps 1e-5) on (B, C, H, W), then ReLU."""
    mean, var = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)
    return torch.relu(y * sd[prefix + ".weight"][:, None, None] + sd[prefix + ".bias"][:, None, None])


def _gelu(x):
    """Exact GELU: x Phi(x)."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    """The reference's Approx_GeLU, used in the stage 1-3 feed-forward."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _bilinear_matrix(n_in, n_out, dtype):
    """(n_out, n_in) weights of 1-D linear interpolation, align_corners=False: src = (dst + 0.5) n_in/n_out - 0.5."""
    src = ((torch.arange(n_out, dtype=dtype) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=dtype)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m


def _resize_pos_embed(pos, H, W):
    """(1, n*n, C) on a square n x n grid -> (1, H*W, C), bilinearly resized (the reference resizes at run time)."""
    n = int(pos.shape[1] ** 0.5)
    grid = pos[0].reshape(n, n, -1)  # (n, n, C), row-major tokens
    rows, cols = _bilinear_matrix(n, H, pos.dtype), _bilinear_matrix(n, W, pos.dtype)
    return torch.einsum("hi,wj,ijc->hwc", rows, cols, grid).reshape(1, H * W, -1)


def _sq_dist(a, b):
    """||a_i - b_j||^2: (..., N, d), (..., M, d) -> (..., N, M)."""
    return ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# The Moore-Penrose inverse of A2, as the reference computes it
# ---------------------------------------------------------------------------------------------------------------


def soft_pinv(a2, iters=20):
    """SOFT (``SOFT/kernel/inverse.py: newton_inv``): Newton-Schulz on P = A2 + 0.01 I.

    alpha = 0.9 * 2 / max_i(sum_j A2_ij)^2 per matrix (from A2, before the 0.01 I); V_0 = alpha P;
    V <- 2V - V P V.  a2: (..., M, M).
    """
    eye = torch.eye(a2.shape[-1], dtype=a2.dtype)
    alpha = 0.9 * 2 / a2.sum(-1).amax(-1) ** 2  # (...)
    p = a2 + 0.01 * eye
    v = alpha[..., None, None] * p
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


def norm_pinv(a2, iters=20):
    """SOFT++ (``SoftmaxFreeNormAttentionKernel``): Newton-Schulz on A2 itself, then symmetric scaling.

    alpha = 2 / max(row sums of A2 over the whole batch tensor)^2 -- one scalar per call; V_0 = alpha A2,
    halved (at most 10 times) while max over the tensor of the column sums of |I - A2 V_0| exceeds 1.01;
    ``iters`` steps V <- 2V - V A2 V; returns D^-1/2 V D^-1/2 with D = diag(row sums of A2).
    """
    eye = torch.eye(a2.shape[-1], dtype=a2.dtype)
    alpha = 2 / a2.sum(-1).max() ** 2
    v = alpha * a2
    halvings = 0
    while (eye - a2 @ v).abs().sum(-2).max() > 1.01 and halvings < 10:
        alpha = alpha * 0.5
        v = alpha * a2
        halvings += 1
    for _ in range(iters):
        v = 2 * v - v @ a2 @ v
    d = a2.sum(-1) ** -0.5  # (..., M)
    return d[..., :, None] * v * d[..., None, :]


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


def _softmax_free_attention(x, sd, p, H, W, ratio, kind, iters):
    """Q = W_q x / d^(1/4), K = Q, V = W_v x; out = ff((A1 A2^+)(A1^T V) + DWConv(V)).  x: (B, N, C)."""
    B, N, C = x.shape
    heads, _, k, _ = sd[p + "attn.conv.weight"].shape
    d = C // heads
    q = _linear(x, sd, p + "W_q").reshape(B, N, heads, d).transpose(1, 2)  # (B, h, N, d)
    v = _linear(x, sd, p + "W_v").reshape(B, N, heads, d).transpose(1, 2)  # (B, h, N, d)
    q = q / d**0.25

    # Landmarks: an r x r / stride r conv over each head's query grid (head_dim in and out), then LN + GELU.
    grid = q.reshape(B * heads, H, W, d).permute(0, 3, 1, 2)  # (B*h, d, H, W)
    lm = F.conv2d(grid, sd[p + "attn.Qlandmark_op.weight"], stride=ratio)  # (B*h, d, H/r, W/r)
    lm = lm.flatten(2).transpose(1, 2).reshape(B, heads, -1, d)  # (B, h, M, d)
    lm = _gelu(_layer_norm(lm, sd, p + "attn.Qnorm_act.0", 1e-5))

    a1 = torch.exp(-_sq_dist(q, lm) / 2)  # (B, h, N, M)
    a2 = torch.exp(-_sq_dist(lm, lm) / 2)  # (B, h, M, M)
    inv = soft_pinv(a2, iters) if kind == "soft" else norm_pinv(a2, iters)
    out = (a1 @ inv) @ (a1.transpose(-1, -2) @ v)  # (B, h, N, d)

    # Depthwise k x k conv over V: one filter per head, shared by that head's d channels.
    v_grid = v.transpose(-1, -2).reshape(B, heads * d, H, W)  # (B, h*d, H, W), channel = head*d + c
    filters = sd[p + "attn.conv.weight"].repeat_interleave(d, dim=0)  # (h*d, 1, k, k)
    conv = F.conv2d(v_grid, filters, padding=k // 2, groups=heads * d)  # (B, h*d, H, W)
    out = out + conv.reshape(B, heads, d, N).transpose(-1, -2)  # (B, h, N, d)

    out = out.transpose(1, 2).reshape(B, N, C)
    return _linear(out, sd, p + "ff")


def _softmax_free_block(x, sd, p, H, W, ratio, kind, iters):
    """Post-norm: x = LN(x + attn(x)); x = LN(x + ff2(tanh-GELU(ff1(x)))), LayerNorm eps 1e-5."""
    x = _layer_norm(x + _softmax_free_attention(x, sd, p + "mha.", H, W, ratio, kind, iters), sd, p + "norm1", 1e-5)
    ff = _linear(_gelu_tanh(_linear(x, sd, p + "ff1")), sd, p + "ff2")
    return _layer_norm(x + ff, sd, p + "norm2", 1e-5)


def _vit_block(x, sd, p, heads):
    """Pre-norm ViT block (LayerNorm eps 1e-6): softmax attention with q and kv linears, scale d^-1/2; MLP."""
    B, N, C = x.shape
    d = C // heads
    y = _layer_norm(x, sd, p + "norm1", 1e-6)
    q = _linear(y, sd, p + "attn.q").reshape(B, N, heads, d).transpose(1, 2)  # (B, h, N, d)
    kv = _linear(y, sd, p + "attn.kv").reshape(B, N, 2, heads, d)  # k = first C outputs, v = last C
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, h, N, d)
    logits = q @ k.transpose(-1, -2) * d**-0.5  # (B, h, N, N)
    attn = torch.exp(logits - logits.amax(-1, keepdim=True))
    attn = attn / attn.sum(-1, keepdim=True)
    x = x + _linear((attn @ v).transpose(1, 2).reshape(B, N, C), sd, p + "attn.proj")
    y = _layer_norm(x, sd, p + "norm2", 1e-6)
    return x + _linear(_gelu(_linear(y, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")


def _patch_embed(x, sd, p):
    """conv3x3/2-BN-ReLU (stages 2-4); stage 1: conv3x3/2, conv3x3/1 (32 channels), conv3x3/2, each BN-ReLU."""
    for i, stride in ((0, 2), (3, 1), (6, 2)) if p + "proj.3.weight" in sd else ((0, 2),):
        x = F.conv2d(x, sd[f"{p}proj.{i}.weight"], sd[f"{p}proj.{i}.bias"], stride=stride, padding=1)
        x = _batch_norm_relu(x, sd, f"{p}proj.{i + 1}")
    return x  # (B, C, H, W)


def reference_logits(state_dict, images, kind, newton_iters=20, stage4_heads=16):
    """Float64 logits (B, num_classes) of the reference SOFT (kind "soft") / SOFT++ (kind "norm") model, eval mode.

    ``stage4_heads`` is the only hyper-parameter the weights do not show; all ten reference models use 16.
    """
    assert kind in ("soft", "norm"), kind
    sd = {k: v.double() for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    x = images.double()
    B = x.shape[0]
    for s in (1, 2, 3):
        x = _patch_embed(x, sd, f"patch_embed{s}.")
        _, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2) + _resize_pos_embed(sd[f"pos_embed{s}"], H, W)  # (B, H*W, C)
        i = 0
        while f"block{s}.{i}.att.norm1.weight" in sd:
            x = _softmax_free_block(x, sd, f"block{s}.{i}.att.", H, W, SR_RATIOS[s - 1], kind, newton_iters)
            i += 1
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)

    x = _patch_embed(x, sd, "patch_embed4.")
    _, C, H, W = x.shape
    pos = sd["pos_embed4"]  # (1, 1 + 7*7, C); row 0 belongs to the class token and is not resized
    pos = torch.cat([pos[:, :1], _resize_pos_embed(pos[:, 1:], H, W)], dim=1)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + pos  # (B, 1+HW, C)
    i = 0
    while f"block4.{i}.norm1.weight" in sd:
        x = _vit_block(x, sd, f"block4.{i}.", stage4_heads)
        i += 1
    x = _layer_norm(x, sd, "norm", 1e-6)
    return _linear(x[:, 0], sd, "head")
