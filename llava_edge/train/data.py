"""LLaVA-format supervised data: the json records, token ids with LLaVA's label masking, batches.

Reproduces LLaVA's train.py: `preprocess_multimodal` (move <image> to the front of its turn),
`preprocess_plain` (stage 1) and `preprocess_v1` (stage 2, vicuna_v1), with the SentencePiece ("legacy")
Llama tokenizer LLaVA-1.5 trains with: every text piece between <image> and "</s>" is encoded on its own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from llava_edge.conversation import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    render_prompt,
    tokenize_prompt,
)
from llava_edge.errors import UserError
from llava_edge.architectures import CLIP_MEAN, CLIP_STD
from llava_edge.image import load_image, preprocess
from llava_edge.llava_json import record_problem

IGNORE_INDEX = -100
EOS_TEXT = "</s>"
DATA_TEMPLATES = ("plain", "v1", "vicuna_v1")

Encode = Callable[[str], list[int]]


def tokenize_example(
    example: dict,
    template: str,
    encode: Encode,
    bos_id: int,
    eos_id: int,
    image_token_id: int = IMAGE_TOKEN_INDEX,
    model_max_length: int = 2048,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record, as LLaVA's preprocess_plain / preprocess_v1 produce them.

    `encode` is SentencePiece encode without BOS/EOS. Labels are IGNORE_INDEX except the supervised tokens.
    Both are truncated to model_max_length (the image counts as one id here, as in LLaVA's tokenization).
    """
    if template not in DATA_TEMPLATES:
        raise UserError(f"unknown training template {template!r} (expected one of: {', '.join(DATA_TEMPLATES)})")
    name = example.get("id", "?") if isinstance(example, dict) else "?"
    problem = record_problem(example)
    if problem:
        raise UserError(f"record {name}: {problem}")
    turns = [dict(turn) for turn in example["conversations"]]
    has_image = "image" in example
    if has_image:
        turns = _move_image_to_front(turns)

    def tokenize(text: str) -> list[int]:
        return tokenize_prompt(text, encode, bos_id, image_token_id, {EOS_TEXT: eos_id})

    if template == "plain":
        input_ids, labels = _plain(turns, name, tokenize)
    else:
        input_ids, labels = _vicuna_v1(turns, name, tokenize, model_max_length)
    return input_ids[:model_max_length], labels[:model_max_length]


def _move_image_to_front(turns: list[dict]) -> list[dict]:
    """LLaVA's preprocess_multimodal: a turn with <image> becomes "<image>\\n" + the rest, stripped."""
    for turn in turns:
        if IMAGE_TOKEN in turn["value"]:
            rest = turn["value"].replace(IMAGE_TOKEN, "").strip()
            turn["value"] = (IMAGE_TOKEN + "\n" + rest).strip()
    return turns


def _plain(turns: list[dict], name: object, tokenize: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """Stage 1: "<image>" + caption + "\\n"; the question text is dropped, BOS and the image are masked."""
    if len(turns) != 2 or IMAGE_TOKEN not in turns[0]["value"]:
        raise UserError(f"record {name}: the plain template needs one human turn with <image> and one gpt caption")
    input_ids = tokenize(IMAGE_TOKEN + turns[1]["value"] + TEMPLATES["plain"].sep2)
    n_masked = len(tokenize(IMAGE_TOKEN))
    labels = [IGNORE_INDEX] * n_masked + input_ids[n_masked:]
    return input_ids, labels


def _vicuna_v1(
    turns: list[dict], name: object, tokenize: Callable[[str], list[int]], model_max_length: int
) -> tuple[list[int], list[int]]:
    """Stage 2: the whole vicuna_v1 conversation; only the answers and their "</s>" are supervised.

    The masks are computed as LLaVA's preprocess_v1 does: per "</s>"-separated round, skip
    len(tokens of "...ASSISTANT: ") - 2 tokens (BOS and the lone trailing "▁", which in the full text merges
    into the answer's first token), supervise the rest of the round. A round whose token count does not add
    up (e.g. " ASSISTANT: " inside a message) masks the whole sample, as LLaVA does.
    """
    template = TEMPLATES["vicuna_v1"]
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)]
    conversation = render_prompt(template, pairs, image=False)
    input_ids = tokenize(conversation)
    labels = list(input_ids)

    answer_sep = template.sep + template.roles[1] + ": "
    cur_len = 1
    _mask(labels, 0, cur_len)
    for round_text in conversation.split(template.sep2):
        if round_text == "":
            break
        parts = round_text.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(tokenize(round_text))
        instruction_len = len(tokenize(parts[0] + answer_sep)) - 2
        _mask(labels, cur_len, cur_len + instruction_len)
        cur_len += round_len
    _mask(labels, cur_len, len(labels))

    if cur_len < model_max_length and cur_len != len(input_ids):
        warnings.warn(f"record {name}: tokenization mismatch ({cur_len} vs {len(input_ids)} tokens); not supervised")
        labels = [IGNORE_INDEX] * len(input_ids)
    return input_ids, labels


def _mask(labels: list[int], start: int, stop: int) -> None:
    for k in range(start, min(stop, len(labels))):
        labels[k] = IGNORE_INDEX


