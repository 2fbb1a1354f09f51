"""Score an edge bundle on a shapes-world test set, asking each question as the reference evaluation does
(a fresh one-turn conversation per question, greedy). Each image is encoded once; its KV is reused. No torch."""

from __future__ import annotations

import os
from pathlib import Path

from ..scoring import EvalResult, load_test_records, question_of, score_predictions
from .sampling import SamplingConfig
from .session import ChatSession


def answer_with_bundle(
    session: ChatSession, records: list[dict], image_root: Path, max_new_tokens: int = 24, progress: bool = True
) -> list[str]:
    from tqdm import tqdm

    by_image: dict[Path, list[int]] = {}
    for i, record in enumerate(records):
        by_image.setdefault(image_root / record["image"], []).append(i)
    sampling = SamplingConfig(max_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = [""] * len(records)
    with tqdm(total=len(records), desc="eval (bundle)", unit="q", disable=not progress) as bar:
        for path, indices in by_image.items():
            session.set_image(path)
            for i in indices:
                session.reset()
                answers[i] = session.answer(question_of(records[i]), sampling).text
                bar.update(1)
    return answers


def evaluate_bundle(
    bundle_dir: str | os.PathLike | None,
    data_json: str | os.PathLike,
    limit: int | None = None,
    threads: int | None = None,
    kv_type: str = "f16",
    progress: bool = True,
) -> EvalResult:
    records = load_test_records(data_json, limit)
    session = ChatSession.open(bundle_dir, threads=threads, kv_type=kv_type)
    try:
        predictions = answer_with_bundle(session, records, Path(data_json).parent, progress=progress)
    finally:
        session.close()
    return score_predictions(records, predictions)
