"""One forward over a step's whole token batch: every prefill chunk and the decode rows together.

A serving step mixes a few long prefill chunks with many one-token decode
rows. Run as separate forwards, each reads every weight matrix once more; on
CPU the decode batch is bound by that read, so a step that also prefills pays
it twice. Here all the step's tokens are one flat sequence of N tokens for
the linears, norms and FFN (one read of the weights), and only attention is
split, by ``AttentionGroup``: B rows of T tokens each on consecutive KV slots,
each query seeing its own slot's cache up to itself.

Shapes: N tokens in the step, G tokens of one group (B * T); the rest as in
``effdl.core.transformer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effdl.core.transformer import KVCache, Transformer, causal_mask
from effdl.flover.decode_attention import decode_attention


@dataclass(frozen=True)
class AttentionGroup:
    """Tokens [offset, offset + rows * width) of the step: ``rows`` rows of ``width`` tokens, slots first_slot...

    Row r's tokens sit at positions start[r], start[r] + 1, ... of slot
    ``first_slot + r``. A prefill chunk is one row of its length; the decode
    batch is ``hi - lo`` rows of one token.
    """

    offset: int
    first_slot: int
    starts: tuple[int, ...]
    width: int

    @property
    def rows(self) -> int:
        return len(self.starts)

    @property
    def size(self) -> int:
        return self.rows * self.width


def ragged_forward(model: Transformer, tokens: Tensor, groups: list[AttentionGroup], cache: KVCache,
                   logit_index: Tensor, live_decode: bool = False) -> Tensor:
    """Logits (n, V) at the step's tokens ``logit_index`` (n,), for the flat token batch ``tokens`` (N,).

    The groups tile [0, N) in order. Each token's key and value are written
    into ``cache`` (L, slots, K, S_max, Dh) at its slot and position before
    attention, so a group attends to its rows' earlier positions and to
    itself. Equals running each group as its own cached ``model`` forward.
    Cost: one pass of the linears over N tokens, plus per group
    O(rows * width * kv_len * H * Dh) attention, kv_len being the group's
    furthest position + 1. With ``live_decode``, one-token groups attend
    through ``decode_attention`` (fp32 CPU, kernel built) over each row's own
    length instead of masked SDPA up to the longest row. Raises
    ``ValueError`` when a group reaches past the cache.
    """
    furthest = max(start + g.width for g in groups for start in g.starts)
    if furthest > cache.max_len:
        raise ValueError(f"positions + new tokens reach {furthest}, past the KV cache length {cache.max_len}")
    device = tokens.device
    slots = torch.cat([torch.arange(g.first_slot, g.first_slot + g.rows, device=device).repeat_interleave(g.width)
                       for g in groups])  # (N,)
    positions = torch.cat([(torch.tensor(g.starts, device=device)[:, None] + torch.arange(g.width, device=device))
                           .flatten() for g in groups])  # (N,)
    window = model.config.sliding_window
    lengths = [torch.tensor(g.starts, device=device) + 1 if live_decode and g.width == 1 else None
               for g in groups]  # (B,) keys per decode row
    masks = [None if n is not None else _group_mask(g, positions[g.offset:g.offset + g.size].view(g.rows, g.width),
                                                      window) for g, n in zip(groups, lengths, strict=True)]
    stored = _scattered_tokens(groups, [n is None for n in lengths], device)  # the kernel writes the others' keys
    if stored is not None:
        stored_slots, stored_positions = slots[stored], positions[stored]  # (N',)
    cos, sin = model.rope(positions[None])  # (1, 1, N, Dh) each
    h = model.embed(tokens[None])  # (1, N, D)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)  # (1, H, N, Dh), (1, K, N, Dh) x2
        cache_k, cache_v = cache.k[i], cache.v[i]  # (slots, K, S_max, Dh)
        if stored is not None:
            cache_k[stored_slots, :, stored_positions] = k[0][:, stored].transpose(0, 1)  # (N', K, Dh)
            cache_v[stored_slots, :, stored_positions] = v[0][:, stored].transpose(0, 1)
        o = torch.empty_like(q)  # (1, H, N, Dh)
        for g, mask, n in zip(groups, masks, lengths, strict=True):
            span, rows = slice(g.offset, g.offset + g.size), slice(g.first_slot, g.first_slot + g.rows)
            if n is None:
                o[0, :, span] = _sdpa_group_attention(layer.attention, q[0, :, span], cache_k, cache_v, g, mask)
            else:  # one token per row: (B, H, Dh) queries, their new keys and values (B, K, Dh) written by the kernel
                o[0, :, span] = decode_attention(q[0, :, span].transpose(0, 1), cache_k[rows], cache_v[rows], n,
                                                 window, k[0, :, span].transpose(0, 1),
                                                 v[0, :, span].transpose(0, 1)).transpose(0, 1)
        h = layer.ffn_residual(layer.attention_residual(h, o))
    return model.head(h[0, logit_index])  # (n, V)


def _scattered_tokens(groups: list[AttentionGroup], scattered: list[bool],
                      device: torch.device) -> Tensor | slice | None:
    """Which of the step's tokens the layer loop writes into the cache itself: all (a slice), none (None), or these
    indices (N',); the others are the decode kernel's to write."""
    if all(scattered):
        return slice(None)
    if not any(scattered):
        return None
    return torch.cat([torch.arange(g.offset, g.offset + g.size, device=device)
                      for g, s in zip(groups, scattered, strict=True) if s])


def _group_mask(g: AttentionGroup, positions: Tensor, window: int | None) -> Tensor | None:
    """The boolean mask (B, 1, T, S) for a group's positions (B, T), or None where SDPA's is_causal is the same.

    Decided from the group's plain ints, so a CUDA step does not wait on the device for it.
    """
    if g.rows == 1 and g.starts[0] == 0 and (window is None or window >= g.width):
        return None  # a prompt's first chunk: plain causal attention over its own T keys
    return causal_mask(positions, max(g.starts) + g.width, window)


def _sdpa_group_attention(attention: torch.nn.Module, q: Tensor, cache_k: Tensor, cache_v: Tensor, g: AttentionGroup,
                          mask: Tensor | None) -> Tensor:
    """One group's attention output (H, G, Dh) for its queries q (H, G, Dh) over its slots' cache, SDPA with
    ``mask``."""
    H, _, Dh = q.shape
    slots = slice(g.first_slot, g.first_slot + g.rows)
    kv_len = mask.shape[-1] if mask is not None else g.width
    q = q.view(H, g.rows, g.width, Dh).transpose(0, 1)  # (B, H, T, Dh)
    out = F.scaled_dot_product_attention(
        q, cache_k[slots, :, :kv_len], cache_v[slots, :, :kv_len], attn_mask=mask, is_causal=mask is None,
        enable_gqa=attention.n_heads != attention.n_kv_heads)  # (B, H, T, Dh)
    return out.transpose(0, 1).reshape(H, g.size, Dh)
