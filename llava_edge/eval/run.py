"""One `llava-edge eval` run: the benchmark's questions, the reference's answers (a callable the command passes
in, so that this package stays torch-free) and the bundle's at each K of the sweep, every answer appended to the
predictions file as it comes and read back from it on a rerun; then each side scored."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..caption.local_run import StopOnSignal
from ..errors import UserError
from ..runtime import ImageBudget, Model
from .benchmarks import QuestionSet, load_benchmark
from .eval_config import EvalConfig
from .engine_runner import answer_with_engine, open_engine
from .items import Question
from .predictions import answers_of, compared_answers, open_predictions, record

# (image file or bytes, prompt) pairs and K (None: all) → answers in order: the reference side
Reference = Callable[[Iterable[tuple[str | bytes, str]], "int | None"], Iterator[str]]


@dataclass
class SideResult:
    side: str  # "reference" or "bundle"
    model: str
    image_tokens: int | None
    metrics: dict[str, float]
    answers: dict[str, str]
    ttft_ms: float | None  # median first-answer time of the engine's answers (None: not measured)


@dataclass
class EvalRun:
    benchmark: str
    questions: int
    results: list[SideResult]
    interrupted: bool = False
    failed: int = 0


def bundle_model(opened: Model, sweep: list[int | None], kv_type: str = "f16") -> tuple[str, list[ImageBudget]]:
    """A bundle's name in the predictions file (its graph and decoder hashes, and a KV type other than f16), and
    the sweep checked against it (K equal to the image's token count is every token, as None)."""
    files = opened.bundle.manifest["files"]
    budgets = list(dict.fromkeys(opened.image_budget(k) for k in sweep))
    kv = "" if kv_type == "f16" else f"-kv_{kv_type}"
    return f"bundle:{files['vision']['sha256'][:12]}-{files['decoder']['sha256'][:12]}{kv}", budgets


def reference_model(ckpt: str) -> str:
    where = os.path.abspath(ckpt) if os.path.exists(ckpt) else ckpt
    return f"ckpt:{where}"


def run_eval(cfg: EvalConfig, reference: Reference | None = None) -> EvalRun:
    qset = load_benchmark(cfg.benchmark, cfg.data, cfg.limit)
    with tempfile.TemporaryDirectory(prefix="llava-edge-eval-") as tmp:
        results = open_predictions(cfg.predictions or os.path.join(tmp, "predictions.jsonl"))
        run = EvalRun(cfg.benchmark, len(qset.questions), [])
        stop = StopOnSignal()
        try:
            if cfg.compare is not None:
                model, answers = compared_answers(cfg.compare, cfg.benchmark, qset.questions)
                run.results.append(SideResult("reference", model, None, qset.score(answers), answers, None))
            if cfg.ckpt is not None:
                if reference is None:
                    raise UserError("--ckpt needs the reference model (pip install 'llava-edge[train]')")
                run_reference(cfg, qset, reference, results, run, stop)
            if cfg.bundle is not None and not stop.requested:
                run_bundle(cfg, qset, results, run, stop)
            run.interrupted = stop.requested
        finally:
            stop.restore()
            results.close()
    return run


def _bar(cfg: EvalConfig, desc: str, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="q", desc=desc, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, disable=not cfg.progress)


def _collect(qset: QuestionSet, results, run: EvalRun, side: str, model: str, k: int | None) -> None:
    """Score a side once every question has its line."""
    lines = answers_of(results, qset.benchmark, model, k)
    if all(q.key in lines for q in qset.questions):
        answers = {q.key: lines[q.key]["answer"] for q in qset.questions}
        times = [lines[q.key]["ttft_ms"] for q in qset.questions if lines[q.key].get("ttft_ms") is not None]
        run.results.append(SideResult(side, model, k, qset.score(answers), answers,
                                      statistics.median(times) if times else None))


def _writer(qset, results, model, side, k, bar):
    def done(question: Question, answer: str, ttft_ms: float | None) -> None:
        line = record(qset.benchmark, model, side, k, question, answer, ttft_ms)
        results.append(line)
        results.lines[(qset.benchmark, model, k, question.key)] = line
        bar.update(1)
    return done


def run_reference(cfg: EvalConfig, qset: QuestionSet, reference: Reference, results, run: EvalRun,
                  stop: StopOnSignal) -> None:
    model = reference_model(cfg.ckpt)
    have = answers_of(results, qset.benchmark, model, None)
    todo = [q for q in qset.questions if q.key not in have]
    bar = _bar(cfg, f"{qset.benchmark} reference", len(qset.questions), len(qset.questions) - len(todo))
    done = _writer(qset, results, model, "reference", None, bar)
    try:
        if todo:
            for q, answer in zip(todo, reference(((q.image, q.prompt) for q in todo), None)):
                done(q, answer, None)
                if stop.requested:
                    break
    finally:
        bar.close()
    _collect(qset, results, run, "reference", model, None)


def run_bundle(cfg: EvalConfig, qset: QuestionSet, results, run: EvalRun, stop: StopOnSignal) -> None:
    opened = Model.open(cfg.bundle, device=cfg.device, threads=cfg.threads)
    engine = None
    try:
        model, budgets = bundle_model(opened, cfg.image_tokens, cfg.kv_type)
        for budget in budgets:
            k = budget.graph_tokens  # None: every token
            have = answers_of(results, qset.benchmark, model, k)
            todo = [q for q in qset.questions if q.key not in have]
            if todo and not stop.requested:
                engine = engine or open_engine(opened, qset.questions, cfg.parallel, cfg.max_tokens,
                                              cfg.kv_type)
                bar = _bar(cfg, f"{qset.benchmark} bundle K={budget.n_tokens}", len(qset.questions),
                           len(qset.questions) - len(todo))
                try:
                    run.failed += answer_with_engine(engine, todo, budget, cfg.max_tokens,
                                                     _writer(qset, results, model, "bundle", k, bar), stop)
                finally:
                    bar.close()
            _collect(qset, results, run, "bundle", model, k)
    finally:
        if engine is not None:
            engine.close()
        opened.close()



