"""Token sampling and single-request generation with a KV cache.

``sample_next`` is the one sampling rule (greedy / temperature / top-k /
top-p) that every decoder in effdl uses; ``generate`` is the simplest loop
around the model: one prefill, then one token per forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effdl.core.transformer import KVCache, Transformer
from effdl.errors import EffdlError


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V).

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by
    the temperature, restricted to the ``top_k`` largest (0 = all) and to the
    smallest set whose probability reaches ``top_p``, then sampled. Cost: O(B V log V)
    when top-p is active (a sort), O(B V) otherwise.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p  # (B, V)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Reject sampling settings that have no meaning, with a message naming the value."""
    if temperature < 0:
        raise EffdlError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise EffdlError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise EffdlError(f"top_k must be >= 0 (0 = no limit), got {top_k}")


def right_pad(rows: list[list[int]], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths -> (B, T) long tensor right-padded with 0 to the longest, and lengths (B,).

    Causal attention never lets a row's real tokens see the padding after them, so a batched prefill
    of right-padded rows reads each row's logits at ``lengths - 1``. Cost: O(B T).
    """
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)  # (B,)
    tokens = torch.zeros(len(rows), int(lengths.max()) if rows else 0, dtype=torch.long, device=device)  # (B, T)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens, lengths


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_ids: set[int] | None = None) -> list[int]:
    """Generate up to ``max_new_tokens`` after ``prompt``; returns the new tokens only.

    Stops early at the model's eos id (or any id in ``stop_ids``), which is
    included in the output.
    """
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_p, top_k, seed, stop_ids)[0]


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop_ids: set[int] | None = None) -> list[list[int]]:
    """``generate`` for several prompts of any lengths at once, one forward per step for all rows.

    Prompts are right-padded for the prefill; each row then decodes at its own
    position in the shared KV cache. A row that stops keeps its output; the
    loop ends when every row has stopped or ``max_new_tokens`` is reached.
    """
    cfg = model.config
    check_sampling(temperature, top_p, top_k)
    if not prompts or any(not p for p in prompts):
        raise EffdlError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise EffdlError(f"max_new_tokens must be positive, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise EffdlError(
            f"prompt has {longest} tokens but the model's max_seq_len is {cfg.max_seq_len}; "
            "shorten the prompt so at least one token can be generated"
        )
    stop = set(stop_ids or ()) | ({cfg.eos_id} if cfg.eos_id is not None else set())
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - longest)
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    B = len(prompts)
    cache = KVCache.allocate(cfg, B, longest + max_new_tokens, device=device, dtype=param.dtype)
    padded, lengths = right_pad(prompts, device)  # (B, T), (B,)
    logits = model(padded, positions=torch.zeros_like(lengths), cache=cache, logit_index=lengths - 1)  # (B, V)

    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_p, top_k, generator)  # (B,)
        for row, token in enumerate(next_ids.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token in stop
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(next_ids[:, None], positions=lengths + step, cache=cache)[:, -1]  # (B, V)
    return outputs
