"""Requests as plain data: what a client asked for, and where the engine is with it."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from effdl.core.generate import check_sampling
from effdl.errors import EffdlError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (the OpenAI/vLLM fields of the same names)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; N = the sampled token's logprob and the top N
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages tokens of the prompt or the output
    min_tokens: int = 0  # vLLM's: EOS and stop tokens are masked until this many tokens are out
    # token id -> bias added to its logit; a mapping is stored as sorted (id, bias) pairs so the params stay frozen
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise EffdlError(f"max_tokens must be positive, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise EffdlError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise EffdlError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise EffdlError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise EffdlError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        bias = tuple(sorted(dict(self.logit_bias).items()))
        for token, value in bias:
            if not isinstance(token, int) or token < 0:
                raise EffdlError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise EffdlError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
        object.__setattr__(self, "logit_bias", bias)  # frozen: the one normalisation __post_init__ does

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor (penalties, bias, min_tokens) changes the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)


@dataclass(frozen=True)
class Decoded:
    """A request's output text so far, and where ``decode_incrementally`` resumes: the tokens from ``prefix`` to
    ``read`` are context already in ``text``; those from ``read`` on are not decoded yet."""

    text: str = ""
    prefix: int = 0
    read: int = 0


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    RUNNING = "running"  # owns a slot: prefilling, then decoding
    FINISHED = "finished"


@dataclass
class Request:
    """One generation. ``num_computed`` tokens of ``prompt + output`` have their K/V in the slot."""

    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0
    output: list[int] = field(default_factory=list)
    decoded: Decoded = field(default_factory=Decoded)  # the output's text so far (sampling.decode_incrementally)
    text: str = ""  # the part of it shown to the client: no stop string, nothing that may still become one
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    generator: torch.Generator | None = None

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it ended."""

    id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
