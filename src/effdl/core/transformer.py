"""A Llama-family decoder in one file: RMSNorm, RoPE, grouped-query attention,
SwiGLU (or a Mixtral-style MoE FFN), with a preallocated KV cache whose rows
may sit at different positions.

Dimension legend used in shape comments:
    B  batch rows            T  new tokens this call       S  keys attended (cache length)
    D  model dim             H  query heads                K  key/value heads
    Dh head dim              F  FFN hidden dim             V  vocabulary
    L  layers

The model is single-device and knows nothing of distribution, offload or
serving; FPDT, ExFlow and Flover wrap or drive it from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effdl.core.config import ModelConfig
from effdl.core.moe import MoEFeedForward


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32 whatever the activation dtype, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Per-pair rotation frequencies (Dh/2,), fp32, with Llama-3 or linear scaling if configured.

    Cost: O(Dh). Matches ``transformers``' ``ROPE_INIT_FUNCTIONS`` for the supported types.
    """
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(medium, blended, inv_freq)
    return inv_freq


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables for the given absolute positions (B, T) -> two (B, 1, T, Dh) fp32 tensors."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, Dh)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, Dh) by position, Llama's half-split convention (no weight permutation needed)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, H, T, Dh)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def causal_mask(q_pos: Tensor, kv_len: int, window: int | None = None) -> Tensor:
    """Boolean mask (B, 1, T, S): query at absolute position p sees keys at 0..p (or p-window+1..p)."""
    k_pos = torch.arange(kv_len, device=q_pos.device)  # (S,)
    allowed = k_pos <= q_pos[..., None]  # (B, T, S)
    if window is not None:
        allowed &= k_pos > q_pos[..., None] - window
    return allowed[:, None]  # (B, 1, T, S)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: k, v are (L, B, K, S_max, Dh).

    Row b's entries at positions >= its own length are stale and never attended
    before being overwritten, so rows of different lengths share one tensor.
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.sliding_window
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv_out, bias=cfg.qkv_bias, device=device, dtype=dtype)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False, device=device, dtype=dtype)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input (B, T, D) -> roped q (B, H, T, Dh), roped k (B, K, T, Dh), v (B, K, T, Dh).

        The seam that every attention variant (cached decode, FPDT's chunks, ExFlow's ranks) starts from.
        """
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * Dh, K * Dh, K * Dh], dim=-1)  # (B, T, H*Dh), (B, T, K*Dh) x2
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        v = v.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: Tensor) -> Tensor:
        """Attention output (B, H, T, Dh) -> the block's residual update (B, T, D)."""
        B, H, T, Dh = o.shape
        return self.wo(o.transpose(1, 2).reshape(B, T, H * Dh))  # (B, T, D)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None, write_idx: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            cache_k, cache_v = cache  # (B, K, S_max, Dh) each
            rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
            cache_k[rows, :, write_idx] = k.transpose(1, 2)  # cache_k[b, :, write_idx[b, t]] = k[b, :, t]
            cache_v[rows, :, write_idx] = v.transpose(1, 2)
            kv_len = mask.shape[-1]
            k, v = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]  # (B, K, S, Dh)

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, Dh)
        return self.out(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x w1) * x w3), with w1 and w3 fused into one matmul."""

    def __init__(self, dim: int, ffn_dim: int, device=None, dtype=None):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * ffn_dim, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (..., F) each
        return self.w2(F.silu(gate) * up)  # (..., D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        self.attention = Attention(cfg, device, dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device, dtype)
        if cfg.is_moe:
            self.feed_forward = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.experts_per_token,
                                               cfg.norm_topk_prob, device, dtype)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, device, dtype)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Block input (B, T, D) -> roped q (B, H, T, Dh), k and v (B, K, T, Dh): the attention's input side."""
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def attention_residual(self, x: Tensor, o: Tensor) -> Tensor:
        """x (B, T, D) plus the output projection of attention output o (B, H, T, Dh)."""
        return x + self.attention.out(o)

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
               cache: tuple[Tensor, Tensor] | None = None, write_idx: Tensor | None = None) -> Tensor:
        """x (B, T, D) plus its (optionally cached) self-attention: the block's first half."""
        return x + self.attention(self.attention_norm(x), cos, sin, mask, cache, write_idx)

    def ffn_residual(self, h: Tensor) -> Tensor:
        """h (..., D) plus the feed-forward of its norm: the block's second half."""
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: tuple[Tensor, Tensor] | None = None, write_idx: Tensor | None = None) -> Tensor:
        return self.ffn_residual(self.attend(x, cos, sin, mask, cache, write_idx))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, device, dtype) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device, dtype)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, 0.02) weights; residual output projections scaled by 1/sqrt(2L) as in GPT-2."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p))
            else:
                residual_out = name.endswith(("wo.weight", "w2.weight", ".w2"))
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers) if residual_out else std)

    def balance_loss(self) -> Tensor:
        """Mean load-balancing loss of the MoE layers in the last training-mode forward (0 for dense models)."""
        losses = [layer.feed_forward.balance_loss for layer in self.layers
                  if getattr(layer.feed_forward, "balance_loss", None) is not None]
        return torch.stack(losses).mean() if losses else self.output.weight.new_zeros(())

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) -> hidden states (B, T, D)."""
        return self.tok_embeddings(tokens)

    def head(self, h: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V)."""
        return self.output(self.norm(h))

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin (B, 1, T, Dh) for absolute positions (B, T)."""
        return rope_cos_sin(positions, self.inv_freq)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                logit_index: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) for tokens (B, T), or (B, V) at index ``logit_index[b]`` of each row when given.

        Without ``cache``: a full causal pass, tokens of row b at positions
        ``positions[b] + t`` (default 0 + t). With ``cache``: the new tokens'
        keys/values are written into the cache at those positions and each
        query attends to its own row's cache up to itself, so rows may be at
        different lengths (``positions`` is then required, shape (B,)).
        ``logit_index`` (B,) saves the LM head on the positions nobody samples
        from (a prefill needs only its last token's logits).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        start = torch.zeros(B, dtype=torch.long, device=tokens.device) if positions is None else positions
        pos = start[:, None] + torch.arange(T, device=tokens.device)  # (B, T)
        cos, sin = self.rope(pos)  # (B, 1, T, Dh) each

        window = self.config.sliding_window
        if cache is None:
            # Plain causal attention within the call (SDPA's is_causal) unless a window cuts it.
            local = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
            mask = causal_mask(local, T, window) if window is not None and window < T else None
        else:
            if positions is None:
                raise ValueError("decoding with a KV cache needs positions (B,): each row's current length")
            kv_len = int(start.max()) + T
            if kv_len > cache.max_len:
                raise ValueError(f"positions + new tokens reach {kv_len}, past the KV cache length {cache.max_len}")
            mask = causal_mask(pos, kv_len, window)  # (B, 1, T, S)

        h = self.embed(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            h = layer(h, cos, sin, mask, layer_cache, pos)
        if logit_index is not None:
            h = h[torch.arange(B, device=h.device), logit_index]  # (B, D)
        return self.head(h)  # (B, T, V) or (B, V)
