"""Score a checkpoint on a LLaVA-format test set (the shapes world's test.json): accuracy per question type
and POPE-style yes/no metrics on the "exists" questions.

Each question is asked exactly as LLaVA's `model_vqa` asks it: the checkpoint's template around
"<image>\\n{question}", SentencePiece ids with BOS and the image placeholder, greedy decoding, the decoded
text stripped. Images are encoded once each, however many questions are asked about them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import LlavaConfig
from ..conversation import IMAGE_TOKEN, render_prompt, tokenize_prompt
from ..errors import CheckpointError, UserError
from ..image import load_image, preprocess
from ..reference.checkpoint import load_checkpoint
from ..reference.llava import Llava
from .data import load_llava_json
from .shapes import QUESTION_TYPES, pope_f1, score_answer

POPE_TYPE = "exists"  # the yes/no question type scored with POPE's metrics


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


# ----------------------------------------------------------------------------- records


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


# ----------------------------------------------------------------------------- answering


def _sentencepiece(tokenizer_path: str | os.PathLike):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def prompt_ids(question: str, config: LlavaConfig, encode: Callable[[str], list[int]]) -> list[int]:
    """The reference prompt for one question: template, "<image>\\n" first, BOS, the image placeholder."""
    prompt = render_prompt(config.template, [(question, None)], image=True)
    return tokenize_prompt(prompt, encode, config.text.bos_token_id, config.image_token_index)


def pixel_values(image_path: Path, config: LlavaConfig) -> np.ndarray:
    """[3, S, S] float32, preprocessed as the checkpoint's config says."""
    image = load_image(image_path)
    return preprocess(image, config.vision.image_size, config.image_mean, config.image_std, config.aspect)


def answer_questions(
    model: Llava,
    config: LlavaConfig,
    tokenizer_path: str | os.PathLike,
    records: list[dict],
    image_root: str | os.PathLike,
    max_new_tokens: int = 24,
    image_batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy answers, one per record, in record order.

    Records are grouped by image path; the images are encoded `image_batch_size` at a time and each
    image's embeddings serve all the questions about it, then are dropped (memory stays bounded).
    """
    from tqdm import tqdm

    sp = _sentencepiece(tokenizer_path)
    n_pieces = sp.get_piece_size()
    image_root = Path(image_root)
    by_image: dict[Path, list[int]] = {}
    for i, record in enumerate(records):
        by_image.setdefault(image_root / record["image"], []).append(i)

    param = next(model.vision.parameters())
    device, dtype = param.device, param.dtype
    answers: list[str | None] = [None] * len(records)
    images = list(by_image)
    bar = tqdm(total=len(records), desc="eval", unit="q", disable=not progress)
    try:
        for start in range(0, len(images), max(1, image_batch_size)):
            chunk = images[start : start + max(1, image_batch_size)]
            pixels = np.stack([pixel_values(path, config) for path in chunk])
            with torch.no_grad():
                embeds = model.encode_images(torch.from_numpy(pixels).to(device, dtype))
            for path, image_embeds in zip(chunk, embeds):
                for i in by_image[path]:
                    ids = prompt_ids(question_of(records[i]), config, sp.encode)
                    out = model.generate(
                        torch.tensor([ids], device=device),
                        max_new_tokens=max_new_tokens,
                        temperature=0.0,
                        eos_token_id=config.text.eos_token_id,
                        image_embeds=image_embeds[None],
                    )
                    # ids past the SentencePiece vocab are added specials (llava-hf's <image>, <pad>): skipped
                    answers[i] = sp.decode([t for t in out if 0 <= t < n_pieces]).strip()
                    bar.update(1)
    finally:
        bar.close()
    return answers  # type: ignore[return-value]


# ----------------------------------------------------------------------------- scoring


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


def evaluate(
    ckpt: str | os.PathLike,
    data_json: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    max_new_tokens: int = 24,
    image_batch_size: int = 8,
) -> EvalResult:
    """Load the checkpoint (and its tokenizer.model), answer every record of data_json, score."""
    records = load_test_records(data_json, limit)
    loaded = load_checkpoint(ckpt, vision_tower=vision_tower)
    if loaded.tokenizer_path is None:
        raise CheckpointError(f"{loaded.path}: no tokenizer.model in the checkpoint")
    predictions = answer_questions(
        loaded.model, loaded.config, loaded.tokenizer_path, records, Path(data_json).parent,
        max_new_tokens=max_new_tokens, image_batch_size=image_batch_size, progress=progress,
    )
    return score_predictions(records, predictions)


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
            f"| yes = positive | {p.n} | {p.f1:.3f} | {p.precision:.3f} | {p.recall:.3f} | {p.accuracy:.3f} "
            f"| {p.yes_ratio:.3f} |",
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
