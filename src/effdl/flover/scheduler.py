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

With a ``PrefixIndex`` (automatic prefix caching), an admitted request whose
prompt starts with cached blocks has them loaded into its slot and prefills
from there; once its prefill completes, its full prompt blocks not yet cached
are saved. The plan carries both kinds of copy; the runner orders them with
the moves (see ``StepPlan``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from effdl.errors import EffdlError
from effdl.flover.kvpool import SlotTable, plan_shuffle
from effdl.flover.prefix_cache import PrefixIndex
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
class BlockCopy:
    """Whole blocks between a slot and the block store: the slot's blocks first, first + 1, ... <-> store ``rows``."""

    slot: int
    first: int  # the slot's block number for rows[0]: its positions start at first * block_size
    rows: list[int]


@dataclass
class StepPlan:
    """One step, executed in this order: loads, moves, prefill chunks, the decode batch, saves.

    Loads come first because they fill the slot a request was admitted into,
    which the moves may then carry elsewhere (with its loaded positions);
    saves come last, from the slots the moves left, once the prefill wrote them.
    """

    loads: list[BlockCopy] = field(default_factory=list)  # block store -> a newly admitted request's slot
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (src slot, dst slot, positions to copy)
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: DecodeBatch | None = None
    saves: list[BlockCopy] = field(default_factory=list)  # a just-prefilled request's slot -> block store

    @property
    def empty(self) -> bool:
        return not (self.loads or self.moves or self.prefill or self.decode or self.saves)

    @property
    def request_ids(self) -> list[str]:
        ids = [c.request_id for c in self.prefill]
        return ids + ([rid for rid, _ in self.decode.rows] if self.decode else [])


class Scheduler:
    def __init__(self, n_slots: int, policy: str = "fused", shuffle: bool = True, prefill_chunk: int = 2048,
                 batch_window_s: float = 0.0, max_queue: int = 1024, prefix: PrefixIndex | None = None):
        """``prefix``: the index of cached prompt blocks (prefix caching), or None for none."""
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
        self.prefix = prefix
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up, and found, in the prefix cache

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
        plan.loads = self._admit(now)
        if self.shuffle:
            plan.moves = self._shuffle()
        plan.prefill = self._prefill_chunks()
        plan.saves = self._saves(plan.prefill)
        if decoding:
            plan.decode = self._decode_batch(decoding)
        return plan

    def _admit(self, now: float) -> list[BlockCopy]:
        """Give waiting requests slots as the policy allows; returns the cached blocks to load into them."""
        n = 0
        if self.policy == "fused":
            n = min(len(self.waiting), self.slots.n_free)
        elif not self.running and self.waiting and (  # a static batch runs to its end before the next forms
                len(self.waiting) >= self.max_batch or now - self.waiting[0].arrival >= self.batch_window_s):
            n = min(self.max_batch, len(self.waiting))
        loads = [self._take_slot(self.waiting.popleft()) for _ in range(n)]
        return [load for load in loads if load is not None]

    def next_admission(self) -> float | None:
        """When a waiting static batch is due (monotonic time), if the caller should wait for it."""
        if self.policy == "fused" or self.running or not self.waiting:
            return None
        return self.waiting[0].arrival + self.batch_window_s

    def _take_slot(self, request: Request) -> BlockCopy | None:
        """Give ``request`` a slot; with prefix caching, its cached prefix counts as computed once loaded."""
        request.slot, request.status = self.slots.allocate(request.id), Status.RUNNING
        self.running[request.id] = request
        if self.prefix is None:
            return None
        rows = self.prefix.lookup(request.prompt)
        self.prefix_queries += len(request.prompt)
        self.prefix_hits += len(rows) * self.prefix.block_size
        request.num_computed = len(rows) * self.prefix.block_size
        return BlockCopy(request.slot, 0, rows) if rows else None

    def _saves(self, chunks: list[PrefillChunk]) -> list[BlockCopy]:
        """The full prompt blocks, not yet cached, of the requests whose prefill these chunks complete."""
        if self.prefix is None:
            return []
        saves = []
        for c in chunks:
            if c.sample:
                first, rows = self.prefix.insert(self.running[c.request_id].prompt)
                if rows:
                    saves.append(BlockCopy(c.slot, first, rows))
        return saves

    def forget(self, plan: StepPlan) -> None:
        """Uncache the blocks ``plan`` was to save: it failed, so their contents never reached the store."""
        for save in plan.saves:  # none without a prefix index
            for row in save.rows:
                self.prefix.discard(row)

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
