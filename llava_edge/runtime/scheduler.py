"""What the next step evaluates, for every sequence of one llama.cpp context: a planner with no llama.cpp in it.

The scheduler holds the requests that wait for a slot (a bounded FIFO queue) and, for each slot (one llama.cpp
sequence), the positions its KV holds and where its request stands. `plan()` turns that into a `StepPlan`: the
next token of every decoding request, then prefill positions of the others, first come first served, within a
budget; the engine runs the plan on the executor and reports back (`commit_tokens`, `commit_embeddings`, `feed`,
`release`). The rules live here and are tested without a model: which slot a request takes (the free one sharing
the longest prefix with its prompt), never resuming inside an image, budgets, cancels, the queue limit.

A position is a `Key`: a token id, or `("image", image_id, i)` for the i-th embedding of an image, where
image_id names both the image's bytes and how many tokens it was reduced to.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from .prompt import Key


class EngineBusy(Exception):
    """Every slot is busy and the queue is full: try again later."""


@dataclass
class Job:
    """One request's prompt as positions, and where its evaluation stands."""
    keys: list[Key]
    image_spans: dict[int, int]  # first position of each image -> its number of positions
    prefill_only: bool = False  # evaluate the prompt and draw nothing (the chat's prefill while the user types)
    owner: Any = None  # the engine's request object
    cursor: int = 0  # next prompt position to evaluate
    pending: int | None = None  # a drawn token, evaluated by the next step
    forced: list[int] = field(default_factory=list)  # tokens the answer's format forces after it, in the same decode
    cancel_reason: str | None = None
    arrival: int = 0
    cut: int = 0  # a position no embeddings chunk runs past (the disk store saves the KV up to it); 0: none

    @property
    def decoding(self) -> bool:
        return self.pending is not None

    @property
    def prefilled(self) -> bool:
        return self.cursor >= len(self.keys)

    def span_start(self, i: int) -> int | None:
        """The first position of the image that holds position i, or None when i is text."""
        for start, n in self.image_spans.items():
            if start <= i < start + n:
                return start
        return None

    def first_image_end(self) -> int:
        """The position after the first image: the prefix whose KV the disk store keeps (0 without images)."""
        if not self.image_spans:
            return 0
        start = min(self.image_spans)
        return start + self.image_spans[start]


@dataclass
class Slot:
    seq: int  # the llama.cpp sequence id
    held: list[Key] = field(default_factory=list)  # what this sequence's KV holds, position by position
    job: Job | None = None
    last_used: int = 0  # the step it was last released at: the least recently used one goes first


@dataclass
class Admission:
    slot: Slot
    job: Job
    keep: int  # positions of the slot's KV the job reuses; the engine cuts the rest


@dataclass
class TokenEntry:
    slot: Slot
    token: int
    pos: int
    wants_logits: bool
    drawn: bool = False  # an answer token (drawn or forced), not a prompt position


@dataclass
class EmbeddingChunk:
    """Prompt positions [begin, end) of one job decoded as embedding rows: image positions, and with
    `Scheduler.embed_text` the text next to them too (one decode instead of one per run of text)."""
    slot: Slot
    begin: int
    end: int
    wants_logits: bool  # the chunk ends the prompt

    @property
    def pos(self) -> int:
        return len(self.slot.held)


@dataclass
class StepPlan:
    tokens: list[TokenEntry] = field(default_factory=list)  # one llama_decode of token ids
    embeddings: EmbeddingChunk | None = None  # then one of embeddings (a llama_batch holds either, not both)

    @property
    def empty(self) -> bool:
        return not self.tokens and self.embeddings is None


@dataclass
class Budget:
    tokens: int  # prefill positions that may ride in the token decode
    image: int  # positions in this step's own embeddings decode (0: none this step)


def _chunk_end(job: Job, begin: int, limit: int) -> int:
    """Where an embeddings chunk of `job` from `begin` ends: at `limit`, the prompt's end or `job.cut`."""
    end = min(limit, len(job.keys))
    return min(end, job.cut) if begin < job.cut else end


def _holds_image(job: Job, begin: int, end: int) -> bool:
    return any(start < end and begin < start + n for start, n in job.image_spans.items())


