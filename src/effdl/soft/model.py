"""SOFT and SOFT++ (Lu et al., NeurIPS 2021 and IJCV 2024), in timm's model zoo.

A four-stage pyramid: a conv stem (three 3x3 convs, stride 4 in all) and a
strided 3x3 conv between stages; stages 1-3 use post-norm blocks with SOFT
attention (bottleneck strides 8, 4, 2; value convs 9, 5, 3), stage 4 uses
pre-norm softmax attention with a class token. ``import effdl.soft`` registers
every model the reference code (fudan-zvg/SOFT) defines, ``soft_tiny`` ...
``soft_huge`` and the normalised SOFT++ ``soft_norm_tiny`` ... ``soft_norm_huge``,
with the reference's architectures, so its checkpoints load from a local file:
``timm.create_model("soft_tiny", pretrained=True, pretrained_cfg_overlay={"file": "soft_tiny.pth"})``.
``num_classes``, ``in_chans`` and ``img_size`` may differ from the checkpoint's
(new head, adapted first conv, resampled position embeddings) for fine-tuning,
and ``features_only=True`` gives the four stage outputs (strides 4-32) for
detection and segmentation.

Any input size divisible by 32 works: position embeddings are resampled to the
token grid, and SOFT attention grows linearly with it.
"""

from __future__ import annotations

import argparse
import math
import re
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from effdl.errors import EffdlError
from effdl.soft.attention import SoftAttention

STRIDE = 32  # total downsampling: stem 4, then 2 per stage


def conv_bn_relu(in_chans: int, out_chans: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(in_chans, out_chans, 3, stride, padding=1), nn.BatchNorm2d(out_chans), nn.ReLU()]


