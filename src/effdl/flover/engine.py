"""The engine loop: schedule, execute, then sample and stop each request.

``Engine.step()`` is one iteration of the whole system; everything policy-
specific lives in the scheduler, everything tensor-specific in the runner.
A failure confined to one request (its sampling, its detokenisation) fails
that request only; a failed forward fails the requests it carried. Either
way the engine goes on serving the rest, unless the runner itself is lost
(``RunnerFailure``: a tensor-parallel rank failed), which ends the engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from effdl.core.config import ModelConfig
from effdl.core.generate import sample_next
from effdl.core.tokenizer import Tokenizer
from effdl.core.transformer import Transformer
from effdl.errors import EffdlError
from effdl.flover.request import Request, RequestOutput, SamplingParams
from effdl.flover.runner import ModelRunner
from effdl.flover.scheduler import Scheduler, StepPlan

DEFAULT_MAX_LEN = 4096


def default_max_len(config: ModelConfig) -> int:
    """Tokens per KV slot when none is asked for: the model's context, at most ``DEFAULT_MAX_LEN``.

    Long-context checkpoints (128K for Llama 3) would otherwise make a default
    pool of every slot at full length.
    """
    return min(config.max_seq_len, DEFAULT_MAX_LEN)


class RunnerFailure(RuntimeError):
    """The runner can execute no further step (a tensor-parallel rank failed and the group is gone)."""


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_slots: int = 8,
                 max_len: int | None = None, policy: str = "fused", shuffle: bool = True, prefill_chunk: int = 2048,
                 batch_window_s: float = 0.0, max_queue: int = 1024, runner: ModelRunner | None = None):
        self.config, self.tokenizer = model.config, tokenizer
        self.max_len = max_len or default_max_len(model.config)
        if self.max_len > model.config.max_seq_len:
            raise EffdlError(f"max_len {self.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        self.scheduler = Scheduler(max_slots, policy, shuffle, prefill_chunk, batch_window_s, max_queue)
        self.runner = runner or ModelRunner(model, max_slots, self.max_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_rows": 0, "window_rows": 0, "moves": 0}

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
        if len(tokens) + params.max_tokens > self.max_len:
            raise EffdlError(f"the prompt has {len(tokens)} tokens and max_tokens is {params.max_tokens}: "
                             f"together more than this engine's max_len of {self.max_len} tokens")
        request = Request(request_id or f"req-{next(self._ids)}", tokens, params)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return request

    def enqueue(self, request: Request) -> None:
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

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- one iteration ------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns what each request carried by it produced (tokens, text, the end)."""
        plan = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return []
        self._count(plan)
        try:
            ids, logits = self.runner.execute(plan)
        except RunnerFailure:
            raise  # every later step would fail the same way
        except Exception as error:  # a bad batch must not take the engine down
            return [self._fail(self.requests[rid], f"forward failed: {error!r}") for rid in
                    dict.fromkeys(plan.request_ids) if rid in self.requests]
        outputs = []
        for row, rid in enumerate(ids):
            request = self.requests.get(rid)
            if request is None or request.finished:
                continue  # aborted while the step ran
            try:
                outputs.append(self._advance(request, logits[row]))
            except Exception as error:  # fail this request only
                outputs.append(self._fail(request, f"{type(error).__name__}: {error}"))
        return outputs

    def _count(self, plan: StepPlan) -> None:
        self.stats["steps"] += 1
        self.stats["moves"] += len(plan.moves)
        self.stats["prefill_tokens"] += sum(len(c.tokens) for c in plan.prefill)
        if plan.decode is not None:
            self.stats["decode_rows"] += len(plan.decode.rows)
            self.stats["window_rows"] += plan.decode.hi - plan.decode.lo

    def _advance(self, request: Request, logits: Tensor) -> RequestOutput:
        """Sample ``request``'s next token from its logits (V,), then apply its stop rules."""
        p = request.params
        token = int(sample_next(logits[None], p.temperature, p.top_p, p.top_k, request.generator)[0])
        request.output.append(token)
        new_logprobs = []
        if p.logprobs is not None:
            logp = logits.log_softmax(-1)
            top = logp.topk(p.logprobs) if p.logprobs else None
            entry = {token: float(logp[token])}
            if top is not None:
                entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            new_logprobs = [entry]

        stop_ids = set(p.stop_token_ids) | ({self.config.eos_id} if self.config.eos_id is not None
                                            and not p.ignore_eos else set())
        reason = "stop" if token in stop_ids else "length" if len(request.output) >= p.max_tokens else None
        text = self._visible_text(request, strip_last=reason == "stop")
        if p.stop:
            hit = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop"
        if reason is None:
            text = text[:len(text) - self._held_back(text, p.stop)]
        new_text, request.text = text[len(request.text):], text
        if reason is not None:
            self.scheduler.finish(request, reason)
            self.requests.pop(request.id, None)
        return RequestOutput(request.id, [token], new_text, reason is not None, request.finish_reason,
                             new_logprobs=new_logprobs, num_prompt_tokens=len(request.prompt),
                             num_output_tokens=len(request.output))

    def _visible_text(self, request: Request, strip_last: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(request.output[:-1] if strip_last else request.output)

    @staticmethod
    def _held_back(text: str, stop: Sequence[str]) -> int:
        """How many trailing characters to hold back: a partial character, or the start of a stop string."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))  # an unfinished multi-byte character
        return max((j for s in stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)

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
            for out in self.step():
                if out.error:
                    raise EffdlError(f"request {out.id} failed: {out.error}")
                outputs[out.id] += out.new_token_ids
        return [outputs[rid] for rid in ids]
