"""How much prefill one step may take, from a cost model that noise cannot talk into a bad bet. Pure, no llama.cpp.

`StepCost` keeps the decode times measured, a few per size (sizes grouped by powers of two, so that a stream of
one-token decodes never pushes the rare image chunks out), and fits a + b·n robustly: the median time of each
size, then Theil–Sen (the median of the slopes between sizes), with b > 0 and a >= 0 (a decode of more positions
never costs less). It says whether it is sure: at least two sizes four times apart, each measured a few times,
with the times of each size close to their median and the medians close to the line.

`prefill_budget` turns that into a `Budget`. Alone, a prefill takes whole batches, as a lone request always has.
While answers are being written, the budget falls back to what llama-cpp-python's serial server does (finish the
running answers; the next prompt waits) unless the model is sure, and then lets prefill ride only as far as it
slows the answers' next token by at most `decode_slowdown`, at pessimistic costs. `plan_step` is the planning
half of the engine's step (the engine and the tests' simulated machine both call it): the budget, the scheduler's
plan, and first come first served prefill.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from .scheduler import Budget, Job, Scheduler, StepPlan

MIN_PER_POSITION = 1e-9  # seconds: b is clamped above 0, a decode of more positions never costs less


@dataclass(frozen=True)
class Fit:
    a: float  # seconds per decode
    b: float  # seconds per position
    sure: bool  # enough sizes, each measured enough, with little spread: decisions may rely on it
    spread: float  # relative spread of the times (median absolute deviation / median, worst size)

    def seconds(self, n: int) -> float:
        return self.a + self.b * n


class StepCost:
    """Decode times by size; `fit()` is robust to outliers and clamped to what is physically possible."""

    def __init__(self, per_size: int = 7, min_samples: int = 3, max_spread: float = 0.2):
        self.per_size, self.min_samples, self.max_spread = per_size, min_samples, max_spread
        self._sizes: dict[int, deque[tuple[int, float]]] = {}

    def add(self, n: int, seconds: float) -> None:
        if n >= 1 and seconds > 0:
            self._sizes.setdefault(n.bit_length(), deque(maxlen=self.per_size)).append((n, seconds))

    def worst_per_position(self) -> float | None:
        """The highest seconds per position measured recently: an upper bound of b (None before any)."""
        ratios = [t / n for samples in self._sizes.values() for n, t in samples]
        return max(ratios) if ratios else None

    def fit(self) -> Fit | None:
        """(a, b) through the median of each size, or None with fewer than two sizes measured."""
        points, spread = [], 0.0
        for samples in self._sizes.values():
            times = [t for _, t in samples]
            mid = statistics.median(times)
            spread = max(spread, statistics.median(abs(t - mid) for t in times) / mid)
            points.append((statistics.median(n for n, _ in samples), mid, len(samples)))
        if len(points) < 2:
            return None
        slopes = [(t2 - t1) / (n2 - n1) for i, (n1, t1, _) in enumerate(points) for n2, t2, _ in points[i + 1:]]
        b = max(MIN_PER_POSITION, statistics.median(slopes))
        a = max(0.0, statistics.median(t - b * n for n, t, _ in points))
        known = [(n, t) for n, t, count in points if count >= self.min_samples]
        off_line = max(abs(t - (a + b * n)) / t for n, t, _ in points)
        sure = (len(known) >= 2 and max(n for n, _ in known) >= 4 * min(n for n, _ in known)
                and spread <= self.max_spread and off_line <= self.max_spread)
        return Fit(a, b, sure, spread)

    def positions_within(self, seconds: float) -> int | None:
        fit = self.fit()
        return None if fit is None else max(0, int((seconds - fit.a) / fit.b + 1e-6))


def prefill_budget(n_batch: int, cost: StepCost, n_decoding: int, slowdown: float, background_seconds: float,
                   background: bool) -> Budget:
    """Prefill positions one step may take.

    Nothing decoding: whole batches (fastest per position), except for a prefill nobody waits on yet (the chat's,
    while the user types), held to steps of about background_seconds so that stopping it is quick. Answers
    decoding: none unless the cost model is sure (the serial server's order: finish them first); when it is,
    text rides in their decode as far as it slows their next token by at most `slowdown` (a fraction), and an
    image chunk, which needs a decode of its own, only where that fits too, both priced pessimistically (the
    fitted cost grown by twice the measured spread)."""
    fit = cost.fit()
    if n_decoding == 0 and not background:
        return Budget(n_batch, n_batch)
    if n_decoding == 0:
        return Budget(*(2 * [_background_positions(n_batch, cost, fit, background_seconds)]))
    if fit is None or not fit.sure:
        return Budget(0, 0)
    margin = 1 + 2 * fit.spread
    allowed = slowdown * fit.seconds(n_decoding) / margin  # seconds this step may add to the decode, pessimistic
    tokens = max(0, min(n_batch - n_decoding, int(allowed / fit.b + 1e-6)))
    image = int((allowed - fit.a) / fit.b + 1e-6)
    return Budget(tokens, min(n_batch, image) if image >= 16 else 0)


def _background_positions(n_batch: int, cost: StepCost, fit: Fit | None, seconds: float) -> int:
    if fit is not None and fit.sure:
        return max(16, min(n_batch, int((seconds - fit.a) / fit.b + 1e-6)))
    worst = cost.worst_per_position()  # unsure: the dearest position seen prices them all
    return min(n_batch, 32) if worst is None else max(16, min(n_batch, int(seconds / worst)))


def plan_step(scheduler: Scheduler, cost: StepCost, n_batch: int, slowdown: float, background_seconds: float
              ) -> StepPlan:
    """The next step's plan: the budget from the cost model, the scheduler's plan within it, then first come first
    served prefill. A job's prefill goes only where every job that came before it finishes its prompt in this
    step (so a text prompt never overtakes an image waiting for its turn). A prompt that ends in this step is an
    answer from here on: a later job's prefill that does not end its prompt too (and join the answers' decodes)
    rides along with that answer, within the budget of a step that decodes it."""
    active = scheduler.active()
    n_decoding, background = sum(s.job.decoding for s in active), any(s.job.prefill_only for s in active)
    plan = scheduler.plan(prefill_budget(n_batch, cost, n_decoding, slowdown, background_seconds, background))
    planned = _prefill_planned(plan)
    waiting = sorted((s for s in active if not s.job.decoding), key=lambda s: s.job.arrival)
    ends = [s.job.cursor + planned.get(id(s), 0) >= len(s.job.keys) for s in waiting]
    if all(ends):
        return plan
    partial = waiting[ends.index(False)]  # the first job left with prefill to do; the ones after it wait
    plan.tokens = [e for e in plan.tokens if e.slot.job.decoding or e.slot.job.arrival <= partial.job.arrival]
    if plan.embeddings is not None and plan.embeddings.slot.job.arrival > partial.job.arrival:
        plan.embeddings = None
    starting = sum(not s.job.prefill_only for s in waiting[:ends.index(False)])
    if n_decoding + starting == 0:
        return plan  # the first job's prefill, alone: whole batches
    riding = prefill_budget(n_batch, cost, n_decoding + starting, slowdown, background_seconds, background)
    mine = [e for e in plan.tokens if e.slot is partial]
    image = plan.embeddings.end - plan.embeddings.begin if plan.embeddings is not None and plan.embeddings.slot is partial else 0
    if image > riding.image or (image and len(mine) > riding.tokens):
        plan.embeddings, image = None, 0
    behind = len(waiting) - ends.index(False) + len(scheduler.waiting)  # jobs that come after this one's prefill
    if not image and mine and not _saves_a_decode(partial.job, mine, riding.tokens, cost.fit(),
                                                  len(active) + len(scheduler.waiting), behind):
        plan.tokens = [e for e in plan.tokens if e.slot is not partial]
    return plan


def _prefill_planned(plan: StepPlan) -> dict[int, int]:
    """Prompt positions the plan evaluates, per slot (by id)."""
    planned: dict[int, int] = {}
    for e in plan.tokens:
        if not e.slot.job.decoding:
            planned[id(e.slot)] = planned.get(id(e.slot), 0) + 1
    if plan.embeddings is not None:
        planned[id(plan.embeddings.slot)] = planned.get(id(plan.embeddings.slot), 0) + plan.embeddings.end - plan.embeddings.begin
    return planned


def _saves_a_decode(job: Job, entries: list, allowed: int, fit: Fit | None, delayed: int, behind: int) -> bool:
    """Whether a prompt's text riding in a step that decodes answers pays for itself: it must be the whole run of
    text up to the prompt's next image (then that text needs no decode of its own), and the decode's fixed cost
    saved for each job from this one on must outweigh the positions' cost to every job the step delays."""
    end = job.cursor + len(entries)
    if fit is None or not fit.sure or len(entries) > allowed or job.span_start(end) is None:
        return False
    margin = 1 + 2 * fit.spread
    return len(entries) * fit.b * margin * delayed <= fit.a / margin * behind
