"""SOFT: softmax-free vision transformers. Importing this registers soft_tiny ... soft_huge with timm."""

from effdl.soft.attention import SoftAttention, gaussian_kernel, newton_pinv, nystrom_gaussian_attention
from effdl.soft.model import SoftVisionTransformer, checkpoint_filter_fn

__all__ = [
    "SoftAttention",
    "SoftVisionTransformer",
    "checkpoint_filter_fn",
    "gaussian_kernel",
    "newton_pinv",
    "nystrom_gaussian_attention",
]
