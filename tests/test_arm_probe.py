"""bench/arm's probe runs on x86 too (the other side of the comparison): its split answers resume after an
interruption, and the comparison reads what it writes. The emulated run itself is a script, not a test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llava_edge.eval import shapes_questions
from llava_edge.eval.engine_runner import answers_of_bundle
from llava_edge.train.shapes import build_dataset

ARM = Path(__file__).resolve().parents[1] / "bench" / "arm"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"arm_{name}", ARM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm-shapes")
    build_dataset(out, 0, 2, seed=3, progress=False)
    return out


def test_split_answers_resume_and_equal_the_engines(shapes_split, tmp_path):
    probe = script("probe")
    out = tmp_path / "test_answers.jsonl"
    questions, first = probe.test_answers(shapes_split, 4, out)
    assert [q.key for q in questions] == [q.key for q in shapes_questions.load(shapes_split)[:4]]
    # an interrupted run: the last answer was never written; the rerun asks that one only
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    lost = json.loads(lines[-1])["key"]
    _, again = probe.test_answers(shapes_split, 4, out)
    assert again == first
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["key"] == lost
    assert first == answers_of_bundle(None, questions, parallel=1, max_tokens=24)


def test_comparison_lists_the_answers_that_differ(shapes_split):
    compare = script("compare")
    questions = shapes_questions.load(shapes_split)[:3]
    ids = [q.key for q in questions]
    x86 = {"examples": {"a": "One"}, "test": {"ids": ids, "answers": ["x", "y", "z"], "accuracy": 0.5}}
    arm = {"examples": {"a": "Two"}, "test": {"ids": ids[:2], "answers": ["x", "w"]}}
    rows = compare.answer_rows(x86, arm, shapes_split / "test.json")
    assert rows[0].startswith("- examples/: 0 of 1 answers equal")
    assert "the first 2 of its 3 questions): 1 of 2 answers equal" in rows[1]
    assert any(ids[1] in r and "'y'" in r and "'w'" in r for r in rows)
