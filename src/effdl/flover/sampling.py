"""What the engine does with one request's logits after a forward: pure functions, no engine state.

Sampling picks the next token, ``logprob_entry`` reports its log-probability
and the top alternatives, ``stop_reason`` applies the token rules (stop ids,
EOS, ``max_tokens``), and ``find_stop`` / ``held_back`` apply the stop
strings to the detokenised text. ``V`` is the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from effdl.core.generate import sample_next
from effdl.flover.request import SamplingParams


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """The next token from one request's logits (V,) under ``params``' temperature, top-p and top-k.

    ``sample_next`` on a batch of one: O(V) greedy or plain sampling, O(V log V)
    when top-p sorts. Seeded requests draw from their own ``generator``, so
    their tokens do not depend on what else is in the batch.
    """
    return int(sample_next(logits[None], params.temperature, params.top_p, params.top_k, generator)[0])


def logprob_entry(logits: Tensor, token: int, top_n: int) -> dict[int, float]:
    """log p(token) and the ``top_n`` most likely tokens' log-probabilities, from logits (V,).

    The log-softmax is taken in fp32, before temperature or top-p/top-k (the
    model's own distribution, as vLLM reports it). O(V) for the log-softmax,
    plus O(V log top_n) for the top-n. ``token`` is always in the result.
    """
    logp = logits.float().log_softmax(-1)  # (V,)
    entry = {token: float(logp[token])}
    if top_n:
        top = logp.topk(top_n)
        entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return entry


def stop_reason(token: int, num_output: int, params: SamplingParams, eos_id: int | None) -> str | None:
    """Why the output ends at ``token`` (its ``num_output``-th token): "stop", "length", or None to go on.

    "stop" when ``token`` is one of ``params.stop_token_ids`` or the EOS id
    (unless ``ignore_eos``); otherwise "length" once ``max_tokens`` are out.
    """
    stop_ids = set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())
    if token in stop_ids:
        return "stop"
    return "length" if num_output >= params.max_tokens else None


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Where the earliest of the ``stop`` strings starts in ``text``; -1 when none occurs.

    One ``str.find`` per stop string: O(len(text) * len(stop)) at worst.
    """
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` to hold back from the client for now.

    An unfinished multi-byte character (trailing U+FFFD from the byte decoder)
    is held back whole; otherwise the longest tail that is a proper prefix of
    some stop string, since the next tokens may complete it into a stop.
    O(sum of len(s)^2) over the stop strings.
    """
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((j for s in stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
