"""LLaVA's json data format: a list of {"id", "image"?, "conversations": [{"from", "value"}, ...]}, read and
checked record by record (no torch: the runtime's evaluation reads it too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conversation import IMAGE_TOKEN
from .errors import UserError

ROLES = ("human", "gpt")


def load_llava_json(path: str | os.PathLike) -> list[dict]:
    """Read a LLaVA json file: a list of {"id", "image"?, "conversations": [{"from", "value"}, ...]}.

    Each record must alternate human/gpt turns starting with human, with non-empty string values; a record
    with "image" has exactly one "<image>" (in a human turn), a record without has none.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable json file ({' '.join(str(e).split())})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a json list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem:
            raise UserError(f"{path}: record {_record_name(record, index)}: {problem}")
    return records


def _record_name(record: object, index: int) -> str:
    if isinstance(record, dict) and "id" in record:
        return f"{index} (id {record['id']!r})"
    return str(index)


def record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "is not an object"
    if "image" in record and not (isinstance(record["image"], str) and record["image"]):
        return '"image" must be a non-empty string'
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return '"conversations" must be a non-empty list'
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"turn {i} must be an object with a non-empty string \"value\""
        if turn.get("from") != ROLES[i % 2]:
            return f"turn {i} is from {turn.get('from')!r}, expected {ROLES[i % 2]!r} (turns alternate human/gpt)"
    if len(turns) % 2:
        return "the last turn must be from gpt"
    n_images = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if "image" in record and (n_images != 1 or IMAGE_TOKEN not in "".join(t["value"] for t in turns[::2])):
        return f'has an "image" but {n_images} "<image>" placeholders (expected one, in a human turn)'
    if "image" not in record and n_images:
        return 'has "<image>" in its text but no "image"'
    return None