class LlavaDataset(Dataset):
    """LLaVA records -> {"input_ids", "labels", "pixel_values" (float32 [3, S, S]) or None}, images read lazily."""

    def __init__(
        self,
        records: list[dict],
        template: str,
        encode: Encode,
        bos_id: int,
        eos_id: int,
        image_folder: str | os.PathLike = ".",
        image_size: int = 336,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        aspect: str = "pad",
        model_max_length: int = 2048,
        image_token_id: int = IMAGE_TOKEN_INDEX,
        cache_images: bool = False,
    ):
        self.records = records
        self.template = template
        self.encode = encode
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.image_folder = Path(image_folder)
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.aspect = aspect
        self.model_max_length = model_max_length
        self.image_token_id = image_token_id
        # Preprocessed pixels kept in memory after their first use (a small dataset read for many epochs)
        self.pixel_cache: dict[str, torch.Tensor] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        input_ids, labels = tokenize_example(
            record, self.template, self.encode, self.bos_id, self.eos_id, self.image_token_id, self.model_max_length
        )
        pixel_values = None
        if "image" in record:
            pixel_values = self.pixels(record["image"])
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def pixels(self, image: str) -> torch.Tensor:
        if self.pixel_cache is not None and image in self.pixel_cache:
            return self.pixel_cache[image]
        img = load_image(self.image_folder / image)
        pixels = torch.from_numpy(preprocess(img, self.image_size, self.mean, self.std, self.aspect))
        if self.pixel_cache is not None:
            self.pixel_cache[image] = pixels
        return pixels

    def modality_lengths(self) -> list[int]:
        """LLaVA's length proxy: words in the conversation, positive with an image, negative without."""
        lengths = []
        for record in self.records:
            words = sum(len(turn["value"].split()) for turn in record["conversations"])
            lengths.append(words if "image" in record else -words)
        return lengths


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Right-pad a list of samples (LLaVA pads input_ids with unk = 0 and labels with IGNORE_INDEX).

    Returns input_ids and labels [B, L] long, attention_mask [B, L] bool (True on real tokens, from the
    lengths rather than ids != pad, so a real unk token stays visible), has_image [B] bool, and
    pixel_values [N, 3, S, S] for the N samples that have an image, in batch order (None when N = 0).
    """
    input_ids = pad_sequence([s["input_ids"] for s in batch], batch_first=True, padding_value=pad_id)
    labels = pad_sequence([s["labels"] for s in batch], batch_first=True, padding_value=IGNORE_INDEX)
    lengths = torch.tensor([len(s["input_ids"]) for s in batch])
    attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    images = [s["pixel_values"] for s in batch if s["pixel_values"] is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "has_image": torch.tensor([s["pixel_values"] is not None for s in batch]),
        "pixel_values": torch.stack(images) if images else None,
    }


def modality_length_grouped_batches(
    lengths_with_sign: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Batches of dataset indices, each of one modality (length > 0: with image, < 0: text only).

    As LLaVA's LengthGroupedSampler(group_by_modality=True): per modality, shuffle, cut into megabatches of
    batch_size * world_size, sort each by length (longest first) and split it into world_size batches of
    balanced total length; the full megabatches of both modalities are shuffled together and each modality's
    last, partial megabatch goes at the end. Unlike LLaVA, the two partial megabatches are not merged, so no
    batch mixes modalities. Consecutive runs of world_size batches form one step; batch j of a step is rank j's.
    A partial megabatch with fewer items than ranks repeats its items so that every rank gets a batch.
    """
    if any(length == 0 for length in lengths_with_sign):
        raise ValueError("lengths must be non-zero: positive for samples with an image, negative without")
    megabatch_size = batch_size * world_size
    full_steps: list[list[list[int]]] = []
    partial_steps: list[list[list[int]]] = []
    for sign in (1, -1):
        indices = [i for i, length in enumerate(lengths_with_sign) if length * sign > 0]
        shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        for start in range(0, len(shuffled), megabatch_size):
            megabatch = shuffled[start : start + megabatch_size]
            is_full = len(megabatch) == megabatch_size
            while len(megabatch) < world_size:
                megabatch = megabatch + megabatch[: world_size - len(megabatch)]
            megabatch.sort(key=lambda i: abs(lengths_with_sign[i]), reverse=True)
            step = _split_to_even_chunks(megabatch, lengths_with_sign, world_size)
            (full_steps if is_full else partial_steps).append(step)
    order = torch.randperm(len(full_steps), generator=generator).tolist()
    steps = [full_steps[i] for i in order] + partial_steps
    return [batch for step in steps for batch in step]


def _split_to_even_chunks(indices: list[int], lengths: Sequence[int], n_chunks: int) -> list[list[int]]:
    """LLaVA's split_to_even_chunks: greedy to the chunk with the least total length while it has room."""
    if len(indices) % n_chunks != 0:
        return [indices[i::n_chunks] for i in range(n_chunks)]
    per_chunk = len(indices) // n_chunks
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    totals = [0.0] * n_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += abs(lengths[index])
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks
