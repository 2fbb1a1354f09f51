"""MMBench as LLaVA-1.5 asks it: the dev TSV (index, question, hint, A-D, answer, category, l2-category, image as
base64), options cut at the first missing one ('nan', 'none' or empty, as LLaVA's model_vqa_mmbench reads them),
the hint before the question, "A. …" lines after it, then LLaVA's letter suffix. Every question is asked once per
rotation of its options: single-pass accuracy counts rotation 0, circular accuracy every rotation right."""

from __future__ import annotations

import base64
import binascii
import csv
import re
import sys
from pathlib import Path

from ..errors import UserError
from .items import OPTION_LETTER, Question, ratio

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("index", "question", "hint", "A", "B", "answer", "category", "image")


def missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("", "nan", "none")


def tsv_file(data: Path) -> Path:
    """DATA is the TSV, or a folder holding exactly one (LLaVA's eval/mmbench/)."""
    if data.is_file():
        return data
    found = sorted(data.glob("*.tsv")) if data.is_dir() else []
    if len(found) != 1:
        raise UserError(f"{data}: give the MMBench TSV (mmbench_dev_20230712.tsv) or a folder with exactly one .tsv "
                        f"(found {len(found)})")
    return found[0]


def read_rows(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # the base64 images are megabytes long
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")  # quoted as pandas writes it (LLaVA reads it with read_table)
        absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise UserError(f"{path}: no column {absent[0]!r} (an MMBench TSV has {', '.join(COLUMNS)}, C, D)")
        return list(reader)


def image_bytes(rows_by_index: dict[str, dict], row: dict, path: Path) -> bytes:
    value = row["image"]
    if value.isdigit() and len(value) < 16 and value in rows_by_index:  # a later copy names an earlier row's image
        value = rows_by_index[value]["image"]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{path}: index {row['index']}: 'image' is not base64") from None


def prompt_of(row: dict, options: list[str]) -> str:
    text = row["question"] if missing(row["hint"]) else f"{row['hint']}\n{row['question']}"
    text += "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
    return f"{text}\n{OPTION_LETTER}"


def load(data: Path) -> list[Question]:
    path = tsv_file(data)
    rows = read_rows(path)
    by_index = {row["index"]: row for row in rows}
    questions = []
    for row in rows:
        options = []
        for letter in LETTERS:
            if missing(row.get(letter)):
                break
            options.append(row[letter])
        answer = row["answer"].strip()
        if answer not in LETTERS[: len(options)]:
            raise UserError(f"{path}: index {row['index']}: 'answer' {answer!r} is not one of its options "
                            f"{', '.join(LETTERS[: len(options)]) or '(none)'}")
        image = image_bytes(by_index, row, path)
        right = LETTERS.index(answer)
        for r in range(len(options)):
            rotated = options[r:] + options[:r]
            questions.append(Question(f"{row['index']}/{r}", image, prompt_of(row, rotated), {
                "index": row["index"], "rotation": r, "category": row["category"], "options": rotated,
                "answer": LETTERS[(right - r) % len(options)]}))
    return questions


def letter_of(answer: str, options: list[str]) -> str | None:
    """The option an answer picks: a leading letter ("B", "B.", "B. cat"), else an answer that is one option's
    text (MMBench's rule-based matching, before its GPT fallback, which is not used here)."""
    letters = LETTERS[: len(options)]
    m = re.match(r"\s*\(?([A-D])(?:[).:,\s]|$)", answer)
    if m and m.group(1) in letters:
        return m.group(1)
    norm = answer.strip().rstrip(".").strip().lower()
    hits = [letter for letter, option in zip(letters, options) if option.strip().rstrip(".").strip().lower() == norm]
    return hits[0] if len(hits) == 1 else None


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, float]:
    right: dict[str, list[bool]] = {}
    single: dict[str, bool] = {}
    category: dict[str, str] = {}
    for q in questions:
        ok = letter_of(answers[q.key], q.meta["options"]) == q.meta["answer"]
        right.setdefault(q.meta["index"], []).append(ok)
        category[q.meta["index"]] = q.meta["category"]
        if q.meta["rotation"] == 0:
            single[q.meta["index"]] = ok
    out = {"single": ratio(sum(single.values()), len(single)),
           "circular": ratio(sum(all(v) for v in right.values()), len(right))}
    for name in sorted(set(category.values())):
        indices = [i for i, c in category.items() if c == name]
        out[f"{name}/single"] = ratio(sum(single.get(i, False) for i in indices), len(indices))
        out[f"{name}/circular"] = ratio(sum(all(right[i]) for i in indices), len(indices))
    return out


HEADLINE = ("circular", "single")
