"""Requests as plain data: what a client asked for, and where the engine is with it."""

from __future__ import annotations

import enum
import time
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

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise EffdlError(f"max_tokens must be positive, got {self.max_tokens}")
        check_sampling(self.temperature, self.top_p, self.top_k)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise EffdlError(f"logprobs must be between 0 and 20, got {self.logprobs}")


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
    text: str = ""
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
