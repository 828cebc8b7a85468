"""The scheduler decides; it never touches a tensor.

Each ``schedule()`` call turns the request queues into one ``StepPlan``: the
slot moves of the memory shuffle, the prompt chunks to prefill, and the decode
batch (a contiguous slot window, one token per slot). Three policies:

- ``fused`` (Flover's temporal fusion): a request takes a slot as soon as one
  is free, its prompt is prefilled in chunks of at most ``prefill_chunk``
  tokens per step, and it joins the decode batch at the next step; finished
  requests leave at once.
- ``static`` (dynamic batching as Triton + FasterTransformer do it): when no
  batch is running, take up to ``max_slots`` queued requests, having waited at
  most ``batch_window_s`` for the batch to fill; run it until its longest
  request finishes; arrivals wait for the whole batch.
- ``sequential``: ``static`` with batches of one, as one-by-one serving is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from effdl.errors import EffdlError
from effdl.flover.kvpool import SlotTable, plan_shuffle
from effdl.flover.request import Request, Status

POLICIES = ("fused", "static", "sequential")


class QueueFull(EffdlError):
    """The waiting queue is at its bound; the server answers 503."""


@dataclass
class PrefillChunk:
    request_id: str
    slot: int
    start: int  # position of tokens[0]
    tokens: list[int]
    sample: bool  # the chunk ends the prompt: its last logits give the first output token


@dataclass
class DecodeBatch:
    """One token per slot of [lo, hi); slots not decoding get a harmless filler (see ``_filler``)."""

    lo: int
    hi: int
    tokens: list[int]
    positions: list[int]
    rows: list[tuple[str, int]]  # (request id, row in the window) for the rows that sample


@dataclass
class StepPlan:
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, positions to copy)
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: DecodeBatch | None = None

    @property
    def empty(self) -> bool:
        return not (self.moves or self.prefill or self.decode)

    @property
    def request_ids(self) -> list[str]:
        ids = [c.request_id for c in self.prefill]
        return ids + ([rid for rid, _ in self.decode.rows] if self.decode else [])


class Scheduler:
    def __init__(self, n_slots: int, policy: str = "fused", shuffle: bool = True, prefill_chunk: int = 2048,
                 batch_window_s: float = 0.0, max_queue: int = 1024):
        if policy not in POLICIES:
            raise EffdlError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if n_slots <= 0 or prefill_chunk <= 0:
            raise EffdlError("max_slots and prefill_chunk must be positive")
        self.policy, self.shuffle, self.prefill_chunk = policy, shuffle and policy == "fused", prefill_chunk
        self.batch_window_s, self.max_queue = batch_window_s, max_queue
        self.max_batch = 1 if policy == "sequential" else n_slots
        self.slots = SlotTable(n_slots)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # owners of slots, in admission order

    # -- bookkeeping --------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.check_room()
        self.waiting.append(request)

    def check_room(self, pending: int = 0) -> None:
        """Raise ``QueueFull`` if ``pending`` more requests would find the waiting queue at its bound."""
        if len(self.waiting) + pending >= self.max_queue:
            raise QueueFull(f"the queue holds {self.max_queue} waiting requests; retry later")

    def finish(self, request: Request, reason: str) -> None:
        """End ``request``. Its slot frees at once, except inside a static batch, which keeps it to the end."""
        request.status, request.finish_reason = Status.FINISHED, request.finish_reason or reason
        if request.slot is None:
            if request in self.waiting:
                self.waiting.remove(request)
            return
        if self.policy == "fused":
            self._release(request)
        elif all(r.finished for r in self.running.values()):
            for r in list(self.running.values()):
                self._release(r)

    def _release(self, request: Request) -> None:
        self.slots.release(request.slot)
        del self.running[request.id]

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(not r.finished for r in self.running.values())

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # -- deciding -----------------------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        """The plan for one step; request state (slots, ``num_computed``) advances as if it ran."""
        plan = StepPlan()
        decoding = [r for r in self.running.values() if not r.finished and r.output]
        self._admit(now)
        if self.shuffle:
            plan.moves = self._shuffle()
        plan.prefill = self._prefill_chunks()
        if decoding:
            plan.decode = self._decode_batch(decoding)
        return plan

    def _admit(self, now: float) -> None:
        if self.policy == "fused":
            while self.waiting and self.slots.n_free:
                self._take_slot(self.waiting.popleft())
            return
        if self.running or not self.waiting:
            return  # a static batch runs to its end before the next forms
        if len(self.waiting) >= self.max_batch or now - self.waiting[0].arrival >= self.batch_window_s:
            for _ in range(min(self.max_batch, len(self.waiting))):
                self._take_slot(self.waiting.popleft())

    def next_admission(self) -> float | None:
        """When a waiting static batch is due (monotonic time), if the caller should wait for it."""
        if self.policy == "fused" or self.running or not self.waiting:
            return None
        return self.waiting[0].arrival + self.batch_window_s

    def _take_slot(self, request: Request) -> None:
        request.slot, request.status = self.slots.allocate(request.id), Status.RUNNING
        self.running[request.id] = request

    def _shuffle(self) -> list[tuple[int, int, int]]:
        moves = []
        for src, dst in plan_shuffle(self.slots.live):
            request = self.running[self.slots.owner[src]]
            self.slots.move(src, dst)
            request.slot = dst
            moves.append((src, dst, request.num_computed))
        return moves

    def _prefill_chunks(self) -> list[PrefillChunk]:
        budget = self.prefill_chunk if self.policy == "fused" else None  # static prefills whole prompts
        chunks = []
        for r in self.running.values():
            if r.prefilled or r.finished:
                continue
            n = len(r.prompt) - r.num_computed if budget is None else min(budget, len(r.prompt) - r.num_computed)
            if n <= 0:
                break
            chunks.append(PrefillChunk(r.id, r.slot, r.num_computed, r.prompt[r.num_computed:r.num_computed + n],
                                       sample=r.num_computed + n == len(r.prompt)))
            r.num_computed += n
            if budget is not None:
                budget -= n
        return chunks

    def _decode_batch(self, decoding: list[Request]) -> DecodeBatch:
        lo, hi = min(r.slot for r in decoding), max(r.slot for r in decoding) + 1
        tokens, positions = [0] * (hi - lo), [0] * (hi - lo)
        for slot in range(lo, hi):
            owner = self.slots.owner[slot]
            positions[slot - lo] = self.running[owner].num_computed if owner is not None else 0  # filler
        rows = []
        for r in decoding:
            tokens[r.slot - lo], positions[r.slot - lo] = r.output[-1], r.num_computed
            rows.append((r.id, r.slot - lo))
            r.num_computed += 1
        return DecodeBatch(lo, hi, tokens, positions, rows)