class SoftBlock(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x)), MLP 4x with tanh-GELU."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, conv_size: int, drop_path: float,
                 **attention_args):
        super().__init__()
        self.attn = SoftAttention(dim, num_heads, sr_ratio, conv_size, **attention_args)
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
    """SOFT classifier. ``normalized`` gives SOFT++; ``pinv``, ``newton_iters`` and ``landmark_grid``
    choose the pseudo-inverse operator and the bottleneck size (see ``SoftAttention``)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: tuple[int, ...] = (64, 128, 320, 512), num_heads: tuple[int, ...] = (2, 4, 10, 16),
                 depths: tuple[int, ...] = (1, 2, 3, 2), sr_ratios: tuple[int, ...] = (8, 4, 2),
                 conv_sizes: tuple[int, ...] = (9, 5, 3), mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "token", normalized: bool = False,
                 pinv: str = "reference", newton_iters: int = 20, landmark_grid: int | None = 7):
        super().__init__()
        if img_size % STRIDE:
            raise EffdlError(f"img_size must be a multiple of {STRIDE}, got {img_size}")
        if not len(embed_dims) == len(num_heads) == len(depths) == 4:
            raise EffdlError("SOFT has four stages: embed_dims, num_heads and depths need four entries each")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}")
                             for i, dim in enumerate(embed_dims)]
        attention_args = dict(normalized=normalized, pinv=pinv, newton_iters=newton_iters,
                              landmark_grid=landmark_grid)
        drop_paths = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linear decay

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
                blocks = [SoftBlock(dim, heads, sr_ratios[i], conv_sizes[i], r, **attention_args) for r in rates]
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
        if global_pool:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a local checkpoint (the reference's or ours), adapted to this model's head, input and size."""
        self.load_state_dict(checkpoint_filter_fn(read_checkpoint(checkpoint_path), self))

    def _prepare_input(self, x: Tensor) -> Tensor:
        """Check the images and lay them out channels-last, so that every conv's output flattens into
        contiguous (B, h*w, C) tokens without a copy (the token grid is channels-last by nature)."""
        if x.dim() != 4:
            raise EffdlError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise EffdlError(f"model expects {self.in_chans} input channels, got {x.shape[1]}")
        if x.shape[2] % STRIDE or x.shape[3] % STRIDE:
            raise EffdlError(f"image size must be a multiple of {STRIDE}, got {x.shape[2]}x{x.shape[3]}")
        return x.contiguous(memory_format=torch.channels_last)

    def _run_stage(self, i: int, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Stage ``i`` on a map (B, C, H, W) -> its tokens (B, [1 +] h*w, C_i), class token first in stage 4,
        and their grid (h, w)."""
        stage = self.stages[i]
        x = stage.downsample(x)  # (B, C_i, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C_i)
        prefix = int(i == 3)
        if prefix:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, C_i)
        x = x + resample_pos_embed(stage.pos_embed, grid, prefix)
        for block in stage.blocks:
            x = block(x, grid)
        return x, grid

    @staticmethod
    def _to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Grid tokens (B, [1 +] h*w, C) -> (B, C, h, w), dropping a class token."""
        return tokens[:, -grid[0] * grid[1]:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normalised stage-4 tokens (B, 1 + H/32 * W/32, C4), class token first."""
        x = self._prepare_input(x)
        for i in range(len(self.stages)):
            tokens, grid = self._run_stage(i, x)
            x = self._to_map(tokens, grid)
        return self.norm(tokens)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the outputs of stages ``indices`` as maps (B, C_i, H / 2^(i+2), W / 2^(i+2)).

        ``norm`` applies the final LayerNorm to stage 4's; the class token is dropped from its map.
        """
        if output_fmt != "NCHW":
            raise EffdlError(f"SOFT features come as NCHW maps, not {output_fmt}")
        x = self._prepare_input(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early or intermediates_only else len(self.stages) - 1
        features = []
        for i in range(last + 1):
            tokens, grid = self._run_stage(i, x)
            x = self._to_map(tokens, grid)
            if i in take:
                features.append(self._to_map(self.norm(tokens), grid) if norm and i == 3 else x)
        return features if intermediates_only else (self.norm(tokens), features)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head, and the norm) for a backbone."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)  # (B, C4)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
    """(1, prefix + n*n, C) position embedding -> (1, prefix + h*w, C), bilinear, as the reference resamples."""
    old = math.isqrt(pos_embed.shape[1] - prefix)
    if (old, old) == tuple(grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(grid), [old, old], num_prefix_tokens=prefix,
                                  interpolation="bilinear", antialias=False)


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
FIRST_CONV = "stages.0.downsample.0"
# Where a training script keeps the weights, most preferred first (timm's saver: EMA weights first).
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def _unwrap(checkpoint: dict) -> dict:
    return next((checkpoint[k] for k in _WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, unwrapped and without
    DataParallel's ``module.`` prefix. Raises ``EffdlError`` for a missing file or one with no state dict."""
    path = Path(path)
    if not path.is_file():
        raise EffdlError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            checkpoint = safetensors.torch.load_file(path)
        else:
            # Reference checkpoints from timm's training script also hold the run's argparse arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, safetensors and runtime errors all mean "not a checkpoint"
        reason = (str(e).splitlines() or [""])[0][:200]
        raise EffdlError(f"checkpoint {path} is not a PyTorch state dict ({type(e).__name__}: {reason})") from None
    if isinstance(checkpoint, dict):
        checkpoint = _unwrap(checkpoint)
    if not isinstance(checkpoint, dict) or not any(isinstance(v, Tensor) for v in checkpoint.values()):
        found = (f"a dict with keys {_few(sorted(map(str, checkpoint)))}" if isinstance(checkpoint, dict)
                 else f"a {type(checkpoint).__name__}")
        raise EffdlError(f"checkpoint {path} holds no state dict: found {found}")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SoftVisionTransformer) -> dict[str, Tensor]:
    """Map a reference-implementation (or our own) state dict onto ``model`` and adapt it for fine-tuning.

    - A head for another class count (or none) is replaced by ``model``'s fresh one (``num_classes=...``;
      a backbone's head is dropped anyway).
    - A first conv for another channel count is adapted with timm's ``adapt_input_conv``.
    - Position embeddings are resampled (bilinear) to ``model``'s ``img_size``.
    Anything else that does not fit raises ``EffdlError`` naming the keys, and the variant the
    checkpoint does fit when it is one of ours.
    """
    out = {}
    for key, value in _unwrap(state_dict).items():
        for pattern, repl in _REFERENCE_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    expected = model.state_dict()
    for i, stage in enumerate(model.stages):
        key = f"stages.{i}.pos_embed"
        if key in out and out[key].dim() == 3 and out[key].shape[1] != stage.pos_embed.shape[1]:
            prefix = int(i == 3)
            side = math.isqrt(stage.pos_embed.shape[1] - prefix)
            out[key] = resample_pos_embed(out[key], (side, side), prefix)
    stem = f"{FIRST_CONV}.weight"
    if stem in out and out[stem].dim() == 4 and out[stem].shape[0] == expected[stem].shape[0] \
            and out[stem].shape[1] != expected[stem].shape[1]:
        out[stem] = adapt_input_conv(expected[stem].shape[1], out[stem])
    for key in ("head.weight", "head.bias"):
        if key not in expected:  # num_classes=0: no head
            out.pop(key, None)
        elif key not in out or out[key].shape != expected[key].shape:
            out[key] = expected[key]
    if problems := _mismatches(out, expected):
        variant = getattr(model, "pretrained_cfg", {}).get("architecture", "the model")
        fits = [name for name in MODEL_ARGS if not _mismatches(out, _meta_state_dict(name, model), adaptable=True)]
        hint = f"it is a checkpoint of {' or '.join(fits)}, not {variant}; " if fits and variant not in fits else ""
        raise EffdlError(f"checkpoint does not fit {variant}: {hint}" + "; ".join(problems))
    return out


def _mismatches(found: dict[str, Tensor], expected: dict[str, Tensor], adaptable: bool = False) -> list[str]:
    """Missing, unexpected and wrongly shaped keys; ``adaptable`` ignores what fine-tuning adapts."""
    skip = ("head.", "pos_embed", FIRST_CONV) if adaptable else ()
    problems = []
    if missing := sorted(k for k in expected.keys() - found.keys() if not any(s in k for s in skip)):
        problems.append(f"missing keys {_few(missing)}")
    if unexpected := sorted(k for k in found.keys() - expected.keys() if not any(s in k for s in skip)):
        problems.append(f"unexpected keys {_few(unexpected)}")
    shapes = [f"{k} {tuple(found[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in found and found[k].shape != v.shape and not any(s in k for s in skip)]
    if shapes:
        problems.append(f"shape mismatches {_few(shapes)}")
    return problems


def _meta_state_dict(name: str, like: SoftVisionTransformer) -> dict[str, Tensor]:
    """Shapes of variant ``name``'s state dict, without allocating it."""
    with torch.device("meta"):
        return SoftVisionTransformer(in_chans=like.in_chans, num_classes=like.num_classes,
                                     **MODEL_ARGS[name]).state_dict()


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": FIRST_CONV, "classifier": "head", "license": "mit",
        "paper_ids": "arXiv:2110.11945", **kwargs,
    }


_TINY = dict(embed_dims=(64, 128, 320, 512), num_heads=(2, 4, 10, 16), depths=(1, 2, 3, 2))
_SIZES = {
    "tiny": _TINY,
    "small": dict(_TINY, depths=(1, 3, 20, 4)),  # the reference code's; the paper's table has (1, 3, 7, 4)
    "small_paper": dict(_TINY, depths=(1, 3, 7, 4)),
    "medium": dict(embed_dims=(64, 128, 288, 512), num_heads=(2, 4, 9, 16), depths=(1, 3, 29, 5)),
    "large": dict(_TINY, depths=(1, 3, 40, 5)),
    "huge": dict(embed_dims=(64, 128, 352, 512), num_heads=(2, 4, 11, 16), depths=(1, 5, 49, 5)),
}
# Every name the reference code registers, plus the paper table's Small under names of its own.
MODEL_ARGS: dict[str, dict] = {
    **{f"soft_{size}": args for size, args in _SIZES.items()},
    **{f"soft_norm_{size}": dict(args, normalized=True) for size, args in _SIZES.items()},
}
default_cfgs = generate_default_cfgs({
    f"{name}.untrained": _cfg(paper_ids="arXiv:2110.11945,arXiv:2207.03341") if "norm" in name else _cfg()
    for name in MODEL_ARGS
})


def _create_soft(variant: str, pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
    if kwargs.get("features_only"):
        indices = kwargs.setdefault("out_indices", (0, 1, 2, 3))
        indices = range(4 - indices, 4) if isinstance(indices, int) else indices
        if bad := [i for i in indices if not -4 <= i <= 3]:
            raise EffdlError(f"{variant} has stages 0-3 (strides 4, 8, 16, 32); out_indices asks for {bad}")
        kwargs.setdefault("feature_cls", "getter")
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and overlay.get("file"):
        # A local file goes through SoftVisionTransformer.load_pretrained: clear errors, and the adaptations.
        kwargs["pretrained_cfg_overlay"] = {**overlay, "custom_load": True}
    return build_model_with_cfg(SoftVisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **{**MODEL_ARGS[variant], **kwargs})


def _register(name: str) -> None:
    def create(pretrained: bool = False, **kwargs) -> SoftVisionTransformer:
        return _create_soft(name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"{name}: {MODEL_ARGS[name]}"
    register_model(create)


for _name in MODEL_ARGS:
    _register(_name)
