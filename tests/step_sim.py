"""A simulated machine for the step budget: the engine's planning (`plan_step`) and the real `Scheduler` against a
fake executor whose decode of n positions takes a + b·n seconds of work, on a machine whose speed changes with time
(jitter, short spikes, a neighbour taking a core for whole stretches) and whose first steps are slow (the
weights paged in). The clock is simulated: nothing sleeps, no llama.cpp.

The serial server (llama-cpp-python's: one request to completion, then the next; its text before the image, the
image and the text after it as separate decodes of at most n_batch; then one decode per answer token) runs on the
same machine: the same speed at the same simulated time, the same slow first steps. The image encode is left out
of both (each server pays for its own, the same work).
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field

from llava_edge.runtime.scheduler import Job, Scheduler

GRID = 0.5  # seconds: the machine's speed is constant within one cell of this grid


@dataclass
class MachineSpec:
    a: float  # seconds per decode at full speed
    b: float  # seconds per position
    seed: int
    jitter: float = 0.05  # sigma of the log of each cell's slowdown
    spikes: float = 0.0  # share of cells 4x slower (page faults, another process's burst)
    bursts: tuple[tuple[float, float], ...] = ()  # [start, end) seconds when a neighbour takes a core: 2x slower
    slow_first: int = 3  # the first decodes of a process pay their fixed part 4 times: the weights are paged in
    horizon: float = 4000.0


class Machine:
    def __init__(self, spec: MachineSpec):
        self.spec = spec
        rng = random.Random(spec.seed)
        self.cells = [math.exp(rng.gauss(0.0, spec.jitter)) * (4.0 if rng.random() < spec.spikes else 1.0)
                      for _ in range(int(spec.horizon / GRID))]
        self.steps = 0

    def slowdown(self, t: float) -> float:
        burst = any(start <= t < end for start, end in self.spec.bursts)
        return self.cells[min(int(t / GRID), len(self.cells) - 1)] * (2.0 if burst else 1.0)

    def decode(self, t: float, n: int) -> float:
        """Seconds a decode of n positions started at t takes: its work spent at the speed of each moment."""
        work = self.spec.a * (4.0 if self.steps < self.spec.slow_first else 1.0) + self.spec.b * n
        self.steps += 1
        start = t
        while True:
            edges = [e for se in self.spec.bursts for e in se if e > t + 1e-12]
            end = min([(math.floor(t / GRID + 1e-9) + 1) * GRID, *edges])
            f = self.slowdown(t)
            if work * f <= end - t:
                return t + work * f - start
            work -= (end - t) / f
            t = end


@dataclass
class Request:
    name: str
    arrival: float
    keys: list
    spans: dict[int, int]  # first position of each image -> its positions
    n_decode: int  # answer tokens


def image_request(name: str, arrival: float, n_image: int = 576, n_before: int = 35, n_after: int = 12,
                  n_decode: int = 32) -> Request:
    tag = zlib.crc32(name.encode()) % 10_000 * 1000
    keys = ([tag + i for i in range(n_before)] + [("image", name, i) for i in range(n_image)]
            + [tag + 500 + i for i in range(n_after)])
    return Request(name, arrival, keys, {n_before: n_image}, n_decode)


def text_request(name: str, arrival: float, n_prompt: int = 40, n_decode: int = 32) -> Request:
    tag = zlib.crc32(name.encode()) % 10_000 * 1000
    return Request(name, arrival, [tag + i for i in range(n_prompt)], {}, n_decode)


@dataclass
class Run:
    finished: dict[str, float] = field(default_factory=dict)
    arrival: dict[str, float] = field(default_factory=dict)

    def order_is_fcfs(self) -> bool:
        names = sorted(self.arrival, key=lambda k: self.arrival[k])
        return all(self.finished[x] <= self.finished[y] + 1e-9 for x, y in zip(names, names[1:]))

    @property
    def mean_latency(self) -> float:
        return sum(self.finished[k] - self.arrival[k] for k in self.finished) / len(self.finished)

    @property
    def wall(self) -> float:
        return max(self.finished.values()) - min(self.arrival.values())


def run_engine(spec: MachineSpec, requests: list[Request], cost, planner, embed_text: bool = True,
               parallel: int = 4, n_batch: int = 512) -> Run:
    """The engine's loop on the simulated machine: admit, plan (`planner(scheduler, cost)`), decode, draw."""
    machine, sched, run = Machine(spec), Scheduler(parallel, 16, n_batch, embed_text=embed_text), Run()
    todo, drawn, t = sorted(requests, key=lambda r: r.arrival), {}, 0.0
    while len(run.finished) < len(requests):
        while todo and todo[0].arrival <= t:
            r = todo.pop(0)
            sched.reserve()
            sched.submit(Job(list(r.keys), dict(r.spans), owner=r))
            run.arrival[r.name], drawn[r.name] = r.arrival, 0
        sched.admit()
        if not sched.active():
            t = todo[0].arrival
            continue
        plan = planner(sched, cost)

        def draw(slot) -> None:
            r = slot.job.owner
            drawn[r.name] += 1
            if drawn[r.name] == r.n_decode:
                run.finished[r.name] = t
                sched.release(slot)
            else:
                sched.feed(slot, 7)

        if plan.tokens:
            seconds = machine.decode(t, len(plan.tokens))
            t += seconds
            cost.add(len(plan.tokens), seconds)
            sched.commit_tokens(plan)
            for e in plan.tokens:
                if e.wants_logits:
                    draw(e.slot)
        if plan.embeddings is not None:
            c = plan.embeddings
            seconds = machine.decode(t, c.end - c.begin)
            t += seconds
            cost.add(c.end - c.begin, seconds)
            sched.commit_embeddings(plan)
            if c.wants_logits:
                draw(c.slot)
    return run


def run_serial(spec: MachineSpec, requests: list[Request], n_batch: int = 512) -> Run:
    """llama-cpp-python's server on the same machine: one request to completion, then the next."""
    machine, run, t = Machine(spec), Run(), 0.0
    for r in sorted(requests, key=lambda r: r.arrival):
        t = max(t, r.arrival)
        run.arrival[r.name] = r.arrival
        bounds = sorted({0, len(r.keys), *r.spans, *(s + n for s, n in r.spans.items())})
        for begin, end in zip(bounds, bounds[1:]):  # text, image, text: decodes of their own
            for chunk in range(begin, end, n_batch):
                t += machine.decode(t, min(n_batch, end - chunk))
        for _ in range(r.n_decode - 1):  # the first token comes from the prompt's last logits
            t += machine.decode(t, 1)
        run.finished[r.name] = t
    return run
