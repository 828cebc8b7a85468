"""Expert-parallel MoE inference over ``torch.distributed``: standard (two all-to-alls per MoE layer)
and ExFlow's context-coherent mode (one), sharing one model definition (``effdl.core.Transformer``).

Dimension legend: B requests, G ranks, L layers, E experts, k experts per token, D model dim,
n tokens on this rank, m rows received, P payload columns, K kv heads, S cache length, Dh head dim, V vocab.

Every rank holds the attention, norms, routers and LM head, and only its own experts: expert e of
layer l lives on rank ``gpu_of[l, e]`` of a ``Placement`` (round robin when none is given).

``standard`` (DeepSpeed-MoE, Tutel): request b lives on rank b % G for good. Each MoE layer routes its
tokens, sends each token's k copies to its experts' ranks (all-to-all "dispatch"), and brings the k
outputs home (all-to-all "combine"), where they are weighted and summed.

``coherent`` (ExFlow): every rank keeps the KV cache of *all* requests, so any rank can run attention
for any token. After its expert a token stays on that rank and runs the next layer there: one
all-to-all per MoE layer. Keeping the context coherent costs one all-reduce per decode step, of the
step's new K/V entries of every layer (and the sampled tokens): a token may run layer l's attention on
a different rank at every step, so every rank must see every layer's K/V. The prompt is prefilled the
standard way and its KV cache shared once, which is the authors' "all-gather the initial context".
With k > 1 a token's k copies sit on up to k ranks after the experts; the copies of the secondary
experts send their weighted outputs to the primary (top-1) expert's rank, where the token continues: a
second all-to-all, counted as "combine", that moves only tokens whose experts straddle ranks.

A receiver must know how many rows it gets. Small exchanges (decode) send each peer a fixed number of
slots after a header holding the rows' count, so a dispatch is one collective; large ones (prefill) first
exchange the headers (counted separately as size exchanges) and then send exactly the rows. The slots are
a limit every rank knows on what can arrive: the tokens the sender holds x the copies of one token that can
land on the receiver (its k experts are distinct: at most min(k, experts the receiver holds)). Standard
mode's tokens stay at home, so every rank knows every rank's count. Coherent mode's tokens move with their
experts, so each dispatch's header also carries how many tokens continue on each rank: after it every rank
knows every rank's count for the next layer, with no extra collective.
Greedy decoding only. Results equal the single-process model's up to float summation order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from effdl.core.generate import right_pad
from effdl.core.moe import expert_outputs, route_top_k
from effdl.core.transformer import Block, KVCache, Transformer, causal_mask
from effdl.errors import EffdlError
from effdl.exflow.placement import Placement, round_robin
from effdl.exflow.trace import model_fingerprint

MODES = ("standard", "coherent")
PHASES = ("prefill", "decode")


@dataclass
class CommStats:
    """What one rank sent, per phase ("prefill"/"decode") and MoE layer."""

    all_to_all: dict[str, list[int]]  # data all-to-alls issued, per layer
    size_exchanges: dict[str, list[int]]  # row-count exchanges issued, per layer
    rows_cross: dict[str, list[int]]  # token rows sent to another rank, per layer
    rows_total: dict[str, list[int]]  # token rows sent anywhere (this rank included), per layer
    # Bytes passed to the layer's all-to-alls for other ranks, per layer: padding, headers and size exchanges
    # included, so this is what travels (the rows above are only the tokens in it).
    bytes_cross: dict[str, list[int]]
    bytes_total: dict[str, list[int]]  # the same, this rank's own share included
    kv_syncs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))  # coherent-context syncs
    kv_sync_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    comm_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # in collectives, waits incl.

    @classmethod
    def empty(cls, n_layers: int) -> CommStats:
        def per_layer() -> dict[str, list[int]]:
            return {phase: [0] * n_layers for phase in PHASES}

        return cls(per_layer(), per_layer(), per_layer(), per_layer(), per_layer(), per_layer())

    def merged(self, others: list[CommStats]) -> CommStats:
        """Sum of several ranks' stats (collectives are issued by every rank alike: those are taken once)."""
        out = CommStats.empty(len(self.all_to_all["decode"]))
        for phase in PHASES:
            out.all_to_all[phase] = list(self.all_to_all[phase])
            out.size_exchanges[phase] = list(self.size_exchanges[phase])
            out.kv_syncs[phase] = self.kv_syncs[phase]
            out.comm_s[phase] = max(s.comm_s[phase] for s in others)  # the ranks wait for each other
            for s in others:
                for name in ("rows_cross", "rows_total", "bytes_cross", "bytes_total"):
                    mine, theirs = getattr(out, name), getattr(s, name)
                    mine[phase] = [a + b for a, b in zip(mine[phase], theirs[phase], strict=True)]
                out.kv_sync_bytes[phase] += s.kv_sync_bytes[phase]
        return out

    def decode_table(self, steps: int, world: int) -> tuple[list[str], list[list[float]]]:
        """(columns, one row per MoE layer) of the decode traffic per step, over ``steps`` decode steps of merged
        stats on ``world`` ranks: collectives issued, token rows to other ranks, and bytes to other ranks per rank."""
        steps = max(steps, 1)
        columns = ["MoE layer", "all-to-alls per decode step", "size exchanges per step",
                   "token rows to other ranks per step", "bytes to other ranks per rank per step (padding incl.)"]
        per_layer = zip(self.all_to_all["decode"], self.size_exchanges["decode"], self.rows_cross["decode"],
                        self.bytes_cross["decode"], strict=True)
        return columns, [[layer, a / steps, c / steps, x / steps, b / steps / world]
                         for layer, (a, c, x, b) in enumerate(per_layer)]


