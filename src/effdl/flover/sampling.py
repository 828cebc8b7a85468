"""What the engine does with one request's logits after a forward: pure functions, no engine state.

``process_logits`` applies the logits processors (``logit_bias``,
``min_tokens``, then the repetition, frequency and presence penalties, in
vLLM's order), sampling picks the next token, ``logprob_entry`` reports its
log-probability and the top alternatives, ``stop_reason`` applies the token
rules (stop ids, EOS, ``max_tokens``), ``decode_incrementally`` turns the
new tokens into text, and ``find_stop`` / ``held_back`` apply the stop
strings to it. ``V`` is the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from effdl.core.generate import sample_next
from effdl.core.tokenizer import Tokenizer
from effdl.flover.request import Decoded, SamplingParams


def stop_token_ids(params: SamplingParams, eos_id: int | None) -> set[int]:
    """The token ids that end the output: ``params.stop_token_ids``, plus EOS unless ``ignore_eos``."""
    return set(params.stop_token_ids) | ({eos_id} if eos_id is not None and not params.ignore_eos else set())


def apply_logit_bias(logits: Tensor, bias: Sequence[tuple[int, float]]) -> Tensor:
    """logits (V,) with ``bias`` (token id, value) pairs added: OpenAI's ``logit_bias``. O(V) copy + O(len(bias))."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], device=logits.device)  # (K,)
    values = torch.tensor([b for _, b in bias], device=logits.device, dtype=logits.dtype)  # (K,)
    return logits.index_add(0, ids, values)


def mask_tokens(logits: Tensor, tokens: set[int]) -> Tensor:
    """logits (V,) with ``tokens`` set to -inf, so that no sampler can pick them (``min_tokens``). O(V)."""
    if not tokens:
        return logits
    return logits.index_fill(0, torch.tensor(sorted(tokens), device=logits.device), float("-inf"))


def apply_penalties(logits: Tensor, prompt: Sequence[int], output: Sequence[int], presence: float = 0.0,
                    frequency: float = 0.0, repetition: float = 1.0) -> Tensor:
    """logits (V,) after vLLM's repetition penalty, then OpenAI's frequency and presence penalties.

    With c[t] the count of token t in ``output``:
    a token seen in ``prompt`` or ``output`` has a positive logit divided by
    ``repetition`` and a negative one multiplied by it (so > 1 always makes it
    less likely); then ``logit[t] -= frequency * c[t] + presence * (c[t] > 0)``.
    O(V + len(prompt) + len(output)).
    """
    counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=logits.device),
                            minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)  # (V,)
    if repetition != 1.0:
        seen = counts > 0  # (V,)
        if prompt:
            seen = seen.index_fill(0, torch.tensor(list(prompt), device=logits.device), True)
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    if frequency or presence:
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def process_logits(logits: Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int],
                   eos_id: int | None) -> Tensor:
    """One request's logits (V,) as its sampler sees them, ``output`` being the tokens it has so far.

    vLLM's order: ``logit_bias`` is added, stop tokens (EOS unless
    ``ignore_eos``, and ``stop_token_ids``) are masked while fewer than
    ``min_tokens`` are out, then the penalties apply. Returns ``logits``
    itself when no processor is on. O(V + len(prompt) + len(output)).
    """
    if not params.processes_logits:
        return logits
    logits = apply_logit_bias(logits, params.logit_bias)
    if len(output) < params.min_tokens:
        logits = mask_tokens(logits, stop_token_ids(params, eos_id))
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        logits = apply_penalties(logits, prompt, output, params.presence_penalty, params.frequency_penalty,
                                 params.repetition_penalty)
    return logits


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
    if token in stop_token_ids(params, eos_id):
        return "stop"
    return "length" if num_output >= params.max_tokens else None


def decode_incrementally(tokenizer: Tokenizer, tokens: Sequence[int], state: Decoded, final: bool = False
                         ) -> Decoded:
    """``state`` with the text of ``tokens[state.read:]`` appended.

    Only the tokens since ``state.prefix`` are decoded, the few before ``read`` as context so that a merge or a
    leading space at the window's edge decodes as it does in the whole, as vLLM does: O(window) per step, where
    decoding the whole output again would be O(output) per step and O(output^2) per request. A window that
    decodes to an unfinished character (trailing U+FFFD) waits for the next token, unless ``final``.
    """
    if len(tokens) <= state.read:
        return state
    context = tokenizer.decode(list(tokens[state.prefix:state.read]))
    window = tokenizer.decode(list(tokens[state.prefix:]))
    if not final and (len(window) <= len(context) or window.endswith("\ufffd")):
        return state
    return Decoded(state.text + window[len(context):], state.read, len(tokens))


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Where the earliest of the ``stop`` strings starts in ``text``; -1 when none occurs.

    One ``str.find`` per stop string: O(len(text) * len(stop)) at worst.
    """
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of ``text`` to hold back from the client for now.

    An unfinished multi-byte character (trailing U+FFFD from the byte decoder)
    is held back whole, and so is the longest tail before it that is a proper
    prefix of some stop string, since the next tokens may complete it into a
    stop (a stop can span any number of tokens). O(sum of len(s)^2) over the
    stop strings.
    """
    partial = len(text) - len(text.rstrip("\ufffd"))
    text = text[:len(text) - partial]
    return partial + max((j for s in stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
