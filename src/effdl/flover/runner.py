"""The runner executes a ``StepPlan`` on the model and its KV pool; it decides nothing."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover.decode_attention import decode_kernel_supported, load_decode_kernel
from effdl.flover.kvpool import BlockStore, KVPool
from effdl.flover.packed_linear import PackedLinears, packed_linear_supported
from effdl.flover.prefix_cache import BLOCK_SIZE
from effdl.flover.ragged import AttentionGroup, ragged_forward
from effdl.flover.scheduler import StepPlan


class ModelRunner:
    def __init__(self, model: Transformer, n_slots: int, max_len: int, packed_linears: bool = True,
                 live_decode: bool = True, prefix_rows: int = 0, block_size: int = BLOCK_SIZE):
        """``packed_linears``: on CPU in fp32, run the linears through oneDNN's prepacked GEMM (``packed_linear``).

        ``live_decode``: on CPU in fp32, decode rows attend over their own lengths through the compiled kernel
        of ``decode_attention`` (built on first use; masked SDPA where it cannot be built).

        ``prefix_rows``: blocks of ``block_size`` tokens in the prefix cache's ``BlockStore`` (0: no prefix cache).
        """
        param = next(model.parameters())
        self.model = model.eval()
        self.device = param.device
        use_packed = packed_linears and packed_linear_supported(param.device, param.dtype)
        self.linears = PackedLinears(model) if use_packed else None
        self.live_decode = (live_decode and decode_kernel_supported(param.device, param.dtype)
                            and load_decode_kernel() is not None)
        cfg = model.config
        token_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * param.element_size()
        try:
            self.pool = KVPool(cfg, n_slots, max_len, param.device, param.dtype)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            raise EffdlError(f"the KV pool ({n_slots} slots x {max_len} tokens) needs "
                             f"{n_slots * max_len * token_bytes / 2**30:.1f} GiB on {param.device} and could not be "
                             "allocated; lower max_slots or max_len") from error
        try:
            self.store = BlockStore(cfg, prefix_rows, block_size, param.device, param.dtype) if prefix_rows else None
        except (RuntimeError, MemoryError) as error:
            raise EffdlError(f"the prefix cache ({prefix_rows} blocks x {block_size} tokens) needs "
                             f"{prefix_rows * block_size * token_bytes / 2**30:.1f} GiB on {param.device} and could "
                             "not be allocated; lower prefix_cache_blocks or turn prefix caching off") from error

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[list[str], Tensor]:
        """Load cached blocks, apply the moves, run the prefill chunks and the decode batch, save blocks.

        Returns the ids of the requests that sample this step and their
        next-token logits (N, V), in that order.
        """
        for c in plan.loads:
            self.store.load(self.pool, c.slot, c.first, c.rows)
        for src, dst, length in plan.moves:
            self.pool.move(src, dst, length)
        with self.linears.installed() if self.linears is not None else nullcontext():
            result = self._run(plan)
        for c in plan.saves:  # in plan order: a later save may reuse a row an earlier one filled
            self.store.save(self.pool, c.slot, c.first, c.rows)
        return result

    def _run(self, plan: StepPlan) -> tuple[list[str], Tensor]:
        """The plan's prefill chunks and decode batch as one flat batch: one pass over the weights per step."""
        groups, tokens, ids, sample_at = [], [], [], []
        for c in plan.prefill:
            groups.append(AttentionGroup(len(tokens), c.slot, (c.start,), len(c.tokens)))
            tokens += c.tokens
            if c.sample:
                ids.append(c.request_id)
                sample_at.append(len(tokens) - 1)
        if plan.decode is not None:
            d = plan.decode
            groups.append(AttentionGroup(len(tokens), d.lo, tuple(d.positions), 1))
            ids += [rid for rid, _ in d.rows]
            sample_at += [len(tokens) + row for _, row in d.rows]
            tokens += d.tokens
        if not tokens:
            return [], torch.empty(0)
        logits = ragged_forward(self.model, torch.tensor(tokens, device=self.device), groups, self.pool.cache,
                                torch.tensor(sample_at, dtype=torch.long, device=self.device),
                                self.live_decode)  # (N_sample, V)
        return ids, logits.float()
