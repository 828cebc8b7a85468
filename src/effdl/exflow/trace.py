"""Routing traces: which experts each token is sent to, at every MoE layer.

A trace is recorded by running a model over a token stream with forward
hooks on every layer's router (``feed_forward.gate``, see ``effdl.core.moe``),
so the model itself is not changed. It is what affinity, placement and the
traffic model consume, and it saves to a small ``.npz``.

Dimension legend: N traced tokens, L MoE layers, k experts per token, E experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.data import Split, corpus_tokens
from effdl.core.moe import route_top_k
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError


def model_fingerprint(cfg: ModelConfig) -> str:
    """What a trace or placement must agree on with the model it is used with."""
    return f"{cfg.model_type} layers={cfg.n_layers} experts={cfg.n_experts} top{cfg.experts_per_token} dim={cfg.dim}"


@dataclass
class RoutingTrace:
    experts: np.ndarray  # (N, L, k) int16: selected experts, highest gate weight first
    weights: np.ndarray  # (N, L, k) float32: their gate weights
    n_experts: int
    model: str = ""  # model_fingerprint of the traced model
    source: str = ""  # what text was traced, e.g. "stdlib val, 16,384 tokens"

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"n_experts": self.n_experts, "model": self.model, "source": self.source})
        np.savez_compressed(path, experts=self.experts, weights=self.weights, meta=np.array(meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise EffdlError(f"routing trace {path} does not exist")
        try:
            with np.load(path) as f:
                experts, weights, meta = f["experts"], f["weights"], json.loads(str(f["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise EffdlError(f"{path} is not a routing trace written by effdl ({e})") from None
        if experts.ndim != 3 or experts.shape != weights.shape:
            raise EffdlError(f"{path}: experts {experts.shape} and weights {weights.shape} must both be (N, L, k)")
        return cls(experts, weights, int(meta["n_experts"]), meta.get("model", ""), meta.get("source", ""))

    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ``EffdlError`` unless the trace's layer and expert counts fit ``cfg``."""
        self.check_fits(cfg.n_layers, cfg.n_experts, "the model")

    def check_fits(self, n_layers: int, n_experts: int, what: str) -> None:
        """Raise ``EffdlError`` unless the trace has ``n_layers`` x ``n_experts`` (``what`` names the other side)."""
        if (self.n_layers, self.n_experts) != (n_layers, n_experts):
            raise EffdlError(f"the trace has {self.n_layers} layers x {self.n_experts} experts but {what} has "
                             f"{n_layers} x {n_experts}")


@torch.no_grad()
def record_trace(model: Transformer, tokens: Tensor, seq_len: int = 256, batch_size: int = 8,
                 source: str = "") -> RoutingTrace:
    """Route every token of the 1-D stream ``tokens`` (cut into windows of ``seq_len``) and record the choices.

    The tail that does not fill a window is dropped. Cost: one forward pass
    over the stream.
    """
    cfg = model.config
    if not cfg.is_moe:
        raise EffdlError("routing traces need a mixture-of-experts model (n_experts > 0)")
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise EffdlError(f"{tokens.numel()} tokens do not fill one window of seq_len {seq_len}")
    windows = tokens[:n_windows * seq_len].long().view(n_windows, seq_len)  # (W, T)

    per_layer: list[list[tuple[Tensor, Tensor]]] = [[] for _ in model.layers]

    def hook(layer: int):
        def record(_module, _inputs, router_logits: Tensor) -> None:
            weights, experts = route_top_k(router_logits, cfg.experts_per_token, cfg.norm_topk_prob)  # (n, k)
            per_layer[layer].append((experts.to(torch.int16).cpu(), weights.cpu()))
        return record

    handles = [layer.feed_forward.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for batch in windows.split(batch_size):
            model(batch.to(device), logit_index=torch.zeros(len(batch), dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    experts = torch.stack([torch.cat([e for e, _ in layer]) for layer in per_layer], dim=1)  # (N, L, k)
    weights = torch.stack([torch.cat([w for _, w in layer]) for layer in per_layer], dim=1)  # (N, L, k)
    return RoutingTrace(experts.numpy(), weights.numpy(), cfg.n_experts, model_fingerprint(cfg), source)


def trace_corpus(model: Transformer, split: Split = "val", n_tokens: int = 16384, seq_len: int = 256,
                 batch_size: int = 8) -> RoutingTrace:
    """A trace of the first ``n_tokens`` of the embedded corpus split (held-in "train" or held-out "val")."""
    tokens = corpus_tokens(split)[:n_tokens]
    return record_trace(model, tokens, seq_len, batch_size, source=f"stdlib {split}, {n_tokens:,} tokens")