def common_prefix(a: list[Key], b: list[Key]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Thread-safe: requests are reserved, submitted and cancelled from any thread; one stepping thread at a
    time calls admit, plan and the commits."""

    def __init__(self, n_slots: int, queue_limit: int, n_batch: int, embed_text: bool = False):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.queue_limit, self.n_batch = queue_limit, n_batch
        self.embed_text = embed_text  # the engine can turn token ids into embedding rows
        self.waiting: list[Job] = []
        self.reserved = 0  # places taken by requests whose images are still being encoded
        self.lock = threading.Lock()
        self._arrivals = itertools.count()
        self._steps = 0

    # ------------------------------------------------------------------ the queue (any thread)

    def reserve(self) -> None:
        """Take a place before the request's images are encoded; EngineBusy when there is none."""
        with self.lock:
            free = sum(s.job is None for s in self.slots)
            if len(self.waiting) + self.reserved >= self.queue_limit + free:
                raise EngineBusy(f"all {len(self.slots)} slots are busy and "
                                f"{len(self.waiting) + self.reserved - free} requests wait")
            self.reserved += 1

    def unreserve(self) -> None:
        with self.lock:
            self.reserved -= 1

    def submit(self, job: Job) -> None:
        """Queue a job whose place was reserved."""
        with self.lock:
            self.reserved -= 1
            job.arrival = next(self._arrivals)
            self.waiting.append(job)

    def cancel(self, job: Job, reason: str) -> None:
        with self.lock:
            if job.cancel_reason is None:
                job.cancel_reason = reason

    def clear_waiting(self) -> list[Job]:
        with self.lock:
            waiting, self.waiting = self.waiting, []
        return waiting

    @property
    def has_waiting(self) -> bool:
        return bool(self.waiting)

    def counts(self) -> dict:
        with self.lock:
            return {"slots": len(self.slots), "busy": sum(s.job is not None for s in self.slots),
                    "queued": len(self.waiting) + self.reserved}

    # ------------------------------------------------------------------ one step (the stepping thread)

    def admit(self) -> tuple[list[Admission], list[Job]]:
        """Move waiting jobs into free slots, in arrival order. Returns the admissions and the jobs that were
        cancelled while they waited (dropped)."""
        admitted, dropped = [], []
        with self.lock:
            while self.waiting:
                free = [s for s in self.slots if s.job is None]
                if not free:
                    break
                job = self.waiting.pop(0)
                if job.cancel_reason is not None:
                    dropped.append(job)
                    continue
                slot = max(free, key=lambda s: (common_prefix(s.held, job.keys), -s.last_used))
                keep = self._reusable(slot, job)
                del slot.held[keep:]
                slot.job, job.cursor = job, keep
                admitted.append(Admission(slot, job, keep))
        return admitted, dropped

    def _reusable(self, slot: Slot, job: Job) -> int:
        keep = common_prefix(slot.held, job.keys)
        if not job.prefill_only:  # the last prompt position is evaluated again: the first token is drawn from it
            keep = min(keep, len(job.keys) - 1)
        start = job.span_start(keep)
        return keep if start is None or start == keep else start  # never resume inside an image

    def restored(self, slot: Slot, n: int) -> None:
        """The slot's KV was loaded from the disk store and now holds the first n prompt positions (0: emptied)."""
        slot.held = list(slot.job.keys[:n])
        slot.job.cursor = n

    def cancelled(self) -> list[Slot]:
        """Slots whose job was cancelled: the engine releases them."""
        with self.lock:
            return [s for s in self.slots if s.job is not None and s.job.cancel_reason is not None]

    def active(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def plan(self, budget: Budget | int) -> StepPlan:
        """Every decoding job's next token, then prefill in arrival order: text tokens into the same batch, and
        at most one embeddings chunk (an image; with embed_text, from the job's next position through the image and
        the text after it). At most n_batch positions in each decode; of prefill, at most budget.tokens in all and
        budget.image in the chunk (an int: both)."""
        if isinstance(budget, int):
            budget = Budget(budget, budget)
        image_budget = budget.image
        plan = StepPlan()
        active = self.active()
        for s in active:
            if s.job.decoding:
                drawn = [s.job.pending, *s.job.forced]
                plan.tokens.extend(TokenEntry(s, t, len(s.held) + k, k == len(drawn) - 1, drawn=True)
                                   for k, t in enumerate(drawn))
        room = self.n_batch - len(plan.tokens)
        budget = min(budget.tokens if budget.image == 0 else max(budget.tokens, budget.image), room)
        positions = {s.seq: len(s.held) for s in active}
        for s in sorted((s for s in active if not s.job.decoding), key=lambda s: s.job.arrival):
            job, i = s.job, s.job.cursor
            if self.embed_text and _holds_image(job, i, _chunk_end(job, i, i + self.n_batch)):
                # text that leads to an image waits for the image's decode (cheaper than a decode of its own)
                if plan.embeddings is None and min(budget, image_budget) > 0:
                    end = _chunk_end(job, i, i + min(budget, image_budget, self.n_batch))
                    plan.embeddings = EmbeddingChunk(s, i, end, end == len(job.keys) and not job.prefill_only)
                    budget -= end - i
                    if budget <= 0:
                        break
                continue
            while budget > 0 and i < len(job.keys) and job.span_start(i) is None:
                wants = i == len(job.keys) - 1 and not job.prefill_only
                plan.tokens.append(TokenEntry(s, job.keys[i], positions[s.seq], wants))
                positions[s.seq] += 1
                budget -= 1
                i += 1
            start = job.span_start(i) if i < len(job.keys) else None
            if budget > 0 and image_budget > 0 and plan.embeddings is None and start is not None:
                end = min(start + job.image_spans[start], i + budget, i + image_budget, i + self.n_batch)
                last = end == len(job.keys)
                plan.embeddings = EmbeddingChunk(s, i, end, last and not job.prefill_only)
                budget -= end - i
            if budget <= 0:
                break
        return plan

    def commit_tokens(self, plan: StepPlan) -> None:
        """The token decode of the plan happened: the slots hold its positions."""
        for e in plan.tokens:
            e.slot.held.append(e.token)
            if e.drawn:
                e.slot.job.pending, e.slot.job.forced = None, []
            else:
                e.slot.job.cursor += 1

    def commit_embeddings(self, plan: StepPlan) -> None:
        chunk = plan.embeddings
        chunk.slot.held.extend(chunk.slot.job.keys[chunk.begin:chunk.end])
        chunk.slot.job.cursor = chunk.end

    def feed(self, slot: Slot, tokens: int | list[int]) -> None:
        """The tokens drawn for slot's job (the drawn one, then those its format forces): evaluated by the next
        step, in one decode."""
        tokens = [tokens] if isinstance(tokens, int) else tokens
        slot.job.pending, slot.job.forced = tokens[0], list(tokens[1:])

    def release(self, slot: Slot) -> Job | None:
        """The slot is free again; its KV (held) stays for a later request to reuse."""
        with self.lock:
            job, slot.job = slot.job, None
            self._steps += 1
            slot.last_used = self._steps
        return job

    def truncate(self, slot: Slot, keep: int) -> None:
        del slot.held[keep:]
