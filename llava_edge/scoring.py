"""Scoring answers on a shapes-world test set: the answer rules, accuracy per question type and POPE-style
yes/no metrics. Shared by the reference evaluation (train/evaluate.py) and `llava-edge eval shapes`
(eval/shapes.py), so a leaf: no torch, nothing from train/."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .conversation import IMAGE_TOKEN
from .errors import UserError
from .llava_json import load_llava_json

QUESTION_TYPES = ("color", "shape", "count", "exists", "describe")  # docs/design.md, "The shapes world"
POPE_TYPE = "exists"  # the yes/no question type scored with POPE's metrics


# ----------------------------------------------------------------------------- answer rules


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_DIGIT_WORDS = {"1": "one", "2": "two", "3": "three"}


def score_answer(question_type: str, prediction: str, answer: str) -> bool:
    """Exact match after lower-casing and dropping punctuation and extra whitespace
    (for "describe" too: the whole caption must match). Counts also accept digits."""
    pred, gold = _normalize(prediction), _normalize(answer)
    if question_type == "count":
        pred, gold = _DIGIT_WORDS.get(pred, pred), _DIGIT_WORDS.get(gold, gold)
    return pred == gold


def pope_label(text: str) -> str:
    """LLaVA's POPE rule: "no" if the first sentence has the word "No", "no" or "not", else "yes"."""
    first = text.split(".")[0].replace(",", "")
    words = first.split()  # LLaVA splits on " " only; any whitespace also catches "No\n"
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_f1(preds: list[str], golds: list[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class. preds are model texts (mapped with
    pope_label); golds are "yes"/"no" in any case."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} labels")
    p = [pope_label(x) == "yes" for x in preds]
    g = [x.strip().lower() == "yes" for x in golds]
    tp = sum(a and b for a, b in zip(p, g))
    fp = sum(a and not b for a, b in zip(p, g))
    tn = sum(not a and not b for a, b in zip(p, g))
    fn = sum(not a and b for a, b in zip(p, g))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(p)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / n if n else 0.0,
        "yes_ratio": sum(p) / n if n else 0.0,
    }


# ----------------------------------------------------------------------------- scores


@dataclass
class TypeScore:
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class PopeScore:
    """POPE metrics with "yes" as the positive class, on LLaVA's rule for reading yes/no from a text."""

    n: int
    f1: float
    precision: float
    recall: float
    accuracy: float
    yes_ratio: float


@dataclass
class SamplePrediction:
    id: str
    question_type: str
    question: str
    answer: str
    prediction: str
    correct: bool


@dataclass
class EvalResult:
    per_type: dict[str, TypeScore]  # in QUESTION_TYPES order, then any other types sorted
    overall: TypeScore
    pope: PopeScore | None  # None when the set has no "exists" questions
    samples: list[SamplePrediction] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.overall.accuracy

    def summary(self) -> dict:
        """Everything but the samples, as plain json-able values."""
        return {
            "n": self.overall.n,
            "accuracy": self.overall.accuracy,
            "per_type": {t: {"n": s.n, "correct": s.correct, "accuracy": s.accuracy} for t, s in self.per_type.items()},
            "pope": asdict(self.pope) if self.pope is not None else None,
        }


def question_of(record: dict) -> str:
    """The first human turn without its "<image>" marker, as LLaVA's preprocess_multimodal takes it out
    (`replace("<image>", "").strip()`) before putting "<image>\\n" back in front."""
    return record["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()


def answer_of(record: dict) -> str:
    return record["answer"] if "answer" in record else record["conversations"][1]["value"]


def question_type_of(record: dict) -> str:
    return record.get("question_type", "unknown")


def load_test_records(data_json: str | os.PathLike, limit: int | None = None) -> list[dict]:
    path = Path(data_json)
    records = load_llava_json(path)
    for index, record in enumerate(records):
        if "image" not in record:
            raise UserError(f"{path}: record {index} (id {record.get('id')!r}) has no image")
    return records if limit is None else records[:limit]


def score_predictions(records: list[dict], predictions: list[str]) -> EvalResult:
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    samples = []
    for record, prediction in zip(records, predictions):
        qtype, answer = question_type_of(record), answer_of(record)
        samples.append(SamplePrediction(
            id=str(record.get("id", "")),
            question_type=qtype,
            question=question_of(record),
            answer=answer,
            prediction=prediction,
            correct=score_answer(qtype, prediction, answer),
        ))
    present = {s.question_type for s in samples}
    order = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))
    per_type = {}
    for qtype in order:
        of_type = [s for s in samples if s.question_type == qtype]
        per_type[qtype] = TypeScore(len(of_type), sum(s.correct for s in of_type))
    overall = TypeScore(len(samples), sum(s.correct for s in samples))
    yes_no = [s for s in samples if s.question_type == POPE_TYPE]
    pope = None
    if yes_no:
        metrics = pope_f1([s.prediction for s in yes_no], [s.answer for s in yes_no])
        pope = PopeScore(n=len(yes_no), **metrics)
    return EvalResult(per_type, overall, pope, samples)


# ----------------------------------------------------------------------------- reporting


def format_table(result: EvalResult) -> str:
    """Markdown: accuracy per question type and overall, then the POPE metrics of the yes/no questions."""
    lines = ["| type | n | accuracy |", "|---|---:|---:|"]
    for qtype, score in result.per_type.items():
        lines.append(f"| {qtype} | {score.n} | {100 * score.accuracy:.1f}% |")
    lines.append(f"| **overall** | {result.overall.n} | {100 * result.overall.accuracy:.1f}% |")
    if result.pope is not None:
        p = result.pope
        lines += [
            "",
            f"| POPE ({POPE_TYPE}) | n | F1 | precision | recall | accuracy | yes-ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
            (f"| yes = positive | {p.n} | {p.f1:.3f} | {p.precision:.3f} | {p.recall:.3f} | {p.accuracy:.3f} "
            f"| {p.yes_ratio:.3f} |"),
        ]
    return "\n".join(lines)


def write_predictions(result: EvalResult, path: str | os.PathLike) -> Path:
    """One json object per line: id, question_type, question, answer, prediction, correct."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for sample in result.samples:
            f.write(json.dumps(asdict(sample), ensure_ascii=False) + "\n")
    return path
