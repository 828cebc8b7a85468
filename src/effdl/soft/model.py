"""SOFT: Softmax-free Transformer with Linear Complexity (Lu et al., NeurIPS 2021), in timm's model zoo.

A four-stage pyramid: a conv stem (three 3x3 convs, stride 4 in all) and a
strided 3x3 conv between stages; stages 1-3 use post-norm blocks with SOFT
attention (bottleneck strides 8, 4, 2; value convs 9, 5, 3), stage 4 uses
pre-norm softmax attention with a class token. ``import effdl.soft`` registers
``soft_tiny`` ... ``soft_huge`` so ``timm.create_model("soft_tiny", num_classes=10)``
works. Weights of the reference implementation (fudan-zvg/SOFT) load through
``checkpoint_filter_fn`` from a local file: ``timm.create_model("soft_tiny",
pretrained=True, pretrained_cfg_overlay={"file": "soft_tiny.pth"})``.

Any input size divisible by 32 works: position embeddings (sized for 224 px)
are resampled to the token grid, and SOFT attention grows linearly with it.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from effdl.errors import EffdlError
from effdl.soft.attention import SoftAttention

STRIDE = 32  # total downsampling: stem 4, then 2 per stage


def conv_bn_relu(in_chans: int, out_chans: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_chans, out_chans, 3, stride, padding=1), nn.BatchNorm2d(out_chans), nn.ReLU()]


class SoftBlock(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x)), MLP 4x with tanh-GELU."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, drop_path: float,
                 newton_iters: int):
        super().__init__()
        self.attn = SoftAttention(dim, num_heads, sr_ratio, conv_size, newton_iters)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, act_layer=partial(nn.GELU, approximate="tanh"))
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.norm1(x + self.drop_path(self.attn(x, grid)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class SoftmaxAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv(x).view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SoftmaxBlock(nn.Module):
    """Pre-norm ViT block with softmax attention (stage 4, where the grid is small)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SoftmaxAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SoftStage(nn.Module):
    def __init__(self, downsample: nn.Sequential, pos_tokens: int, dim: int, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_tokens, dim))
        self.blocks = nn.ModuleList(blocks)


class SoftVisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: tuple[int, ...] = (64, 128, 320, 512), num_heads: tuple[int, ...] = (2, 4, 10, 16),
                 depths: tuple[int, ...] = (1, 2, 3, 2), sr_ratios: tuple[int, ...] = (8, 4, 2),
                 conv_sizes: tuple[int, ...] = (9, 5, 3), mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, newton_iters: int = 20, global_pool: str = "token"):
        super().__init__()
        if img_size % STRIDE:
            raise EffdlError(f"img_size must be divisible by {STRIDE}, got {img_size}")
        if not len(embed_dims) == len(num_heads) == len(depths) == 4:
            raise EffdlError("SOFT has four stages: embed_dims, num_heads and depths need four entries each")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        stages, in_dim, grid = [], in_chans, img_size // 4
        for i, (dim, heads) in enumerate(zip(embed_dims, num_heads, strict=True)):
            rates = drop_paths[sum(depths[:i]):sum(depths[:i + 1])]
            if i == 0:
                downsample = nn.Sequential(*conv_bn_relu(in_chans, 32, 2), *conv_bn_relu(32, 32, 1),
                                           *conv_bn_relu(32, dim, 2))
            else:
                downsample = nn.Sequential(*conv_bn_relu(in_dim, dim, 2))
                grid //= 2
            if i < 3:
                blocks = [SoftBlock(dim, heads, sr_ratios[i], conv_sizes[i], r, newton_iters) for r in rates]
                pos_tokens = grid * grid
            else:
                blocks = [SoftmaxBlock(dim, heads, mlp_ratio, r) for r in rates]
                pos_tokens = grid * grid + 1  # + class token
            stages.append(SoftStage(downsample, pos_tokens, dim, blocks))
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} | {f"stages.{i}.pos_embed" for i in range(len(self.stages))}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise EffdlError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise EffdlError(f"model expects {self.in_chans} input channels, got {x.shape[1]}")
        if x.shape[2] % STRIDE or x.shape[3] % STRIDE:
            raise EffdlError(f"image size must be divisible by {STRIDE}, got {x.shape[2]}x{x.shape[3]}")

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised stage-4 tokens (B, 1 + H/32 * W/32, C4), class token first."""
        self._check_input(x)
        B = x.shape[0]
        grid = (x.shape[2], x.shape[3])
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = x.transpose(1, 2).reshape(B, -1, *grid)  # (B, C, h, w)
            x = stage.downsample(x)  # (B, C, h, w)
            grid = (x.shape[2], x.shape[3])
            x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
            prefix = 0
            if i == len(self.stages) - 1:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + h*w, C)
                prefix = 1
            x = x + self._pos_embed(stage.pos_embed, grid, prefix)
            for block in stage.blocks:
                x = block(x, grid)
        return self.norm(x)

    @staticmethod
    def _pos_embed(pos_embed: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
        """The stage's position embedding, resampled (bicubic) when the grid differs from 224 px's."""
        old = math.isqrt(pos_embed.shape[1] - prefix)
        if (old, old) == grid:
            return pos_embed
        return resample_abs_pos_embed(pos_embed, list(grid), [old, old], num_prefix_tokens=prefix)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)  # (B, C4)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Reference repository (fudan-zvg/SOFT) names -> ours, applied in order.
_REFERENCE_KEYS = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (r"^pos_embed(\d)$", lambda m: f"stages.{int(m[1]) - 1}.pos_embed"),
    (r"^block([123])\.(\d+)\.att\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^block4\.(\d+)\.", lambda m: f"stages.3.blocks.{m[1]}."),
    (r"\.mha\.W_q\.", lambda m: ".attn.q."),
    (r"\.mha\.W_v\.", lambda m: ".attn.v."),
    (r"\.mha\.ff\.", lambda m: ".attn.proj."),
    (r"\.mha\.attn\.Qlandmark_op\.", lambda m: ".attn.landmark."),
    (r"\.mha\.attn\.Qnorm_act\.0\.", lambda m: ".attn.landmark_norm."),
    (r"\.mha\.attn\.conv\.", lambda m: ".attn.v_conv."),
    (r"\.ff1\.", lambda m: ".mlp.fc1."),
    (r"\.ff2\.", lambda m: ".mlp.fc2."),
]


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SoftVisionTransformer) -> dict[str, Tensor]:
    """Map a reference-implementation (or our own) state dict onto ``model``'s names and check it fits.

    Raises ``EffdlError`` listing missing, unexpected and wrongly shaped keys.
    """
    state_dict = state_dict.get("model", state_dict)  # reference checkpoints wrap weights in {"model": ...}
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _REFERENCE_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    expected = model.state_dict()
    problems = []
    if missing := sorted(expected.keys() - out.keys()):
        problems.append(f"missing keys {_few(missing)}")
    if unexpected := sorted(out.keys() - expected.keys()):
        problems.append(f"unexpected keys {_few(unexpected)}")
    shapes = [f"{k} {tuple(out[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in out and out[k].shape != v.shape and not k.endswith("pos_embed")]
    if shapes:
        problems.append(f"shape mismatches {_few(shapes)}")
    if problems:
        raise EffdlError("checkpoint does not fit the model: " + "; ".join(problems))
    return out


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stages.0.downsample.0", "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2110.11945", **kwargs,
    }


default_cfgs = generate_default_cfgs({f"soft_{size}.untrained": _cfg() for size in
                                      ("tiny", "small", "medium", "large", "huge")})

MODEL_ARGS = {
    "soft_tiny": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(1, 2, 3, 2)),
    "soft_small": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(1, 3, 7, 4)),
    "soft_medium": dict(embed_dims=(64, 128, 288, 512), num_heads=(2, 4, 9, 16), depths=(1, 3, 29, 5)),
    "soft_large": dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(1, 3, 40, 5)),
    "soft_huge": dict(embed_dims=(64, 128, 352, 512), num_heads=(2, 4, 11, 16), depths=(1, 5, 49, 5)),
}


def _create_soft(variant: str, pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return build_model_with_cfg(SoftVisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**MODEL_ARGS[variant], **kwargs})


@register_model
def soft_tiny(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create_soft("soft_tiny", pretrained, **kwargs)


@register_model
def soft_small(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create_soft("soft_small", pretrained, **kwargs)


@register_model
def soft_medium(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create_soft("soft_medium", pretrained, **kwargs)


@register_model
def soft_large(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create_soft("soft_large", pretrained, **kwargs)


@register_model
def soft_huge(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    return _create_soft("soft_huge", pretrained, **kwargs)
