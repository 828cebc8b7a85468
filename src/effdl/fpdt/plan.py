"""An analytic memory model: the longest sequence each training method fits on a given device.

Counts, per token, the activations a training step keeps (e = bytes per
activation element; D model dim, H / K heads, Dh head dim, F FFN dim, V vocab,
L layers, s = S / P tokens per rank, c local chunk):

    one layer, plain autograd    a = e (6D + (3H + 2K) Dh + 4F)
        two RMSNorms keep ~3D each; attention keeps q, k, v, its output and
        the output projection's input; SwiGLU keeps w13's output (2F), silu's
        output and the product (F each)
    LM head                      h = e (3D + 3V)          (norm, logits, log-softmax)

    plain          L s a + s h
    checkpointing  L s e D + s a + s h        (layer inputs + one layer recomputed)
    Ulysses (P)    L s (a + 2 e D) + s h     (plain on S / P tokens + all-to-all buffers)
    FPDT (P)       k s e D + c a + 3 l e V + r
                   k = 2.25 (P = 1), 3.25 (P > 1): a layer's hidden states and
                   their gradient, plus allocator slack (and with P > 1 the
                   all-to-all and gloo buffers); one chunk's layer activations
                   and one LM-head chunk of l = default_loss_chunk(c) tokens;
                   r = 8 MiB of spill-thread and kernel workspace (16 MiB with
                   P > 1); everything else offloaded

Model state for a GPU plan is ZeRO-3 sharded over the GPUs: 16 bytes per
parameter (bf16 weights and gradients, fp32 master weights and two Adam
moments). The coefficients were checked against the peak-RSS measurements of
``benchmarks/fpdt_maxlen.py --part plan-check`` (see the README for the agreement);
FPDT's hidden-copy factors and workspace were fitted to those measurements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effdl.core.config import ModelConfig
from effdl.errors import EffdlError
from effdl.fpdt.pipeline import default_loss_chunk, spill_bytes

PLAN_METHODS = ("plain", "checkpoint", "ulysses", "fpdt")
STATE_BYTES_PER_PARAM = 16
FPDT_WORKSPACE_BYTES = 8 * 2**20  # spill thread and kernel workspace
FPDT_GROUP_BYTES = 8 * 2**20  # gloo / all-to-all buffers with sp > 1
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'40GiB', '512MiB', '80GB', '1.5g' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise EffdlError(f"cannot read {text!r} as a size; write e.g. 40GiB, 512MiB or 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def layer_bytes_per_token(cfg: ModelConfig, elem: int) -> int:
    """a: what plain autograd keeps per token for one transformer layer."""
    return elem * (6 * cfg.dim + (3 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 4 * cfg.ffn_dim)


def activation_bytes(method: str, cfg: ModelConfig, seq_len: int, sp: int = 1, chunk: int = 4096,
                     elem: int = 4, batch: int = 1) -> int:
    """Predicted peak activation memory per rank of one training step. Cost: O(1)."""
    a, e, L = layer_bytes_per_token(cfg, elem), elem, cfg.n_layers
    s = batch * seq_len // sp
    head = e * (3 * cfg.dim + 3 * cfg.vocab_size)
    if method == "plain":
        return L * s * a + s * head
    if method == "checkpoint":
        return L * s * e * cfg.dim + s * a + s * head
    if method == "ulysses":
        return L * s * (a + 2 * e * cfg.dim) + s * head
    if method == "fpdt":
        c = batch * min(chunk, seq_len) // sp
        hidden_copies = 2.25 if sp == 1 else 3.25
        workspace = FPDT_WORKSPACE_BYTES + (FPDT_GROUP_BYTES if sp > 1 else 0)
        return int(hidden_copies * s * e * cfg.dim) + c * a + 3 * default_loss_chunk(c) * e * cfg.vocab_size + \
            workspace
    raise EffdlError(f"unknown method {method!r}; choose one of {', '.join(PLAN_METHODS)}")


def longest_sequence(method: str, cfg: ModelConfig, budget: int, sp: int = 1, chunk: int = 4096, elem: int = 4,
                     step: int = 1024, host_budget: int | None = None, limit: int = 1 << 34) -> int:
    """The longest multiple of ``step`` tokens whose predicted activations fit ``budget`` bytes (0 if none).

    For FPDT, ``host_budget`` also bounds what is offloaded per rank (pinned host memory or spill disk).
    """
    def fits(tokens: int) -> bool:
        if activation_bytes(method, cfg, tokens, sp, chunk, elem) > budget:
            return False
        return method != "fpdt" or host_budget is None or spill_bytes(cfg, 1, tokens, sp, elem) <= host_budget

    lo, hi = 0, limit // step
    while lo < hi:  # both bounds grow with the length, so bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step


@dataclass
class PlanRow:
    method: str
    ranks: int
    max_tokens: int
    activation_bytes: int
    offloaded_bytes: int  # per GPU, FPDT only


def plan(cfg: ModelConfig, gpus: int, gpu_mem: int, chunk: int = 65536, elem: int = 2, host_mem: int = 2**40,
         gpus_per_node: int = 8, reserve_fraction: float = 0.1) -> tuple[int, list[PlanRow]]:
    """Longest trainable sequence per method on ``gpus`` devices of ``gpu_mem`` bytes.

    Returns (activation budget per GPU, rows). Plain and checkpointing run
    one sequence per GPU (data parallel); Ulysses and FPDT shard it over all
    ``gpus``. ``reserve_fraction`` of GPU memory is kept for the allocator
    and the framework; FPDT's offloaded chunks share ``host_mem`` bytes per
    node among its GPUs.
    """
    if gpus < 1:
        raise EffdlError(f"gpus must be >= 1, got {gpus}")
    state = STATE_BYTES_PER_PARAM * cfg.num_params() // gpus
    budget = int(gpu_mem * (1 - reserve_fraction)) - state
    if budget <= 0:
        raise EffdlError(f"the model state alone needs {state / 2**30:.1f} GiB per GPU (ZeRO-3 over {gpus}), "
                         f"more than {gpu_mem * (1 - reserve_fraction) / 2**30:.1f} GiB usable")
    host_budget = host_mem // min(gpus, gpus_per_node)
    rows = []
    for method in PLAN_METHODS:
        sp = gpus if method in ("ulysses", "fpdt") else 1
        if sp > 1 and (cfg.n_kv_heads % sp or cfg.n_heads % sp):
            sp = 1  # Ulysses needs heads divisible by the ranks; fall back to what the heads allow
        step = chunk if method == "fpdt" else 256
        tokens = longest_sequence(method, cfg, budget, sp, chunk, elem, step, host_budget)
        offloaded = spill_bytes(cfg, 1, tokens, sp, elem) if method == "fpdt" else 0
        rows.append(PlanRow(method, sp, tokens, activation_bytes(method, cfg, tokens, sp, chunk, elem), offloaded))
    return budget, rows
