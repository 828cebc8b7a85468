"""Serving workloads and a benchmark client: Poisson arrivals, JSONL traces, replay, vLLM-style metrics.

A workload is a list of ``WorkloadRequest`` (when it arrives, its prompt as
token ids, how many tokens to generate). ``replay`` fires each request at its
arrival time in real time against an in-process ``AsyncEngine`` or an
OpenAI-compatible server (ours, vLLM, ...) and records when every token came
back; ``summarize`` turns those records into the numbers vLLM's
``benchmark_serving`` reports (throughput, TTFT, TPOT, ITL, E2E latency,
goodput).

Timestamps in ``RequestMetrics`` are seconds since the replay began, on the
client's monotonic clock: what a user of the server would see.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from effdl.errors import EffdlError
from effdl.flover.async_engine import AsyncEngine
from effdl.flover.request import SamplingParams


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: sent ``arrival_s`` seconds after the start, asking for ``max_tokens`` tokens."""

    arrival_s: float
    prompt: list[int]
    max_tokens: int

    def __post_init__(self) -> None:
        if isinstance(self.arrival_s, bool) or not isinstance(self.arrival_s, (int, float)) \
                or not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise EffdlError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if not isinstance(self.prompt, list) or not self.prompt:
            raise EffdlError(f"prompt must be a non-empty list of token ids, got {self.prompt!r:.80}")
        bad = [t for t in self.prompt if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise EffdlError(f"prompt token ids must be integers >= 0, got {bad[:5]}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise EffdlError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


# -- making workloads ---------------------------------------------------------------------------------------

def poisson_workload(n: int, mean_interval_ms: float, prompt_len: tuple[int, int] = (16, 128),
                     output_len: tuple[int, int] = (16, 64), vocab_size: int = 256, seed: int = 0
                     ) -> list[WorkloadRequest]:
    """``n`` requests arriving as a Poisson process with mean gap ``mean_interval_ms`` (0 = all at t=0).

    The first request arrives at t=0 and each later one an exponentially
    distributed gap after the one before. Prompt and output lengths are
    uniform over the inclusive ranges; prompt tokens are uniform over
    ``[0, vocab_size)`` (the default 256 keeps byte-tokenizer prompts clear of
    its special ids).

    Arrivals and contents come from separate seeded streams, and every gap is a
    unit exponential scaled by the mean: for one ``seed``, workloads at
    different ``mean_interval_ms`` hold the same prompts and lengths, with all
    arrival times in the same proportions. A sweep over the interval then
    changes only the load.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise EffdlError(f"n must be a positive integer, got {n!r}")
    if not math.isfinite(mean_interval_ms) or mean_interval_ms < 0:
        raise EffdlError(f"mean_interval_ms must be a finite number >= 0, got {mean_interval_ms!r}")
    for name, (lo, hi) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= lo <= hi:
            raise EffdlError(f"{name} must be a range (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
    if vocab_size <= 0:
        raise EffdlError(f"vocab_size must be positive, got {vocab_size}")

    gaps = random.Random(f"{seed}/arrivals")
    contents = random.Random(f"{seed}/contents")
    mean_s, arrival, requests = mean_interval_ms / 1000, 0.0, []
    for i in range(n):
        if i:
            arrival += mean_s * gaps.expovariate(1.0)
        prompt = [contents.randrange(vocab_size) for _ in range(contents.randint(*prompt_len))]
        requests.append(WorkloadRequest(arrival, prompt, contents.randint(*output_len)))
    return requests


def save_trace(path: str | Path, workload: Sequence[WorkloadRequest]) -> None:
    """Write ``workload`` as JSONL, one ``{"arrival_s", "prompt", "max_tokens"}`` object per line."""
    Path(path).write_text("".join(json.dumps(asdict(r)) + "\n" for r in workload))


def load_trace(path: str | Path, vocab_size: int = 256, seed: int = 0) -> list[WorkloadRequest]:
    """Read a JSONL trace written by ``save_trace`` (blank lines are skipped).

    A line may give ``"prompt_len"`` instead of ``"prompt"``; its prompt is
    then drawn uniformly from ``[0, vocab_size)``, seeded by ``seed`` and the
    line number, so a trace of lengths alone replays the same every time.
    Raises ``EffdlError`` naming the file and line of the first bad line.
    """
    path = Path(path)
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append(_parse_trace_line(line, vocab_size, random.Random(f"{seed}/trace/{number}")))
        except (EffdlError, json.JSONDecodeError) as error:
            raise EffdlError(f"{path} line {number}: {error}") from None
    return requests


def _parse_trace_line(line: str, vocab_size: int, rng: random.Random) -> WorkloadRequest:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise EffdlError(f"expected a JSON object, got {line.strip():.80}")
    missing = [k for k in ("arrival_s", "max_tokens") if k not in entry]
    if missing or ("prompt" in entry) == ("prompt_len" in entry):
        raise EffdlError(f"needs arrival_s, max_tokens and exactly one of prompt or prompt_len; got keys "
                         f"{sorted(entry)}")
    prompt = entry.get("prompt")
    if prompt is None:
        length = entry["prompt_len"]
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise EffdlError(f"prompt_len must be a positive integer, got {length!r}")
        prompt = [rng.randrange(vocab_size) for _ in range(length)]
    return WorkloadRequest(entry["arrival_s"], prompt, entry["max_tokens"])


# -- replaying them -----------------------------------------------------------------------------------------

@dataclass
class RequestMetrics:
    """What the client saw of one request; times are seconds since the replay began."""

    index: int  # position in the workload
    arrival_s: float  # when the workload said to send it
    num_prompt_tokens: int
    start_s: float = math.nan  # when it was actually sent
    first_token_s: float | None = None
    finish_s: float | None = None  # the last token, or the error
    token_times_s: list[float] = field(default_factory=list)  # one per streamed token (HTTP: per chunk)
    num_output_tokens: int = 0  # HTTP: the server's usage count when it sends one, else the chunk count
    output_ids: list[int] | None = None  # in-process, or HTTP with replay(..., token_ids=True)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None


async def replay(workload: Sequence[WorkloadRequest], target: AsyncEngine | str, model: str | None = None,
                 timeout_s: float | None = None, on_finish: Callable[[RequestMetrics], None] | None = None,
                 token_ids: bool = False) -> list[RequestMetrics]:
    """Send every request of ``workload`` at its arrival time and record its stream; returns them in order.

    ``target`` is a started in-process ``AsyncEngine`` or the base URL of an
    OpenAI-compatible server (``http://host:port``), which gets a streaming
    ``POST /v1/completions`` for ``model`` with the prompt as token ids,
    greedy, ``ignore_eos`` so every request runs to ``max_tokens``.
    A request that fails, or runs past ``timeout_s``, records its error and the
    rest go on. ``on_finish`` is called as each request ends (progress bars).
    ``token_ids`` (HTTP only; in-process replays always have them) also asks
    for the generated token ids, as vLLM gives them (``"logprobs": 0`` with
    ``"return_tokens_as_token_ids"``), into ``RequestMetrics.output_ids``.
    """
    if isinstance(target, str):
        if not target.startswith(("http://", "https://")):
            raise EffdlError(f"an HTTP target must be a base URL like http://host:port, got {target!r}")
        if not model:
            raise EffdlError("replaying against an HTTP server needs the served model's name (model=...)")
        # No connection limit: a pool cap would queue requests in the client, not the server.
        async with httpx.AsyncClient(base_url=target.rstrip("/"), timeout=None,
                                     limits=httpx.Limits(max_connections=None)) as client:
            return await _replay(workload, lambda r, m, t0: _stream_http(client, model, r, m, t0, token_ids),
                                 timeout_s, on_finish)
    return await _replay(workload, lambda r, m, t0: _stream_engine(target, r, m, t0), timeout_s, on_finish)


Streamer = Callable[[WorkloadRequest, RequestMetrics, float], Awaitable[None]]  # fills in the metrics


async def _replay(workload: Sequence[WorkloadRequest], stream: Streamer, timeout_s: float | None,
                  on_finish: Callable[[RequestMetrics], None] | None) -> list[RequestMetrics]:
    t0 = time.perf_counter()

    async def one(index: int, request: WorkloadRequest) -> RequestMetrics:
        metrics = RequestMetrics(index, request.arrival_s, len(request.prompt))
        await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
        metrics.start_s = time.perf_counter() - t0
        try:
            await asyncio.wait_for(stream(request, metrics, t0), timeout_s)
        except asyncio.TimeoutError:
            metrics.error = f"timed out after {timeout_s} s"
        except Exception as error:  # one failed request must not end the benchmark
            metrics.error = f"{type(error).__name__}: {error}"
        if metrics.finish_s is None or metrics.error:
            metrics.finish_s = time.perf_counter() - t0
        if on_finish is not None:
            on_finish(metrics)
        return metrics

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(workload))))


async def _stream_engine(engine: AsyncEngine, request: WorkloadRequest, metrics: RequestMetrics, t0: float) -> None:
    params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    metrics.output_ids = []
    # aclosing: a timeout that cancels us mid-stream still aborts the request and frees its slot.
    async with aclosing(engine.generate(request.prompt, params)) as outputs:
        async for out in outputs:
            now = time.perf_counter() - t0
            if out.new_token_ids:
                if metrics.first_token_s is None:
                    metrics.first_token_s = now
                metrics.token_times_s += [now] * len(out.new_token_ids)
                metrics.output_ids += out.new_token_ids
                metrics.num_output_tokens = len(metrics.output_ids)
                metrics.text += out.new_text
            if out.finished:
                metrics.finish_s, metrics.finish_reason = now, out.finish_reason
                if out.error or out.finish_reason == "abort":
                    metrics.error = out.error or "aborted"


async def _stream_http(client: httpx.AsyncClient, model: str, request: WorkloadRequest, metrics: RequestMetrics,
                       t0: float, token_ids: bool = False) -> None:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if token_ids:  # the sampled tokens come back as logprobs.tokens, each named "token_id:N"
        body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
        metrics.output_ids = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise EffdlError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace'):.300}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators and SSE comments
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise EffdlError(f"server error: {chunk['error']}")
            now = time.perf_counter() - t0
            if chunk.get("choices"):  # one chunk per engine step; a token may decode to no text
                choice = chunk["choices"][0]
                if metrics.first_token_s is None:
                    metrics.first_token_s = now
                metrics.token_times_s.append(now)
                metrics.num_output_tokens = len(metrics.token_times_s)
                metrics.text += choice.get("text") or ""
                if token_ids:
                    metrics.output_ids += [_token_id(t) for t in (choice.get("logprobs") or {}).get("tokens", [])]
                metrics.finish_reason = choice.get("finish_reason") or metrics.finish_reason
                metrics.finish_s = now
            usage = chunk.get("usage") or {}  # OpenAI sends "usage": null on every chunk but the last
            if usage.get("completion_tokens") is not None:  # exact even where a chunk held several tokens
                metrics.num_output_tokens = usage["completion_tokens"]
    if metrics.finish_reason is None:
        raise EffdlError("the stream ended without a finish_reason")


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise EffdlError(f"expected a token named 'token_id:N' (return_tokens_as_token_ids), got {token!r}")
    return int(token.removeprefix("token_id:"))


# -- summarising --------------------------------------------------------------------------------------------

def summarize(metrics: Sequence[RequestMetrics], slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
              ) -> dict[str, Any]:
    """The serving numbers of one replay, defined as vLLM's ``benchmark_serving`` defines them.

    Over the completed requests (no error), latencies measured from when each
    request was sent:

    - ``ttft``: time to first token, first token - send.
    - ``e2e``: end-to-end latency, last token - send.
    - ``tpot``: time per output token after the first, (e2e - ttft) / (tokens - 1);
      requests with one output token have none.
    - ``itl``: inter-token latency, every gap between consecutive tokens
      (HTTP: chunks) of a request, pooled over all requests.

    each as ``mean_*_s``, ``median_*_s`` and ``p99_*_s`` (linear interpolation;
    NaN when there is nothing to average). And over the whole replay:

    - ``makespan_s``: first arrival to last finish, failed requests included.
    - ``request_throughput`` / ``output_throughput``: completed requests and
      their output tokens per second of makespan.
    - ``goodput``: completed requests per second of makespan that met every SLO
      given (TTFT <= ``slo_ttft_s``, TPOT <= ``slo_tpot_s``; a one-token
      request meets any TPOT SLO); None when no SLO is given.
    - ``max_send_lag_s``: the latest any request was sent after its arrival
      time; more than a few ms means the client could not keep up and the
      offered load was lower than asked.
    """
    done = [m for m in metrics if m.ok]
    start = min((m.arrival_s for m in metrics), default=0.0)
    end = max((m.finish_s for m in metrics if m.finish_s is not None), default=start)
    makespan = end - start
    ttft = [m.first_token_s - m.start_s for m in done if m.first_token_s is not None]
    e2e = [m.finish_s - m.start_s for m in done]
    tpot = [_tpot(m) for m in done if m.num_output_tokens > 1]
    itl = [b - a for m in done for a, b in pairwise(m.token_times_s)]
    output_tokens = sum(m.num_output_tokens for m in done)

    def per_s(count: float) -> float:
        return count / makespan if makespan > 0 else math.nan

    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(metrics) - len(done),
        "total_input_tokens": sum(m.num_prompt_tokens for m in done),
        "total_output_tokens": output_tokens,
        "makespan_s": makespan,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output_tokens),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        summary |= _stats(name, values)
    summary["goodput"] = None
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = [m for m in done if (slo_ttft_s is None or m.first_token_s - m.start_s <= slo_ttft_s)
                and (slo_tpot_s is None or m.num_output_tokens <= 1 or _tpot(m) <= slo_tpot_s)]
        summary["goodput"] = per_s(len(good))
    summary["max_send_lag_s"] = max((m.start_s - m.arrival_s for m in metrics), default=0.0)
    return summary


def _tpot(m: RequestMetrics) -> float:
    return (m.finish_s - m.first_token_s) / (m.num_output_tokens - 1)


def _stats(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_s": math.nan, f"median_{name}_s": math.nan, f"p99_{name}_s": math.nan}
    return {f"mean_{name}_s": float(np.mean(values)), f"median_{name}_s": float(np.median(values)),
            f"p99_{name}_s": float(np.percentile(values, 99))}
