"""What every benchmark reader hands the runner: questions with an image and a prompt, and the one-line errors
that name the file and the key when the files are not what LLaVA's layout says."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
OPTION_LETTER = "Answer with the option's letter from the given choices directly."  # its multiple-choice suffix


@dataclass
class Question:
    key: str  # unique in its benchmark: what a predictions line is matched by
    image: str | bytes  # a file path, or the image's bytes (MMBench keeps them in its TSV)
    prompt: str  # the user text, suffix included, without "<image>" (the engine puts the image first)
    meta: dict = field(default_factory=dict)  # what the scorer needs: labels, categories, options


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line (blank lines skipped); a bad line is a UserError naming the file and line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None


def field_of(record: dict, key: str, path: Path, where: str, kind: type | tuple = str):
    """record[key], checked: a missing or mistyped key is one line naming the file, the record and the key."""
    if key not in record:
        raise UserError(f"{path}: {where} has no {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{path}: {where}: {key!r} must be {names}, not {value!r}")
    return value


def image_file(root: Path, relative: str, path: Path, where: str) -> str:
    """The image a record names, which must exist under root."""
    image = root / relative
    if not image.is_file():
        raise UserError(f"{path}: {where}: image {relative!r} not found under {root}")
    return os.fspath(image)


def need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: not a directory ({what})")
    return path


def ratio(hits: int, total: int) -> float:
    return hits / total if total else 0.0
