"""SEED-Bench as LLaVA-1.5 reads it: `SEED-Bench.json` (question_type name → id; questions with question_id,
answer, question_type_id, data_type) joined by question_id with LLaVA's `llava-seed-bench.jsonl` (image, text,
question_id), the images under `SEED-Bench-image/` and the video middle frames under `SEED-Bench-video-image/`.
A video question whose frame is absent is left out. Scored as LLaVA's convert_seed_for_submission.py: the answer
must be the letter exactly; accuracy per question type, per data type and overall."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .items import Question, field_of, image_file, need_dir, ratio, read_json, read_jsonl

ANNOTATIONS = "SEED-Bench.json"
PROMPTS = "llava-seed-bench.jsonl"


def annotations(path: Path) -> dict[str, dict]:
    """question_id → {answer, type (its name), data_type}."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object with 'question_type' and 'questions'")
    types = field_of(data, "question_type", path, "the file", dict)
    names = {v: k for k, v in types.items()}
    out = {}
    for n, q in enumerate(field_of(data, "questions", path, "the file", list)):
        where = f"questions[{n}]"
        if not isinstance(q, dict):
            raise UserError(f"{path}: {where} is not an object")
        qid = str(field_of(q, "question_id", path, where, (int, str)))
        type_id = field_of(q, "question_type_id", path, where, int)
        if type_id not in names:
            raise UserError(f"{path}: {where}: question_type_id {type_id} is not in 'question_type'")
        out[qid] = {"answer": field_of(q, "answer", path, where), "type": names[type_id],
                    "data_type": q.get("data_type", "image")}
    return out


def load(data: Path) -> list[Question]:
    need_dir(data, f"SEED-Bench: the folder with {ANNOTATIONS}, {PROMPTS} and SEED-Bench-image/")
    truth = annotations(data / ANNOTATIONS)
    path = data / PROMPTS
    questions = []
    for n, record in enumerate(read_jsonl(path), 1):
        where = f"line {n}"
        qid = str(field_of(record, "question_id", path, where, (int, str)))
        if qid not in truth:
            raise UserError(f"{path}: {where}: question_id {qid} is not in {data / ANNOTATIONS}")
        image = field_of(record, "image", path, where)
        if truth[qid]["data_type"] == "video" and not (data / image).is_file():
            continue  # LLaVA's frames of the videos are optional
        questions.append(Question(qid, image_file(data, image, path, where), field_of(record, "text", path, where),
                                  dict(truth[qid])))
    return questions


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, float]:
    right = {q.key: answers[q.key] == q.meta["answer"] for q in questions}
    out = {"overall": ratio(sum(right.values()), len(right))}
    for field in ("data_type", "type"):
        for name in sorted({q.meta[field] for q in questions}):
            chosen = [q.key for q in questions if q.meta[field] == name]
            out[name] = ratio(sum(right[k] for k in chosen), len(chosen))
    return out


HEADLINE = ("overall",)
