"""Exact attention computed chunk pair by chunk pair, merged by log-sum-exp.

Dimension legend: B batch, H query heads, K key/value heads (H = G*K),
T sequence length, C chunk length (the last chunk may be shorter), D head dim.

A query chunk i attends to key/value chunks j (j <= i when causal). Each pair
gives a partial output o_ij and the log-sum-exp l_ij of its scores; partials
combine exactly by the online-softmax rule
    l = logaddexp(l_a, l_b),  o = exp(l_a - l) o_a + exp(l_b - l) o_b,
so nothing larger than one C x C score block ever exists. The backward needs
no forward recompute beyond each pair's own scores: with the *final* output
o_i and log-sum-exp l_i, the pair's probabilities are exp(s_ij - l_i) and
its gradients are exactly its share of the full gradients.

The pair kernels come from one adapter: torch's flash kernels that return the
log-sum-exp (CPU: ``_scaled_dot_product_flash_attention_for_cpu``; CUDA:
``_scaled_dot_product_efficient_attention``, checked once against the math
path before use) or a pure-PyTorch math path.

The loops read chunks from an ``OffloadStore`` (keys ``(tag, "q"|"k"|"v"|
"out"|"lse"|"dout"|"dq", i)``) and prefetch the next chunk they will need, so
the same code runs the standalone ``chunked_attention`` (everything resident)
and FPDT's offloaded pipeline.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable, Iterator

import torch
from torch import Tensor

from effdl.errors import EffdlError
from effdl.fpdt.store import OffloadStore

BACKENDS = ("auto", "flash", "math")


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of ``length`` tokens in chunks of ``chunk_size`` (the last may be shorter)."""
    return [(s, min(s + chunk_size, length)) for s in range(0, length, chunk_size)]


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """(B, K, C, D) -> (B, K*G, C, D): each key/value head serves G consecutive query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv(dx: Tensor, groups: int) -> Tensor:
    """(B, K*G, C, D) -> (B, K, C, D): sum the gradient over the query heads that shared a key/value head."""
    if groups == 1:
        return dx
    B, H, C, D = dx.shape
    return dx.view(B, H // groups, groups, C, D).sum(2)  # (B, K, C, D)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Partial outputs, log-sum-exps and gradient sums are kept in fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scaled scores (B, H, Cq, Ck) in ``accum_dtype``, keys after the query at -inf when ``causal``."""
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Cq, Ck)
    if causal:
        cq, ck = scores.shape[-2:]
        upper = torch.ones(cq, ck, dtype=torch.bool, device=scores.device).triu(1)  # keys after the query
        scores = scores.masked_fill(upper, float("-inf"))
    return scores


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    acc = accum_dtype(q.dtype)
    scores = _scores(q.to(acc), k.to(acc), causal, scale)  # (B, H, Cq, Ck)
    lse = scores.logsumexp(-1)  # (B, H, Cq)
    out = (scores - lse[..., None]).exp() @ v.to(acc)  # (B, H, Cq, D)
    return out.to(q.dtype), lse


def _math_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = accum_dtype(q.dtype)
    qf, kf, vf, doutf = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    scores = _scores(qf, kf, causal, scale)  # (B, H, Cq, Ck)
    probs = (scores - lse[..., None]).exp()  # (B, H, Cq, Ck): this pair's share of the full softmax
    delta = (doutf * out.to(acc)).sum(-1, keepdim=True)  # (B, H, Cq, 1)
    dscores = probs * (doutf @ vf.transpose(-1, -2) - delta) * scale  # (B, H, Cq, Ck)
    return (dscores @ kf).to(q.dtype), (dscores.transpose(-1, -2) @ qf).to(k.dtype), \
        (probs.transpose(-1, -2) @ doutf).to(v.dtype)


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.shape[2]].to(accum_dtype(q.dtype))  # the kernel pads lse's length to its block size


def _cuda_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), q, k, v, None, out, lse.contiguous(), zero, zero, 0.0, [True, True, True, False],
        causal, scale=scale)
    return dq, dk, dv


