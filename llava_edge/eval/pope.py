"""POPE as LLaVA-1.5 lays it out: `llava_pope_test.jsonl` (question_id, image, text, category), the labels in
`coco/coco_pope_{random,popular,adversarial}.json` (one JSON object per line: question_id, image, text, label) and
the COCO `val2014/` images. Scored as LLaVA's eval_pope.py reads an answer (its first sentence; "no"/"not" is no),
per category, then the mean of each metric over the categories."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..scoring import pope_f1
from .items import Question, field_of, image_file, need_dir, read_jsonl

QUESTIONS = "llava_pope_test.jsonl"
CATEGORIES = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def label_file(data: Path, category: str) -> Path:
    return data / "coco" / f"coco_pope_{category}.json"


def load(data: Path) -> list[Question]:
    need_dir(data, "POPE: the folder with llava_pope_test.jsonl, coco/ and val2014/")
    path = data / QUESTIONS
    images = data / "val2014"
    questions = []
    for n, record in enumerate(read_jsonl(path), 1):
        where = f"line {n}"
        qid = field_of(record, "question_id", path, where, (int, str))
        category = field_of(record, "category", path, where)
        if category not in CATEGORIES:
            raise UserError(f"{path}: {where}: 'category' must be one of {', '.join(CATEGORIES)}, not {category!r}")
        image = field_of(record, "image", path, where)
        text = field_of(record, "text", path, where)
        questions.append(Question(str(qid), image_file(images, image, path, where), text,
                                  {"category": category, "image": image}))
    for category in sorted({q.meta["category"] for q in questions}, key=CATEGORIES.index):
        attach_labels([q for q in questions if q.meta["category"] == category], label_file(data, category))
    return questions


def attach_labels(questions: list[Question], path: Path) -> None:
    """Each question's label from its category's file, joined by question_id (never by line position). Where the
    ids of the two files do not match (POPE's files count from 1 in each category), by (image, question text)."""
    by_id, by_content = {}, {}
    for n, record in enumerate(read_jsonl(path), 1):
        label = field_of(record, "label", path, f"line {n}")
        if label not in ("yes", "no"):
            raise UserError(f"{path}: line {n}: 'label' must be 'yes' or 'no', not {label!r}")
        qid = str(field_of(record, "question_id", path, f"line {n}", (int, str)))
        image, text = field_of(record, "image", path, f"line {n}"), field_of(record, "text", path, f"line {n}")
        by_id[qid] = (image, label)
        by_content[(image, text.strip())] = label
    ids_match = all(by_id.get(q.key, (None,))[0] == q.meta["image"] for q in questions)
    for q in questions:
        if ids_match:
            q.meta["label"] = by_id[q.key][1]
            continue
        label = by_content.get((q.meta["image"], q.prompt.split("\n")[0].strip()))
        if label is None:
            raise UserError(f"{path}: no label for question_id {q.key} "
                            f"({q.meta['image']}: {q.prompt.splitlines()[0]!r})")
        q.meta["label"] = label


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, float]:
    """{category/metric: value} for each category present, then mean/metric over them."""
    out: dict[str, float] = {}
    present = [c for c in CATEGORIES if any(q.meta["category"] == c for q in questions)]
    for category in present:
        chosen = [q for q in questions if q.meta["category"] == category]
        metrics = pope_f1([answers[q.key] for q in chosen], [q.meta["label"] for q in chosen])
        out.update({f"{category}/{m}": metrics[m] for m in METRICS})
    for m in METRICS:
        if present:
            out[f"mean/{m}"] = sum(out[f"{c}/{m}"] for c in present) / len(present)
    return out


HEADLINE = ("mean/f1", "mean/accuracy", "mean/yes_ratio")
