"""An asyncio front for ``Engine``: the step loop runs in one background thread.

Callers on the event loop never wait for a forward: new requests and aborts
go through an inbox that the loop thread drains between steps, and each
step's outputs come back to the caller's ``asyncio.Queue`` thread-safely.
Leaving a ``generate`` iterator early (a client that disconnected) aborts the
request and frees its slot. The loop uses only ``Engine``'s public API.

A step that fails outside any one request fails what is in flight and the
loop goes on serving; a ``RunnerFailure`` (a tensor-parallel rank is gone)
ends the loop: what is in flight fails, and every later request is refused
with ``EngineStopped``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from effdl.errors import EffdlError
from effdl.flover.engine import Engine, RunnerFailure
from effdl.flover.request import Request, RequestOutput, SamplingParams

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


class EngineStopped(EffdlError):
    """The engine loop has ended because its runner failed; no request can be served. The server answers 503."""


@dataclass
class Histogram:
    """A cumulative Prometheus histogram over fixed bucket bounds."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(init=False)  # per bucket, the last one above every bound
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.total += value

    def prometheus(self, name: str, help_text: str, labels: str = "") -> list[str]:
        """The histogram in Prometheus text format; ``labels`` (``'model_name="m"'``) go on every sample."""
        lines, running = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            lines.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{bound}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        return [*lines, f"{name}_sum{braces} {self.total}", f"{name}_count{braces} {running}"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    request: Request
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs, out in items:
        outputs.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._accepting = True
        self._door = threading.Lock()  # held while a request is let in, and while the door closes
        self.failure: str | None = None  # why the loop stopped, after a RunnerFailure
        self.ttft, self.latency, self.tpot = Histogram(), Histogram(), Histogram(TPOT_BUCKETS_S)
        self.tokens_total = self.prompt_tokens_total = 0
        self.finished: Counter[str] = Counter()  # finish reason -> requests that ended with it
        self._gauges = engine.gauges()
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of the last steps, for tokens/s

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> AsyncEngine:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="flover-engine", daemon=True)
            self._thread.start()
        return self

    async def shutdown(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking requests; let running ones finish (``drain``) or abort them; stop the loop thread."""
        with self._door:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while drain and self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._running = False
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._drain_inbox()  # the aborts above, if the loop stopped before reading them

    # -- requests -----------------------------------------------------------------------------------------

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Each step's output for this request until it finishes.

        Raises ``EffdlError`` if it cannot start: ``QueueFull`` for a full
        queue, ``EngineStopped`` once the runner has failed (also for a
        request that was waiting then and had streamed nothing).
        """
        with self._door:  # the loop cannot close the door between these checks and the inbox
            if self.failure is not None:
                raise EngineStopped(self.failure)
            if not self._accepting or not self._running:
                raise EffdlError("the engine is shutting down")
            request = self.engine.make_request(prompt, params, request_id)  # validation errors surface here
            self.engine.check_room(pending=self._inbox.qsize())
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request)
            self._streams[request.id] = stream
            self._inbox.put(("add", request))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await stream.outputs.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request.id)

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the loop frees the slot before its next step."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self.finished["abort"] += 1
            self._inbox.put(("abort", request_id))
            self._wake.set()
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, RequestOutput(
                request_id, [], "", True, "abort", num_prompt_tokens=len(stream.request.prompt)))

    # -- the loop thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            try:
                self._iterate()
            except RunnerFailure as failure:  # no step can run again: fail what is in flight, close, end
                with self._door:
                    self._accepting = False
                    self.failure = f"the engine has stopped: its runner failed ({failure}); restart the server"
                self._running = False
                self._fail_in_flight(EngineStopped(self.failure))
            except Exception as error:  # a bug outside any one request: fail what is in flight, keep serving
                self._fail_in_flight(EffdlError(f"engine step failed: {error!r}"))

    def _fail_in_flight(self, error: EffdlError) -> None:
        """Abort every request; one that has streamed nothing raises ``error``, the others end with it."""
        self.engine.abort_all()
        self._gauges = self.engine.gauges()
        for request_id, stream in list(self._streams.items()):
            self._streams.pop(request_id, None)
            item = error if stream.first_token is None else RequestOutput(
                request_id, [], "", True, "error", error=str(error), num_prompt_tokens=len(stream.request.prompt),
                num_output_tokens=len(stream.request.output))
            stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)

    def _iterate(self) -> None:
        self._drain_inbox()
        if not self.engine.has_unfinished():
            self._gauges = self.engine.gauges()
            self._wake.wait(self.idle_wait_s)
            self._wake.clear()
            return
        outcome = self.engine.step()
        self._gauges = self.engine.gauges()
        if not outcome.ran:  # a static batch is still filling up
            due = outcome.due
            self._wake.wait(max(0.0, min(self.idle_wait_s, due - time.monotonic())) if due else 0.001)
            self._wake.clear()
        self._publish(outcome.outputs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(item)
            elif item.id in self._streams:  # not aborted while queued
                try:
                    self.engine.enqueue(item)
                except EffdlError as error:
                    stream = self._streams.pop(item.id, None)
                    if stream is not None:
                        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        new_tokens = sum(len(o.new_token_ids) for o in outputs)
        self.tokens_total += new_tokens
        self._recent = [(t, n) for t, n in self._recent if now - t < 10.0] + [(now, new_tokens)]
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.id)
            if stream is None:
                continue
            if stream.first_token is None and out.new_token_ids:
                stream.first_token = now
                self.ttft.observe(now - stream.submitted)
            if out.finished:
                self.latency.observe(now - stream.submitted)
                if stream.first_token is not None and out.num_output_tokens > 1:
                    self.tpot.observe((now - stream.first_token) / (out.num_output_tokens - 1))
                self.prompt_tokens_total += out.num_prompt_tokens
                self.finished[out.finish_reason or "error"] += 1
                self._streams.pop(out.id, None)
            deliveries.setdefault(stream.loop, []).append((stream.outputs, out))
        for loop, items in deliveries.items():  # one wake-up per loop and step, not one per token
            loop.call_soon_threadsafe(_deliver, items)

    # -- observability ------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Gauges (read by the loop thread after each step, never from here) and token counters."""
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t < 10.0]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        stats = self.engine.stats  # ints the loop thread replaces: each read is atomic
        return {**self._gauges, "queue_length": self._gauges["queue_length"] + self._inbox.qsize(),
                "tokens_total": self.tokens_total, "prefix_cache_queries": stats["prefix_cache_queries"],
                "prefix_cache_hits": stats["prefix_cache_hits"],
                "tokens_per_s": sum(n for _, n in recent) / span if span > 0 else 0.0}