@functools.cache
def _cuda_kernel_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the CUDA kernels once per device and dtype on a small problem and compare with the math path;
    warn and fall back if they are unavailable or disagree."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 40, 32, device=device, dtype=dtype, generator=gen) for _ in range(4))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        ref = _math_forward(q, k, v, True, 0.2)
        got = _cuda_forward(q, k, v, True, 0.2)
        ref_grads = _math_backward(dout, q, k, v, *ref, True, 0.2)
        got_grads = _cuda_backward(dout, q, k, v, *got, True, 0.2)
        pairs = [*zip(ref, got, strict=True), *zip(ref_grads, got_grads, strict=True)]
        usable = all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in pairs)
        reason = "disagrees with the math path"
    except RuntimeError as e:
        usable, reason = False, f"is unavailable ({e})"
    if not usable:
        warnings.warn(f"CUDA attention kernel {reason} for {dtype}; FPDT uses the math path", stacklevel=2)
    return usable


def _use_flash(q: Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise EffdlError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "math":
        return False
    return q.device.type == "cpu" or (q.is_cuda and _cuda_kernel_usable(q.device, q.dtype))


def pair_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Attention of one query chunk (B, H, Cq, D) to one key/value chunk (B, K, Ck, D).

    Returns the output (B, H, Cq, D) in q's dtype and the log-sum-exp (``accum_dtype``) of
    the scaled scores (B, H, Cq). ``causal`` masks keys after the query
    (used for the diagonal pair, where Cq == Ck). Cost: O(Cq Ck D) time,
    O(Cq Ck) memory on the math path, O(Cq D) with a flash kernel.
    """
    flash = _use_flash(q, backend)
    if flash and q.device.type == "cpu":  # grouped-query heads natively, no expanded copies
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    return (_cuda_forward if flash else _math_forward)(q, k, v, causal, scale)


def pair_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                  scale: float, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """This pair's share of dq (B, H, Cq, D), dk and dv (B, K, Ck, D), given the *final* out and lse of the queries.

    Cost: about twice the pair's forward.
    """
    flash = _use_flash(q, backend)
    if flash and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse, 0.0, causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    dq, dk, dv = (_cuda_backward if flash else _math_backward)(dout, q, ke, ve, out, lse, causal, scale)
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


def merge_partials(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets: outputs (B, H, C, D), lse (B, H, C), ``out``'s dtype.

    Cost: O(C D).
    """
    merged = torch.logaddexp(lse, lse_b)  # (B, H, C)
    out = (lse - merged).exp()[..., None] * out + (lse_b - merged).exp()[..., None] * out_b.to(out.dtype)
    return out, merged


def _kv_order(i: int, n_chunks: int, causal: bool) -> range:
    return range(i + 1) if causal else range(n_chunks)


def attend_query_chunk(store: OffloadStore, tag: Hashable, i: int, q: Tensor, n_chunks: int, causal: bool,
                       scale: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Output (B, H, C, D) in q's dtype and lse (B, H, C) of query chunk ``i`` against the stored k/v chunks.

    Prefetches k/v chunk j+1 while chunk j computes, and chunk 0 (the next
    query chunk's first) at the end. Cost: O(C * T_visible * D).
    """
    out = lse = None
    order = list(_kv_order(i, n_chunks, causal))
    for step, j in enumerate(order):
        upcoming = order[step + 1] if step + 1 < len(order) else 0
        store.prefetch((tag, "k", upcoming))
        store.prefetch((tag, "v", upcoming))
        part, part_lse = pair_forward(q, store.get((tag, "k", j)), store.get((tag, "v", j)),
                                      causal and j == i, scale, backend)
        out, lse = (part.to(part_lse.dtype), part_lse) if out is None else merge_partials(out, lse, part, part_lse)
    return out.to(q.dtype), lse


def attention_backward_chunks(store: OffloadStore, tag: Hashable, n_chunks: int, causal: bool, scale: float,
                              backend: str = "auto") -> Iterator[tuple[int, Tensor, Tensor, list[tuple[int, Tensor]]]]:
    """Backward over stored q/k/v/out/lse/dout chunks, outer loop over key/value chunk j, inner over query chunks.

    Yields ``(j, dk_j, dv_j, finished)`` after each outer step, where
    ``finished`` lists ``(i, dq_i)`` for the query chunks whose gradient just
    became final (causal: exactly chunk j; otherwise all of them after the last
    j). Partial dQ lives in the store (``accum_dtype``, key ``(tag, "dq", i)``) between
    visits. Cost: the sum of the pairs' backwards, with no forward recompute.
    """
    for j in range(n_chunks):
        k, v = store.get((tag, "k", j)), store.get((tag, "v", j))
        dk = dv = None
        queries = range(j, n_chunks) if causal else range(n_chunks)
        finished = []
        for i in queries:
            q_key = (tag, "q", i)
            nxt = i + 1 if i + 1 < n_chunks else (j + 1 if causal else 0)
            for name in ("q", "out", "lse", "dout"):
                store.prefetch((tag, name, nxt))
            dq, dk_i, dv_i = pair_backward(store.get((tag, "dout", i)), store.get(q_key), k, v,
                                           store.get((tag, "out", i)), store.get((tag, "lse", i)),
                                           causal and i == j, scale, backend)
            acc = accum_dtype(dk_i.dtype)
            dk = dk_i.to(acc) if dk is None else dk + dk_i
            dv = dv_i.to(acc) if dv is None else dv + dv_i
            first_visit = j == 0
            dq = dq.to(acc) if first_visit else store.get((tag, "dq", i)) + dq
            last_visit = j == (i if causal else n_chunks - 1)
            if last_visit:
                store.discard((tag, "dq", i))
                finished.append((i, dq))
            else:
                store.put((tag, "dq", i), dq)
        yield j, dk, dv, finished


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, chunk_size: int, causal: bool, scale: float,
                backend: str) -> Tensor:
        bounds = chunk_bounds(q.shape[2], chunk_size)
        store = _slices_store(bounds, q=q, k=k, v=v)
        outs, lses = zip(*(attend_query_chunk(store, None, i, store.get((None, "q", i)), len(bounds), causal,
                                              scale, backend) for i in range(len(bounds))), strict=True)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)  # (B, H, T, D), (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk_size, ctx.causal, ctx.scale, ctx.backend = chunk_size, causal, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        bounds = chunk_bounds(q.shape[2], ctx.chunk_size)
        store = _slices_store(bounds, q=q, k=k, v=v, out=out, lse=lse, dout=dout.to(q.dtype))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for j, dk_j, dv_j, finished in attention_backward_chunks(store, None, len(bounds), ctx.causal, ctx.scale,
                                                                 ctx.backend):
            dk[:, :, slice(*bounds[j])], dv[:, :, slice(*bounds[j])] = dk_j, dv_j
            for i, dq_i in finished:
                dq[:, :, slice(*bounds[i])] = dq_i
        return dq, dk, dv, None, None, None, None


def _slices_store(bounds: list[tuple[int, int]], **tensors: Tensor) -> OffloadStore:
    """A resident store holding views of each tensor's chunks along dim 2, keys (None, name, i)."""
    store = OffloadStore()
    for name, tensor in tensors.items():
        for i, (start, end) in enumerate(bounds):
            store.put((None, name, i), tensor[:, :, start:end])
    return store


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, causal: bool = True,
                      scale: float | None = None, backend: str = "auto") -> Tensor:
    """Exact softmax attention, laid out as ``scaled_dot_product_attention``, computed chunk pair by chunk pair.

    q (B, H, T, D), k/v (B, K, T, D) with H a multiple of K (grouped-query
    attention); returns (B, H, T, D). T need not divide by ``chunk_size``.
    Forward and backward touch one C x C block at a time: extra memory
    O(C^2) per head on the math path (O(C D) with a flash kernel) instead of
    O(T^2), and the backward uses the saved output and log-sum-exp rather
    than recomputing the attention. Time: O(T^2 D), half that when causal.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise EffdlError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise EffdlError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}, {tuple(v.shape)} must agree in B, T and D")
    if q.shape[1] % k.shape[1]:
        raise EffdlError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if chunk_size <= 0:
        raise EffdlError(f"chunk_size must be positive, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkedAttention.apply(q, k, v, chunk_size, causal, scale, backend)
