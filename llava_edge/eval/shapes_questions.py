"""The shapes world's test set (a LLaVA json with question_type and answer per record, images beside it), scored
by the world's answer rules in scoring.py: accuracy per question type, and POPE's metrics on "exists"."""

from __future__ import annotations

from pathlib import Path

from ..scoring import load_test_records, question_of, score_predictions
from .items import Question, image_file

TEST_JSON = "test.json"


def load(data: Path) -> list[Question]:
    path = data / TEST_JSON if data.is_dir() else data
    records = load_test_records(path)
    return [Question(f"{i}:{record.get('id', '')}", image_file(path.parent, record["image"], path, f"record {i}"),
                     question_of(record), {"record": record}) for i, record in enumerate(records)]


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, float]:
    result = score_predictions([q.meta["record"] for q in questions], [answers[q.key] for q in questions])
    out = {"accuracy": result.accuracy}
    out.update({f"{t}/accuracy": s.accuracy for t, s in result.per_type.items()})
    if result.pope is not None:
        out.update({"pope/f1": result.pope.f1, "pope/yes_ratio": result.pope.yes_ratio})
    return out


HEADLINE = ("accuracy",)
