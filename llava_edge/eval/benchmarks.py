"""The benchmarks `llava-edge eval` knows: each a module with load(data) → questions, score(questions, answers)
→ {metric: value} and HEADLINE (the metrics the paper's table shows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import UserError
from . import mmbench, mme, pope, seed, shapes_questions
from .items import Question

BENCHMARKS: dict[str, ModuleType] = {"pope": pope, "mme": mme, "mmbench": mmbench, "seed": seed, "shapes": shapes_questions}


@dataclass
class QuestionSet:
    benchmark: str
    questions: list[Question]

    def score(self, answers: dict[str, str]) -> dict[str, float]:
        return BENCHMARKS[self.benchmark].score(self.questions, answers)

    @property
    def headline(self) -> tuple[str, ...]:
        return BENCHMARKS[self.benchmark].HEADLINE


def group_of(question: Question) -> str:
    """What --limit counts: an MMBench question with all its rotations is one."""
    return str(question.meta.get("index", question.key))


def load_benchmark(name: str, data: str | Path, limit: int | None = None) -> QuestionSet:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}: one of {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    data = Path(data)
    if not data.exists():
        raise UserError(f"{data}: not found")
    questions = BENCHMARKS[name].load(data)
    if limit is not None:
        groups = list(dict.fromkeys(group_of(q) for q in questions))[:limit]
        keep = set(groups)
        questions = [q for q in questions if group_of(q) in keep]
    if not questions:
        raise UserError(f"{data}: no {name} questions found")
    return QuestionSet(name, questions)
