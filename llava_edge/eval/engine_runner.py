"""A benchmark's questions answered by the bundle: one engine, N slots, the queue kept full (N decoding, N
waiting), each finished answer handed to `done` as it comes (the caller appends it to the predictions file).
Ctrl-C or SIGTERM stops after the answers in hand, as a caption run does."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..caption.local_run import StopOnSignal, context_per_sequence
from ..errors import UserError
from ..runtime import Engine, EngineConfig, ImageBudget, Message, Model, SamplingConfig
from .items import Question


def open_engine(model: Model, questions: list[Question], parallel: int, max_tokens: int,
                kv_type: str = "f16") -> Engine:
    """An engine whose contexts fit the longest prompt of the set (each request names its image budget)."""
    longest = max((q.prompt for q in questions), key=lambda p: len(p.encode()))
    return Engine(model, EngineConfig(parallel=parallel, n_ctx=context_per_sequence(model, longest, max_tokens),
                                      queue=2 * parallel, kv_type=kv_type))


def answer_with_engine(engine: Engine, questions: list[Question], budget: ImageBudget | None, max_tokens: int,
                       done: Callable[[Question, str, float], None], stop: StopOnSignal | None = None) -> int:
    """Answer every question (greedy) unless stopped; returns how many answers the engine failed (no line for
    them: a rerun asks them again)."""
    stopped = (lambda: stop.requested) if stop is not None else (lambda: False)
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0)
    parallel = engine.config.parallel
    todo = deque(questions)
    inflight: deque = deque()
    failed = 0
    engine.start()
    try:
        while (todo or inflight) and not stopped():
            while todo and len(inflight) < 2 * parallel:
                q = todo.popleft()
                try:
                    gen = engine.generate([Message("user", q.prompt, [q.image])], sampling, budget)
                except UserError as e:
                    raise UserError(f"question_id {q.key}: {e}") from None
                inflight.append((q, gen))
            inflight[0][1].wait(0.05)
            for entry in [e for e in inflight if e[1].finished]:
                inflight.remove(entry)
                q, gen = entry
                if gen.error is not None:
                    failed += 1
                else:
                    done(q, gen.answer.text, gen.answer.timings.ttft_ms)
    finally:
        for _, gen in inflight:
            gen.cancel()
    return failed




def answers_of_bundle(bundle_dir: str | None, questions: list[Question], parallel: int = 4, max_tokens: int = 128,
                      threads: int | None = None, image_tokens: int | None = None) -> dict[str, str]:
    """Every question's greedy answer from a bundle, in memory (no predictions file, no signal handling): for
    scripts and tests."""
    model = Model.open(bundle_dir, threads=threads)
    answers: dict[str, str] = {}
    try:
        engine = open_engine(model, questions, parallel, max_tokens)
        try:
            failed = answer_with_engine(engine, questions, model.image_budget(image_tokens), max_tokens,
                                        lambda q, text, _: answers.update({q.key: text}))
        finally:
            engine.close()
    finally:
        model.close()
    if failed:
        raise RuntimeError(f"{failed} answers failed in the engine")
    return answers