@dataclass
class Generation:
    tokens: list[list[int]]  # greedy continuation of every request (all ranks return all requests)
    stats: CommStats  # summed over ranks
    decode_s: float  # wall time of the decode steps
    prefill_s: float
    logits: Tensor | None = None  # (steps, B, V) fp32 when requested: step 0 is the prefill's last position


@dataclass(frozen=True)
class _Comm:
    """Row exchanges between ranks, counted into ``CommStats`` under ``phase`` and MoE ``layer``.

    Immutable: ``at(phase, layer)`` gives the exchanges of one phase and layer, sharing the same stats.
    """

    stats: CommStats
    rank: int
    world: int
    pad_limit_bytes: int
    phase: str = "prefill"
    layer: int = 0

    def at(self, phase: str, layer: int = 0) -> _Comm:
        """The same exchanges, counted under ``phase`` and ``layer``."""
        return replace(self, phase=phase, layer=layer)

    def dispatch(self, rows: Tensor, dest: Tensor, slots: Tensor, notes: Tensor | None = None
                 ) -> tuple[Tensor, _Route]:
        """Send row i of ``rows`` (n, P) fp32 to rank ``dest[i]``; returns the rows received (m, P), grouped by sender.

        ``slots`` (G, G): a limit, known to every rank, on the rows rank s may send rank p. ``notes`` (e,): small
        counts this rank tells every peer; the route returns every sender's. When the largest padded message
        is small (decode), rank s sends rank p a header (the count of real rows, then the notes) and
        ``slots[s, p]`` rows: ONE collective, padding instead of a size exchange, which is what a latency-bound
        step wants. Otherwise (prefill) the headers are exchanged first, then exactly the rows.
        """
        G, P, device = self.world, rows.shape[1], rows.device
        order = dest.argsort(stable=True)  # (n,)
        send = torch.bincount(dest, minlength=G)  # (G,)
        notes = send.new_zeros(0) if notes is None else notes
        header = torch.cat((send[:, None], notes.expand(G, -1)), 1)  # (G, h): what each peer is told
        h = header.shape[1]
        message = h + slots * P  # (G, G) values rank s sends rank p when padded
        assert bool((send.cpu() <= slots[self.rank]).all()), "a padding limit was too small"
        if int(message.sum(1).max()) * rows.element_size() > self.pad_limit_bytes:
            told = self._send(header.flatten(), [h] * G, [h] * G).view(G, h)  # (G, h) from every sender
            self.stats.size_exchanges[self.phase][self.layer] += 1
            route = _Route(order, send.tolist(), told[:, 0].tolist(), told[:, 1:])
            received = self._send(rows[order], route.send, route.recv)
            self._count(route.send)
            return received, route

        out_sizes, in_sizes = message[self.rank], message[:, self.rank]  # (G,) each
        out_start = (out_sizes.cumsum(0) - out_sizes).to(device)  # (G,) where each peer's part begins
        flat = rows.new_zeros(int(out_sizes.sum()))  # (sum of out_sizes,): [header, slots] per peer
        flat[out_start[:, None] + torch.arange(h, device=device)] = header.to(rows.dtype)
        sorted_dest = dest[order]
        slot = torch.arange(len(order), device=device) - (send.cumsum(0) - send)[sorted_dest]  # (n,) front-filled
        first = out_start[sorted_dest] + h + slot * P  # (n,)
        flat[first[:, None] + torch.arange(P, device=device)] = rows[order]
        arrived = self._send(flat, out_sizes.tolist(), in_sizes.tolist())

        in_start = (in_sizes.cumsum(0) - in_sizes).to(device)  # (G,)
        told = arrived[in_start[:, None] + torch.arange(h, device=device)].long()  # (G, h) from every sender
        recv = told[:, 0]  # (G,)
        sender = torch.repeat_interleave(torch.arange(G, device=device), recv)  # (m,)
        index = torch.arange(len(sender), device=device) - (recv.cumsum(0) - recv)[sender]  # (m,) within its sender
        first = in_start[sender] + h + index * P  # (m,)
        received = arrived[first[:, None] + torch.arange(P, device=device)]  # (m, P)
        self._count(send.tolist())
        return received, _Route(order, send.tolist(), recv.tolist(), told[:, 1:])

    def reply(self, rows: Tensor, route: _Route) -> Tensor:
        """Send the rows received through ``route`` (m, P) back to their senders, in their original order."""
        back = self._send(rows, route.recv, route.send)  # (n, P) in dispatch order
        self._count(route.recv)
        out = torch.empty_like(back)
        out[route.order] = back
        return out

    def _count(self, real: list[int]) -> None:
        """One data all-to-all; ``real``: the token rows it sent each peer (not padding)."""
        self.stats.all_to_all[self.phase][self.layer] += 1
        self.stats.rows_total[self.phase][self.layer] += sum(real)
        self.stats.rows_cross[self.phase][self.layer] += sum(real) - real[self.rank]

    def _send(self, inp: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """One all-to-all of ``inp`` along dim 0: ``send[p]`` entries to rank p, ``recv[p]`` from it; bytes counted."""
        out = inp.new_empty((sum(recv), *inp.shape[1:]))
        started = time.perf_counter()
        if dist.is_initialized():
            dist.all_to_all_single(out, inp.contiguous(), recv, send)
        else:  # a single process without a process group
            out.copy_(inp)
        self.stats.comm_s[self.phase] += time.perf_counter() - started
        entry_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        self.stats.bytes_total[self.phase][self.layer] += sum(send) * entry_bytes
        self.stats.bytes_cross[self.phase][self.layer] += (sum(send) - send[self.rank]) * entry_bytes
        return out

    def sync(self, tensor: Tensor) -> None:
        """Sum ``tensor`` over ranks in place: the coherent context's K/V exchange (each row has one writer)."""
        started = time.perf_counter()
        if dist.is_initialized():
            dist.all_reduce(tensor)
        self.stats.comm_s[self.phase] += time.perf_counter() - started
        self.stats.kv_syncs[self.phase] += 1
        self.stats.kv_sync_bytes[self.phase] += tensor.numel() * tensor.element_size()


@dataclass
class _Route:
    order: Tensor  # (n,) the dispatch order of the original rows
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    notes: Tensor  # (G, e) the notes of every sender


class ExpertParallel:
    """One rank's share of an MoE ``Transformer`` and the generation loop of the chosen mode.

    Takes ownership of ``model``: its stacked expert weights are replaced by this rank's experts.
    Every rank must call ``generate`` with the same requests. Exchanges of up to ``pad_limit_bytes``
    travel padded in one collective instead of after a size exchange (0: always exchange sizes).
    """

    def __init__(self, model: Transformer, mode: str = "coherent", placement: Placement | None = None,
                 pad_limit_bytes: int = 1 << 20):
        cfg = model.config
        if mode not in MODES:
            raise EffdlError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if not cfg.is_moe:
            raise EffdlError("expert parallelism needs a mixture-of-experts model (n_experts > 0)")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.n_experts % self.world:
            raise EffdlError(f"{cfg.n_experts} experts cannot be split evenly over {self.world} ranks")
        if placement is None:
            gpu_of = torch.from_numpy(round_robin(cfg.n_layers, cfg.n_experts, self.world))
        else:
            _check_placement(placement, cfg, self.world)
            gpu_of = torch.from_numpy(placement.gpu_of)
        self.model, self.mode, self.cfg, self.pad_limit_bytes = model.eval(), mode, cfg, pad_limit_bytes
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.gpu_of = gpu_of.to(self.device)  # (L, E)
        self.experts_on = torch.stack([torch.bincount(layer, minlength=self.world) for layer in gpu_of])  # (L, G)
        self.local_index = []  # per layer: (E,) position of each global expert in this rank's stack, -1 elsewhere
        for layer, block in zip(self.gpu_of, model.layers, strict=True):
            mine = (layer == self.rank).nonzero().flatten()  # (E/G,)
            ffn = block.feed_forward
            ffn.w13 = nn.Parameter(ffn.w13.detach()[mine].clone(), requires_grad=False)  # (E/G, 2F, D)
            ffn.w2 = nn.Parameter(ffn.w2.detach()[mine].clone(), requires_grad=False)  # (E/G, D, F)
            index = torch.full((cfg.n_experts,), -1, dtype=torch.long, device=self.device)
            index[mine] = torch.arange(len(mine), device=self.device)
            self.local_index.append(index)

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, return_logits: bool = False) -> Generation:
        """Greedy continuations of ``prompts`` (exactly ``max_new_tokens`` each), and what it cost to send."""
        self._check_requests(prompts, max_new_tokens)
        stats = CommStats.empty(self.cfg.n_layers)
        comm = _Comm(stats, self.rank, self.world, self.pad_limit_bytes)
        B = len(prompts)
        own = torch.arange(B, device=self.device)[self.rank::self.world]  # requests homed here (maybe none)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # (B,)
        max_len = int(lengths.max()) + max_new_tokens

        # (G,) token rows on each rank, known to every rank: the senders' side of every padding limit.
        on_rank = torch.tensor([sum(map(len, prompts[r::self.world])) for r in range(self.world)])  # prompt tokens
        started = time.perf_counter()
        local_cache = KVCache.allocate(self.cfg, len(own), max_len, self.device, self.dtype)
        logits = self._prefill(comm, on_rank, [prompts[b] for b in own.tolist()], local_cache)  # (B_own, V)
        steps: list[Tensor] = []
        next_tokens = torch.zeros(B, dtype=torch.long, device=self.device)  # (B,) right for the rows held here
        next_tokens[own] = logits.argmax(-1)
        if return_logits:
            steps.append(self._share_rows(logits.float(), own, B))
        cache = local_cache if self.mode == "standard" else self._share_cache(comm.at("prefill"), local_cache, own, B)
        prefill_s = time.perf_counter() - started

        on_rank = torch.tensor([len(prompts[r::self.world]) for r in range(self.world)])  # tokens start at home
        generated = [next_tokens]
        held = own  # requests whose token is on this rank (coherent: it moves with its experts)
        started = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if self.mode == "standard":
                logits = self._step(comm, "decode", on_rank, next_tokens[held][:, None], lengths[held], cache)
                next_tokens = next_tokens.clone()
                next_tokens[held] = logits.argmax(-1)
            else:  # every rank learns every request's token in the step's context sync
                held, on_rank, logits, next_tokens = self._coherent_step(comm, on_rank, next_tokens, held, lengths,
                                                                         cache)
            if return_logits:
                steps.append(self._share_rows(logits.float(), held, B))
            lengths = lengths + 1
            generated.append(next_tokens)
        decode_s = time.perf_counter() - started

        # Home ranks know their requests' tokens in both modes; one all-reduce hands every rank all of them.
        tokens = self._share_rows(torch.stack(generated, dim=1)[own], own, B).tolist()  # (B, new)
        all_stats = [stats]
        if dist.is_initialized():
            all_stats = [None] * self.world
            dist.all_gather_object(all_stats, stats)
        return Generation(tokens, stats.merged(all_stats), decode_s, prefill_s,
                          torch.stack(steps) if return_logits else None)

    # ------------------------------------------------------------------ phases

    def _prefill(self, comm: _Comm, on_rank: Tensor, prompts: list[list[int]], cache: KVCache) -> Tensor:
        """Standard-mode prefill of this rank's own requests (right-padded); last-position logits (B_own, V).

        ``on_rank`` (G,): the prompt tokens homed on each rank.
        """
        tokens, lengths = right_pad(prompts, self.device)  # (B_own, T), (B_own,)
        real = torch.arange(tokens.shape[1], device=self.device) < lengths[:, None]  # (B_own, T): pads not routed
        start = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        return self._step(comm, "prefill", on_rank, tokens, start, cache, real, last=lengths - 1)

    def _step(self, comm: _Comm, phase: str, on_rank: Tensor, tokens: Tensor, start: Tensor, cache: KVCache,
              real: Tensor | None = None, last: Tensor | None = None) -> Tensor:
        """Standard mode: every layer for tokens (n, T) of the requests homed here, at positions start + t.

        ``on_rank`` (G,): the tokens to route on each rank; ``real`` (n, T) marks this rank's (default all).
        Returns the logits (n, V) at index ``last``.
        """
        real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
        h = self.model.embed(tokens)  # (n, T, D)
        for layer, block in enumerate(self.model.layers):
            h = self._attention(block, h, start, cache.k[layer], cache.v[layer])
            h[real] += self._standard_moe(comm.at(phase, layer), block, layer, on_rank, block.ffn_norm(h[real]))
        last = torch.zeros(len(h), dtype=torch.long, device=self.device) if last is None else last
        return self.model.head(h[torch.arange(len(h), device=self.device), last])

    def _coherent_step(self, comm: _Comm, on_rank: Tensor, next_tokens: Tensor, held: Tensor, lengths: Tensor,
                       cache: KVCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One coherent decode step: tokens follow their experts; then one all-reduce shares the new K/V.

        ``on_rank`` (G,): the tokens on each rank. Returns the requests whose token ended on this rank,
        the tokens now on each rank (G,), their logits (n, V), and every request's next token (B,).
        """
        L, K, Dh = self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim
        B = len(lengths)
        # One all-reduce makes the step coherent: each request's row is filled by the one rank that ran it.
        width = L * 2 * K * Dh
        shared = torch.zeros(B, width + 1, device=self.device)  # (B, L*2*K*Dh + next token)
        h = self.model.embed(next_tokens[held][:, None])  # (n, 1, D)
        for layer, block in enumerate(self.model.layers):
            pos = lengths[held]  # (n,)
            k_rows, v_rows = cache.k[layer][held], cache.v[layer][held]  # gathered copies (n, K, S_max, Dh)
            h = self._attention(block, h, pos, k_rows, v_rows)
            rows = torch.arange(len(held), device=self.device)
            new_kv = torch.stack((k_rows[rows, :, pos], v_rows[rows, :, pos]), dim=1)  # (n, 2, K, Dh)
            shared[held, layer * 2 * K * Dh:(layer + 1) * 2 * K * Dh] = new_kv.flatten(1).float()
            held, on_rank, h = self._coherent_moe(comm.at("decode", layer), block, layer, on_rank, held, h[:, 0])
            h = h[:, None]  # (n, 1, D)
        logits = self.model.head(h[:, 0])  # (n, V)
        shared[held, width] = logits.argmax(-1).float()
        comm.at("decode").sync(shared)
        new_kv = shared[:, :width].view(B, L, 2, K, Dh).to(cache.k.dtype)
        rows = torch.arange(B, device=self.device)
        cache.k[:, rows, :, lengths] = new_kv[:, :, 0]  # (B, L, K, Dh): each request at its own position
        cache.v[:, rows, :, lengths] = new_kv[:, :, 1]
        return held, on_rank, logits, shared[:, width].long()

    # ------------------------------------------------------------------ layers

    def _attention(self, block: Block, h: Tensor, start: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """h (n, T, D) plus its attention at positions start + t; writes the tokens' K/V into the caches (n, K, S, Dh).

        The caches are whichever request rows this rank runs.
        """
        n, T, _ = h.shape
        if n == 0:
            return h
        pos = start[:, None] + torch.arange(T, device=self.device)  # (n, T)
        mask = causal_mask(pos, int(pos.max()) + 1, self.cfg.sliding_window)  # (n, 1, T, S)
        return block.attend(h, *self.model.rope(pos), mask, (k_cache, v_cache), pos)

    def _route(self, block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
        return route_top_k(block.feed_forward.gate(x), self.cfg.experts_per_token, self.cfg.norm_topk_prob)

    def _experts(self, block: Block, layer: int, x: Tensor, experts: Tensor) -> Tensor:
        """This rank's experts on rows x (m, D), row r through global expert ``experts[r]``."""
        ffn = block.feed_forward
        return expert_outputs(x, self.local_index[layer][experts], ffn.w13, ffn.w2)

    def _standard_moe(self, comm: _Comm, block: Block, layer: int, on_rank: Tensor, x: Tensor) -> Tensor:
        """Dispatch each token's k copies to its experts' ranks, combine the outputs at home: (N, D).

        ``on_rank`` (G,): the tokens each rank routes.
        """
        k, D = self.cfg.experts_per_token, self.cfg.dim
        weights, experts = self._route(block, x)  # (N, k) each
        payload = torch.cat((x.repeat_interleave(k, 0).float(), experts.flatten()[:, None].float()), 1)
        slots = self._slots(layer, on_rank, k)
        received, route = comm.dispatch(payload, self.gpu_of[layer][experts.flatten()], slots)  # (m, D+1)
        y = self._experts(block, layer, received[:, :D].to(x.dtype), received[:, D].long())  # (m, D)
        y = comm.reply(y.float(), route).to(x.dtype).view(-1, k, D)  # (N, k, D)
        return (y * weights.to(x.dtype)[..., None]).sum(dim=1)

    def _coherent_moe(self, comm: _Comm, block: Block, layer: int, on_rank: Tensor, held: Tensor, h: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Send each token (with its residual h (n, D)) to its experts' ranks and leave it there.

        ``on_rank`` (G,): the tokens on each rank. Returns the requests now on this rank, the tokens now on
        each rank (G,), and this rank's hidden states (n', D), ordered by request.
        """
        k, D = self.cfg.experts_per_token, self.cfg.dim
        weights, experts = self._route(block, block.ffn_norm(h))  # (n, k) each
        dest = self.gpu_of[layer][experts]  # (n, k)
        primary_rank = dest[:, :1].expand(-1, k)  # (n, k) where the token continues: its top-1 expert's rank
        meta = torch.stack((held[:, None].expand(-1, k), experts, primary_rank,
                            torch.arange(k, device=self.device).expand(len(held), k)), dim=-1).float()  # (n, k, 4)
        payload = torch.cat((h[:, None].expand(-1, k, D).float(), weights[..., None].float(), meta), -1)
        # Told to every rank: the tokens that continue on each rank (and with k > 1 the secondary copies each gets).
        tally = [torch.bincount(dest[:, 0], minlength=self.world)]
        if k > 1:
            tally.append(torch.bincount(dest[:, 1:].flatten(), minlength=self.world))
        received, route = comm.dispatch(payload.flatten(0, 1), dest.flatten(), self._slots(layer, on_rank, k),
                                        torch.cat(tally))  # (m, D + 5)
        on_rank = route.notes[:, :self.world].sum(0).cpu()  # (G,) where the tokens are now
        h_in, weight = received[:, :D].to(h.dtype), received[:, D:D + 1].to(h.dtype)
        request, expert, to_rank, choice = received[:, D + 1:].long().unbind(1)
        y = self._experts(block, layer, block.ffn_norm(h_in), expert) * weight  # (m, D)

        primary = choice == 0
        now_held = request[primary]
        order = now_held.argsort()
        now_held, out = now_held[order], (h_in[primary] + y[primary])[order]  # (n', D)
        if k > 1:  # the secondary experts' outputs join their token on its primary rank
            secondary = ~primary
            extra = torch.cat((y[secondary].float(), request[secondary, None].float()), 1)  # (s, D + 1)
            # Rank q sends rank p the secondary outputs of tokens continuing on p: no more than q received, and
            # no more than min(k - 1, experts on q) per token on p.
            received_secondary = route.notes[:, self.world:].sum(0).cpu()  # (G,)
            slots = torch.minimum(received_secondary[:, None], self._slots(layer, on_rank, k - 1).T)
            arrived, _ = comm.dispatch(extra, to_rank[secondary], slots)
            out.index_add_(0, torch.searchsorted(now_held, arrived[:, D].long()), arrived[:, :D].to(out.dtype))
        return now_held, on_rank, out

    # ------------------------------------------------------------------ helpers

    def _slots(self, layer: int, tokens: Tensor, copies: int) -> Tensor:
        """(G, G) limit on the rows rank s can send rank p at ``layer``: the ``tokens[s]`` it holds x the copies
        of one token that can land on p (a token's experts are distinct, so no more than p holds)."""
        return tokens[:, None] * self.experts_on[layer].clamp(max=copies)[None, :]

    def _share_rows(self, values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
        """Every rank's rows of a (n_rows, ...) tensor, each filled by the one rank holding it (all-reduce)."""
        full = values.new_zeros((n_rows, *values.shape[1:]))
        full[rows] = values
        if dist.is_initialized():
            dist.all_reduce(full)
        return full

    def _share_cache(self, comm: _Comm, local: KVCache, own: Tensor, n_requests: int) -> KVCache:
        """Coherent mode: the prompts' KV cache of every request on every rank (one all-reduce)."""
        L, _, K, S, Dh = local.k.shape
        full = torch.zeros(2, L, n_requests, K, S, Dh, device=self.device, dtype=local.k.dtype)
        full[0][:, own], full[1][:, own] = local.k, local.v
        comm.sync(full)
        return KVCache(full[0], full[1])

    def _check_requests(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise EffdlError("every request needs a non-empty prompt")
        if max_new_tokens < 1:
            raise EffdlError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.cfg.max_seq_len:
            raise EffdlError(f"prompt + max_new_tokens reach {longest} tokens, past the model's max_seq_len "
                             f"{self.cfg.max_seq_len}")
        bad = [t for p in prompts for t in p if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EffdlError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")


def _check_placement(placement: Placement, cfg, world: int) -> None:
    if (placement.n_layers, placement.n_experts) != (cfg.n_layers, cfg.n_experts):
        raise EffdlError(f"the placement is for {placement.n_layers} layers x {placement.n_experts} experts but the "
                         f"model has {cfg.n_layers} x {cfg.n_experts}")
    if placement.model and placement.model != model_fingerprint(cfg):
        raise EffdlError(f"the placement was solved for another model ({placement.model}); this one is "
                         f"{model_fingerprint(cfg)}")
    if placement.n_gpus != world:
        raise EffdlError(f"the placement is for {placement.n_gpus} ranks but the world size is {world}")
