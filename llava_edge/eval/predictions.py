"""The --predictions JSONL: one line per answer (benchmark, model, side, image_tokens, question_id, answer,
ttft_ms), appended by caption's writer, so that a run killed at any point (Ctrl-C, kill -9) resumes where it
stopped and never asks a question twice. A line is done by (benchmark, model, image_tokens, question_id): one
file can hold both sides and every K of a sweep."""

from __future__ import annotations

import os
from pathlib import Path

from ..caption.results import ResultFile
from ..errors import UserError
from .items import Question, read_jsonl


def line_key(record: dict) -> tuple:
    return record["benchmark"], record["model"], record["image_tokens"], str(record["question_id"])


def open_predictions(path: str | os.PathLike) -> ResultFile:
    results = ResultFile(path, key=line_key, option="--predictions")
    results.open()
    return results


def answers_of(results: ResultFile, benchmark: str, model: str, image_tokens: int | None) -> dict[str, dict]:
    """question_id → its line, for one side at one K."""
    return {key[3]: line for key, line in results.lines.items() if key[:3] == (benchmark, model, image_tokens)}


def record(benchmark: str, model: str, side: str, image_tokens: int | None, question: Question, answer: str,
           ttft_ms: float | None) -> dict:
    return {"benchmark": benchmark, "model": model, "side": side, "image_tokens": image_tokens,
            "question_id": question.key, "answer": answer, "ttft_ms": ttft_ms}


def compared_answers(path: str | os.PathLike, benchmark: str, questions: list[Question]) -> tuple[str, dict[str, str]]:
    """The answers of an earlier run (--compare FILE): its reference side if it has one, else the one model it
    holds at all image tokens; (its model, question_id → answer). Every question must be there."""
    path = Path(path)
    lines = [r for r in read_jsonl(path) if r.get("benchmark") == benchmark and r.get("image_tokens") is None]
    models = list(dict.fromkeys(r.get("model") for r in lines if r.get("side") == "reference")) or \
        list(dict.fromkeys(r.get("model") for r in lines))
    if len(models) != 1:
        raise UserError(f"{path}: --compare needs the answers of one model to {benchmark} at all image tokens "
                        f"(a reference run's --predictions); found {len(models)}")
    answers = {str(r.get("question_id")): r.get("answer") for r in lines if r.get("model") == models[0]}
    for q in questions:
        if not isinstance(answers.get(q.key), str):
            raise UserError(f"{path}: no answer to {benchmark} question_id {q.key!r}")
    return models[0], answers
