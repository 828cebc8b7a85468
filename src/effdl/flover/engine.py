"""The engine loop: schedule, execute, then sample and stop each request.

``Engine.step()`` is one iteration of the whole system; everything policy-
specific lives in the scheduler, everything tensor-specific in the runner,
and the sampling and stop rules in ``sampling`` (pure functions).
A failure confined to one request (its sampling, its detokenisation) fails
that request only; a failed forward fails the requests it carried. Either
way the engine goes on serving the rest, unless the runner itself is lost
(``RunnerFailure``: a tensor-parallel rank failed), which ends the engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.tokenizer import Tokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover.prefix_cache import BLOCK_SIZE, PrefixIndex
from effdl.flover.request import Request, RequestOutput, SamplingParams
from effdl.flover.runner import ModelRunner
from effdl.flover.sampling import (
    decode_incrementally,
    find_stop,
    held_back,
    logprob_entry,
    process_logits,
    sample_token,
    stop_reason,
)
from effdl.flover.scheduler import Scheduler, StepPlan

DEFAULT_MAX_LEN = 4096


def default_max_len(config: ModelConfig) -> int:
    """Tokens per KV slot when none is asked for: the model's context, at most ``DEFAULT_MAX_LEN``.

    Long-context checkpoints (128K for Llama 3) would otherwise make a default
    pool of every slot at full length.
    """
    return min(config.max_seq_len, DEFAULT_MAX_LEN)


def prefix_cache_rows(max_slots: int, max_len: int, prefix_caching: bool = True, prefix_block_size: int = BLOCK_SIZE,
                      prefix_cache_blocks: int | None = None) -> int:
    """Blocks in the prefix cache: ``prefix_cache_blocks``, else half the KV pool's tokens; 0 when caching is off.

    Half the pool: the cache then costs half the pool's memory again, and
    holds, say, a shared prompt of up to max_slots * max_len / 2 tokens. Cost: O(1).
    """
    if not prefix_caching:
        return 0
    if prefix_cache_blocks is None:
        return max(1, max_slots * max_len // (2 * prefix_block_size))
    return prefix_cache_blocks


class RunnerFailure(RuntimeError):
    """The runner can execute no further step (a tensor-parallel rank failed and the group is gone)."""


@dataclass
class StepOutcome:
    """What one ``Engine.step()`` did."""

    ran: bool  # a plan executed; False when nothing could run yet (a static batch still filling up)
    outputs: list[RequestOutput] = field(default_factory=list)  # one per request that sampled or failed
    due: float | None = None  # when nothing ran: the monotonic time the waiting batch is due, if one is


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_slots: int = 8,
                 max_len: int | None = None, policy: str = "fused", shuffle: bool = True, prefill_chunk: int = 2048,
                 batch_window_s: float = 0.0, max_queue: int = 1024, runner: ModelRunner | None = None,
                 prefix_caching: bool = True, prefix_block_size: int = BLOCK_SIZE,
                 prefix_cache_blocks: int | None = None):
        """``prefix_caching``: reuse the K/V of prompt prefixes seen before, in blocks of ``prefix_block_size``
        tokens, keeping ``prefix_cache_blocks`` of them (default: see ``prefix_cache_rows``). A ``runner`` given
        must hold a block store of that size (``tp_engine`` builds its runners so)."""
        self.config, self.tokenizer = model.config, tokenizer
        self.max_len = max_len or default_max_len(model.config)
        if self.max_len > model.config.max_seq_len:
            raise EffdlError(f"max_len {self.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        rows = prefix_cache_rows(max_slots, self.max_len, prefix_caching, prefix_block_size, prefix_cache_blocks)
        prefix = PrefixIndex(rows, prefix_block_size) if prefix_caching else None
        self.scheduler = Scheduler(max_slots, policy, shuffle, prefill_chunk, batch_window_s, max_queue, prefix)
        self.runner = runner or ModelRunner(model, max_slots, self.max_len, prefix_rows=rows,
                                            block_size=prefix_block_size)
        store = self.runner.store
        held = (store.rows, store.block_size) if store is not None else (0, prefix_block_size)
        if held != (rows, prefix_block_size):
            raise EffdlError(f"the runner's prefix-cache store does not match the engine's {rows} blocks of "
                             f"{prefix_block_size} tokens")
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # prefix_cache_*: tokens, as vLLM's counters count them: the prompt tokens of every admitted request
        # (none with caching off), and those of them served from the prefix cache.
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_rows": 0, "window_rows": 0, "moves": 0,
                      "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    # -- requests in and out ------------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ``EffdlError`` for a prompt that cannot be served."""
        request = self.make_request(prompt, params, request_id)
        self.enqueue(request)
        return request.id

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Validate and tokenise a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        tokens = self._encode(prompt)
        if bad := [t for t, _ in params.logit_bias if t >= self.config.vocab_size]:
            raise EffdlError(f"logit_bias names token ids outside the vocabulary [0, {self.config.vocab_size}): "
                             f"{bad[:5]}")
        if len(tokens) + params.max_tokens > self.max_len:
            raise EffdlError(f"the prompt has {len(tokens)} tokens and max_tokens is {params.max_tokens}: "
                             f"together more than this engine's max_len of {self.max_len} tokens")
        request = Request(request_id or f"req-{next(self._ids)}", tokens, params)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return request

    def enqueue(self, request: Request) -> None:
        """Queue a request made by ``make_request``; raises ``EffdlError`` (``QueueFull`` when full)."""
        if request.id in self.requests:
            raise EffdlError(f"request id {request.id!r} is already in use")
        self.scheduler.add(request)
        self.requests[request.id] = request

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EffdlError("this engine has no tokenizer: give the prompt as token ids")
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = list(prompt)
            bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise EffdlError(f"token ids must be integers in [0, {self.config.vocab_size}); got {bad[:5]}")
        if not tokens:
            raise EffdlError("the prompt is empty")
        return tokens

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its slot; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None and not request.finished:
            self.scheduler.finish(request, "abort")

    def abort_all(self) -> None:
        """Abort every request the engine holds."""
        for request_id in list(self.requests):
            self.abort(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running, so that ``step()`` has something to do."""
        return self.scheduler.has_work()

    def check_room(self, pending: int = 0) -> None:
        """Raise ``QueueFull`` if the waiting queue, with ``pending`` requests on their way to it, is full.

        The one bound on the queue: ``enqueue`` applies it, and a front that
        holds requests before enqueueing them (``AsyncEngine``) asks it first.
        """
        self.scheduler.check_room(pending)

    def gauges(self) -> dict[str, float]:
        """Requests waiting for a slot, requests holding one, free slots, and the KV pool's use.

        ``kv_cache_usage``: the share of the pool's token positions that live requests fill (their prompt and
        output so far), as vLLM's ``kv_cache_usage_perc`` counts the blocks its requests hold (1 = full).
        """
        running = [r for r in self.scheduler.running.values() if not r.finished]
        used = sum(len(r.prompt) + len(r.output) for r in running)
        return {"queue_length": self.scheduler.num_waiting, "live_slots": len(running),
                "free_slots": self.scheduler.slots.n_free,
                "kv_cache_usage": used / (self.scheduler.slots.n_slots * self.max_len)}

    # -- one iteration ------------------------------------------------------------------------------------

    def step(self) -> StepOutcome:
        """Run one iteration: what each request carried by it produced, or when to try again if nothing ran."""
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return StepOutcome(ran=False, due=self.scheduler.next_admission())
        self._count(plan)
        return StepOutcome(ran=True, outputs=self._execute(plan))

    def _execute(self, plan: StepPlan) -> list[RequestOutput]:
        try:
            ids, logits = self.runner.execute(plan)
        except RunnerFailure:
            raise  # every later step would fail the same way
        except Exception as error:  # a bad batch must not take the engine down
            self.scheduler.forget(plan)
            return [self._fail(self.requests[rid], f"forward failed: {error!r}") for rid in
                    dict.fromkeys(plan.request_ids) if rid in self.requests]
        outputs = []
        argmax = logits.argmax(-1).tolist() if ids else []  # every greedy row's token in one call, not one per row
        for row, rid in enumerate(ids):
            request = self.requests.get(rid)
            if request is None or request.finished:
                continue  # aborted while the step ran
            try:
                outputs.append(self._advance(request, logits[row], argmax[row]))
            except Exception as error:  # fail this request only
                outputs.append(self._fail(request, f"{type(error).__name__}: {error}"))
        return outputs

    def _count(self, plan: StepPlan) -> None:
        self.stats["steps"] += 1
        self.stats["moves"] += len(plan.moves)
        self.stats["prefill_tokens"] += sum(len(c.tokens) for c in plan.prefill)
        self.stats["prefix_cache_queries"] = self.scheduler.prefix_queries  # counted where requests are admitted
        self.stats["prefix_cache_hits"] = self.scheduler.prefix_hits
        if plan.decode is not None:
            self.stats["decode_rows"] += len(plan.decode.rows)
            self.stats["window_rows"] += plan.decode.hi - plan.decode.lo

    def _advance(self, request: Request, logits: Tensor, argmax: int) -> RequestOutput:
        """Sample ``request``'s next token from its logits (V,) (``argmax`` of them: the greedy pick when nothing
        processes them), then apply its stop rules.

        Logprobs are of the model's own distribution (``logits`` before the
        penalties and biases), as vLLM reports them by default.
        """
        p = request.params
        if p.temperature == 0.0 and not p.processes_logits:
            token = argmax
        else:
            processed = process_logits(logits, p, request.prompt, request.output, self.config.eos_id)
            token = sample_token(processed, p, request.generator)
        request.output.append(token)
        new_logprobs = [logprob_entry(logits, token, p.logprobs)] if p.logprobs is not None else []
        reason = stop_reason(token, len(request.output), p, self.config.eos_id)
        new_text, reason = self._detokenize(request, reason)
        if reason is not None:
            self.scheduler.finish(request, reason)
            self.requests.pop(request.id, None)
        return RequestOutput(request.id, [token], new_text, reason is not None, request.finish_reason,
                             new_logprobs=new_logprobs, num_prompt_tokens=len(request.prompt),
                             num_output_tokens=len(request.output))

    def _detokenize(self, request: Request, reason: str | None) -> tuple[str, str | None]:
        """The text new since the last step, and ``reason`` ("stop" once a stop string appears).

        A stop token is not shown; text from a stop string on is cut; a tail
        that may still grow into a stop string (or a character) is held back.
        """
        if self.tokenizer is None:
            return "", reason
        p, shown = request.params, request.output[:-1] if reason == "stop" else request.output
        searched = max(0, len(request.decoded.text) - max(map(len, p.stop), default=0) + 1)
        request.decoded = decode_incrementally(self.tokenizer, shown, request.decoded, final=reason is not None)
        text = request.decoded.text
        if (hit := find_stop(text[searched:], p.stop)) >= 0:  # a new stop ends in the new text
            end, reason = searched + hit, "stop"
        else:
            end = len(text) if reason is not None else len(text) - held_back(text, p.stop)
        new_text = text[len(request.text):end]
        request.text += new_text
        return new_text, reason

    def _fail(self, request: Request, message: str) -> RequestOutput:
        request.error = message
        request.finish_reason = "error"
        self.scheduler.finish(request, "error")
        self.requests.pop(request.id, None)
        return RequestOutput(request.id, [], "", True, "error", error=message, num_prompt_tokens=len(request.prompt),
                             num_output_tokens=len(request.output))

    # -- offline use --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                 ) -> list[list[int]]:
        """Run ``prompts`` to completion together; returns each one's output token ids."""
        ids = [self.add_request(p, params) for p in prompts]
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step().outputs:
                if out.error:
                    raise EffdlError(f"request {out.id} failed: {out.error}")
                outputs[out.id] += out.new_token_ids
        return [outputs[rid] for rid in ids]
