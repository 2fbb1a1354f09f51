"""Score a checkpoint on a LLaVA-format test set (the shapes world's test.json): accuracy per question type
and POPE-style yes/no metrics on the "exists" questions.

Each question is asked exactly as LLaVA's `model_vqa` asks it: the checkpoint's template around
"<image>\\n{question}", SentencePiece ids with BOS and the image placeholder, greedy decoding, the decoded
text stripped. Images are encoded once each, however many questions are asked about them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..architectures import LlavaConfig
from ..conversation import render_prompt, tokenize_prompt
from ..errors import CheckpointError
from ..image import load_image, preprocess
from ..reference.checkpoint import load_checkpoint
from ..reference.llava import Llava
from ..scoring import EvalResult, load_test_records, question_of, score_predictions

# ----------------------------------------------------------------------------- records


# ----------------------------------------------------------------------------- answering


def _sentencepiece(tokenizer_path: str | os.PathLike):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def prompt_ids(question: str, config: LlavaConfig, encode: Callable[[str], list[int]]) -> list[int]:
    """The reference prompt for one question: template, "<image>\\n" first, BOS, the image placeholder."""
    prompt = render_prompt(config.template, [(question, None)], image=True)
    return tokenize_prompt(prompt, encode, config.text.bos_token_id, config.image_token_index)


def pixel_values(image: Path | bytes, config: LlavaConfig) -> np.ndarray:
    """[3, S, S] float32 of an image file (or its bytes), preprocessed as the checkpoint's config says."""
    image = load_image(image)
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
    image_tokens: int | None = None,
) -> list[str]:
    """Greedy answers, one per record, in record order; image_tokens: K image tokens by token reduction
    (None: all).

    Records are grouped by image path; the images are encoded `image_batch_size` at a time and each
    image's embeddings serve all the questions about it, then are dropped (memory stays bounded).
    """
    from tqdm import tqdm

    sp = _sentencepiece(tokenizer_path)
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
                embeds = model.encode_images(torch.from_numpy(pixels).to(device, dtype), image_tokens)
            for path, image_embeds in zip(chunk, embeds):
                for i in by_image[path]:
                    answers[i] = greedy_answer(model, config, sp, question_of(records[i]), image_embeds,
                                               max_new_tokens)
                    bar.update(1)
    finally:
        bar.close()
    return answers  # type: ignore[return-value]


def greedy_answer(model: Llava, config: LlavaConfig, sp, question: str, image_embeds: torch.Tensor,
                  max_new_tokens: int) -> str:
    """One question about one encoded image ([K, n_embd]), answered greedily, the decoded text stripped."""
    ids = prompt_ids(question, config, sp.encode)
    device = image_embeds.device
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new_tokens, temperature=0.0,
                         eos_token_id=config.text.eos_token_id, image_embeds=image_embeds[None])
    # ids past the SentencePiece vocab are added specials (llava-hf's <image>, <pad>): skipped
    return sp.decode([t for t in out if 0 <= t < sp.get_piece_size()]).strip()


def answer_prompts(ckpt: str | os.PathLike, items: Iterable[tuple[str | bytes, str]],
                   vision_tower: str | os.PathLike | None = None, image_tokens: int | None = None,
                   max_new_tokens: int = 128) -> Iterator[str]:
    """Greedy answers to (image file or bytes, question) pairs, one at a time in order (the benchmarks' reference
    side: `llava-edge eval --ckpt`). An image asked about by consecutive questions is encoded once."""
    loaded = load_checkpoint(ckpt, vision_tower=vision_tower)
    if loaded.tokenizer_path is None:
        raise CheckpointError(f"{loaded.path}: no tokenizer.model in the checkpoint")
    model, config, sp = loaded.model, loaded.config, _sentencepiece(loaded.tokenizer_path)
    param = next(model.vision.parameters())
    last_image, embeds = None, None
    for image, question in items:
        if embeds is None or image != last_image:
            with torch.no_grad():
                pixels = torch.from_numpy(pixel_values(image, config)[None]).to(param.device, param.dtype)
                embeds = model.encode_images(pixels, image_tokens)[0]
            last_image = image
        yield greedy_answer(model, config, sp, question, embeds, max_new_tokens)


# ----------------------------------------------------------------------------- scoring


def evaluate(
    ckpt: str | os.PathLike,
    data_json: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    max_new_tokens: int = 24,
    image_batch_size: int = 8,
    image_tokens: int | None = None,
) -> EvalResult:
    """Load the checkpoint (and its tokenizer.model), answer every record of data_json, score."""
    records = load_test_records(data_json, limit)
    loaded = load_checkpoint(ckpt, vision_tower=vision_tower)
    if loaded.tokenizer_path is None:
        raise CheckpointError(f"{loaded.path}: no tokenizer.model in the checkpoint")
    predictions = answer_questions(
        loaded.model, loaded.config, loaded.tokenizer_path, records, Path(data_json).parent,
        max_new_tokens=max_new_tokens, image_batch_size=image_batch_size, progress=progress, image_tokens=image_tokens,
    )
    return score_predictions(records, predictions)


