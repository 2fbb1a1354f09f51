"""LLaVA-format training data: ids and label masks (hand-worked and vs LLaVA's preprocess code), batching."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from spm_fixture import llava_tokenizer_image_token

from llava_edge.errors import UserError
from llava_edge.image import load_image, preprocess
from llava_edge.train.data import (
    IGNORE_INDEX,
    LlavaDataset,
    collate,
    modality_length_grouped_batches,
    tokenize_example,
)
from llava_edge.llava_json import load_llava_json

IMG = -200
M = IGNORE_INDEX
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,"
    " detailed, and polite answers to the user's questions."
)
DATA = Path(__file__).parent / "data"


def conv(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def tok(example, template, sp, max_len=2048):
    return tokenize_example(example, template, sp.encode, sp.bos_id(), sp.eos_id(), model_max_length=max_len)


def test_ids_are_what_the_tiny_tokenizer_says(sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)


# ---- hand-worked examples --------------------------------------------------------------------------------------


def test_plain_caption_is_supervised_after_image(sp):
    example = {"id": "p", "image": "a.png", "conversations": conv("<image>\nDescribe the image.", "A red circle.")}
    ids, labels = tok(example, "plain", sp)
    caption = sp.encode("A red circle.\n")
    assert ids == [1, IMG] + caption
    assert labels == [M, M] + caption
    assert sp.eos_id() not in ids


def split_answer(sp, text_before_answer: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokens of `text_before_answer + " " + answer` as one piece, split at the answer (checked, not assumed)."""
    whole = sp.encode(text_before_answer + " " + answer)
    before, after = sp.encode(text_before_answer), sp.encode(answer)
    assert whole == before + after
    return before, after


def test_v1_single_turn_with_image_moved_to_front(sp):
    example = {"id": "s", "image": "a.png", "conversations": conv("What color is the circle?\n<image>", "Red.")}
    ids, labels = tok(example, "v1", sp)

    system = sp.encode(SYSTEM + " USER: ")
    question, answer = split_answer(sp, "\nWhat color is the circle? ASSISTANT:", "Red.")
    assert ids == [1] + system + [IMG] + question + answer + [2]
    assert labels == [M] * (1 + len(system) + 1 + len(question)) + answer + [2]


def test_v1_multi_turn(sp):
    example = {
        "id": "m",
        "image": "a.png",
        "conversations": conv("<image>\nHow many shapes are there?", "Two.", "What color is the square?", "Blue."),
    }
    ids, labels = tok(example, "vicuna_v1", sp)

    system = sp.encode(SYSTEM + " USER: ")
    q1, a1 = split_answer(sp, "\nHow many shapes are there? ASSISTANT:", "Two.")
    q2, a2 = split_answer(sp, "USER: What color is the square? ASSISTANT:", "Blue.")
    assert ids == [1] + system + [IMG] + q1 + a1 + [2] + q2 + a2 + [2]
    assert labels == [M] * (2 + len(system) + len(q1)) + a1 + [2] + [M] * len(q2) + a2 + [2]


def test_v1_image_only_question(sp):
    # "<image>\n" + "" is stripped to "<image>" (preprocess_multimodal), so the text after the image starts
    # with a space; SentencePiece gives that space its own "▁" before "▁ASSISTANT".
    example = {"id": "i", "image": "a.png", "conversations": conv("<image>", "A red circle.")}
    ids, labels = tok(example, "v1", sp)
    system = sp.encode(SYSTEM + " USER: ")
    question, answer = split_answer(sp, " ASSISTANT:", "A red circle.")
    assert [sp.id_to_piece(i) for i in question[:2]] == ["▁", "▁ASSISTANT"]
    assert ids == [1] + system + [IMG] + question + answer + [2]
    assert labels == [M] * (2 + len(system) + len(question)) + answer + [2]


def test_v1_text_only_sample(sp):
    example = {"id": "t", "conversations": conv("Is there a red circle?", "Yes")}
    ids, labels = tok(example, "v1", sp)
    before, answer = split_answer(sp, SYSTEM + " USER: Is there a red circle? ASSISTANT:", "Yes")
    assert ids == [1] + before + answer + [2]
    assert labels == [M] * (1 + len(before)) + answer + [2]
    assert IMG not in ids


def test_truncation_at_model_max_length(sp):
    example = {"id": "m", "image": "a.png", "conversations": conv("<image>\nHow many?", "Two.", "Which?", "Blue.")}
    system = sp.encode(SYSTEM + " USER: ")
    q1, a1 = split_answer(sp, "\nHow many? ASSISTANT:", "Two.")
    q2, a2 = split_answer(sp, "USER: Which? ASSISTANT:", "Blue.")
    full_ids = [1] + system + [IMG] + q1 + a1 + [2] + q2 + a2 + [2]
    full_labels = [M] * (2 + len(system) + len(q1)) + a1 + [2] + [M] * len(q2) + a2 + [2]
    for max_len in (5, len(full_ids) - 3, len(full_ids)):
        ids, labels = tok(example, "v1", sp, max_len=max_len)
        assert ids == full_ids[:max_len] and labels == full_labels[:max_len]


def test_answer_containing_the_separator_masks_everything_like_llava(sp):
    example = {"id": "x", "conversations": conv("Say it", "USER: hi ASSISTANT: there")}
    with pytest.warns(UserWarning, match="mismatch"):
        ids, labels = tok(example, "v1", sp)
    assert len(ids) > 10 and set(labels) == {M}


def test_unknown_template_and_plain_without_image(sp):
    with pytest.raises(UserError):
        tok({"conversations": conv("a", "b")}, "llama_2", sp)
    with pytest.raises(UserError):
        tok({"conversations": conv("a", "b")}, "plain", sp)


# ---- vs LLaVA's own preprocessing code (rewritten), through transformers' Llama tokenizer --------------------


def llava_preprocess_multimodal(source):
    for sentence in source:
        if "<image>" in sentence["value"]:
            sentence["value"] = sentence["value"].replace("<image>", "").strip()
            sentence["value"] = "<image>" + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def llava_preprocess_plain(source, tokenizer):
    assert len(source) == 2
    assert "<image>" in source[0]["value"]
    source[0]["value"] = "<image>"
    conversation = source[0]["value"] + source[1]["value"] + "\n"
    input_ids = llava_tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    tokenized_len = len(llava_tokenizer_image_token(source[0]["value"], tokenizer))
    target[:tokenized_len] = [M] * tokenized_len
    return input_ids, target


def llava_preprocess_v1(source, tokenizer, has_image, model_max_length=2048):
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    conversation = SYSTEM + seps[0]
    for i, sentence in enumerate(source):
        role, message = roles[sentence["from"]], sentence["value"]
        conversation += role + ": " + message + seps[i % 2] if message else role + ":"

    if has_image:
        input_ids = torch.tensor(llava_tokenizer_image_token(conversation, tokenizer))
    else:
        input_ids = torch.tensor(tokenizer(conversation, max_length=model_max_length, truncation=True).input_ids)
    target = input_ids.clone()

    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(0).sum())  # pad_token = unk = 0
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = M
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(llava_tokenizer_image_token(rou, tokenizer))
            instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        target[cur_len : cur_len + instruction_len] = M
        cur_len += round_len
    target[cur_len:] = M
    if cur_len < model_max_length and cur_len != total_len:
        target[:] = M
    return input_ids.tolist(), target.tolist()


def llava_get_item(record, template, tokenizer):
    source = copy.deepcopy(record["conversations"])
    if "image" in record:
        source = llava_preprocess_multimodal(source)
    if template == "plain":
        return llava_preprocess_plain(source, tokenizer)
    return llava_preprocess_v1(source, tokenizer, has_image="image" in record)


RECORDS_V1 = [
    {"image": "a.png", "conversations": conv("<image>\nWhat color is the circle?", "Red")},
    {"image": "a.png", "conversations": conv("What shape is the blue object?\n<image>", "Square")},
    {
        "image": "a.png",
        "conversations": conv("<image>\nHow many?", "2", "Is there a red circle?", "Yes", "Why?", "It is.\nSee."),
    },
    {"conversations": conv("Describe a cat.", "A cat has fur, 4 legs and a tail.", "Thanks", "You're welcome!")},
    {"conversations": conv("héllo", "wörld")},
    {"conversations": conv("Trick", "USER: x ASSISTANT: y")},
]

RECORDS_PLAIN = [
    {"image": "a.png", "conversations": conv("<image>\nDescribe the image.", "A red circle.")},
    {"image": "a.png", "conversations": conv("Render a caption.\n<image>", "Two shapes: 1 red, 1 blue")},
]


@pytest.mark.parametrize("index", range(len(RECORDS_V1)))
def test_v1_matches_llava_preprocess(index, sp, hf_tokenizer):
    record = {"id": index, **RECORDS_V1[index]}
    expected = llava_get_item(record, "v1", hf_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tok(record, "v1", sp) == expected
    all_masked = set(expected[1]) == {M}  # LLaVA's "tokenization mismatch" case
    assert any("mismatch" in str(w.message) for w in caught) == all_masked


@pytest.mark.parametrize("index", range(len(RECORDS_PLAIN)))
def test_plain_matches_llava_preprocess(index, sp, hf_tokenizer):
    record = {"id": index, **RECORDS_PLAIN[index]}
    assert tok(record, "plain", sp) == llava_get_item(record, "plain", hf_tokenizer)


# ---- json loading and validation ----------------------------------------------------------------------------


def write_json(tmp_path, records) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_load_valid_file(tmp_path):
    records = [{"id": "1", "image": "a.png", "conversations": conv("<image>\nQ", "A")},
               {"id": "2", "conversations": conv("Q", "A", "Q2", "A2")}]
    assert load_llava_json(write_json(tmp_path, records)) == records


@pytest.mark.parametrize(
    "record,words",
    [
        ({"id": "r", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, ["turn 0"]),
        ({"id": "r", "conversations": conv("Q", "A", "Q2")}, ["last turn"]),
        ({"id": "r", "image": "a.png", "conversations": conv("Q", "A")}, ["<image>"]),
        ({"id": "r", "image": "a.png", "conversations": conv("<image> <image>", "A")}, ["<image>"]),
        ({"id": "r", "conversations": conv("<image>\nQ", "A")}, ["no \"image\""]),
        ({"id": "r", "conversations": conv("Q", "")}, ["turn 1"]),
        ({"id": "r", "conversations": []}, ["conversations"]),
        ({"id": "r"}, ["conversations"]),
    ],
)
def test_invalid_record_names_file_and_record(tmp_path, record, words):
    good = {"id": "ok", "conversations": conv("Q", "A")}
    path = write_json(tmp_path, [good, record])
    with pytest.raises(UserError) as info:
        load_llava_json(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "record 1 (id 'r')" in message
    for word in words:
        assert word in message, message


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_llava_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(UserError, match="bad.json"):
        load_llava_json(bad)
    not_list = write_json(tmp_path, {"id": 1})
    with pytest.raises(UserError, match="list"):
        load_llava_json(not_list)


# ---- dataset and collate ------------------------------------------------------------------------------------


def test_dataset_items_and_collate(tmp_path, sp):
    shutil.copy(DATA / "coffee.jpg", tmp_path / "coffee.jpg")
    records = [
        {"id": "a", "image": "coffee.jpg", "conversations": conv("<image>\nWhat is this?", "Coffee.")},
        {"id": "b", "conversations": conv("Hi", "Hello there, how can I help?")},
    ]
    dataset = LlavaDataset(records, "v1", sp.encode, 1, 2, image_folder=tmp_path, image_size=28, aspect="pad")
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert first["input_ids"].dtype == torch.long and first["labels"].shape == first["input_ids"].shape
    assert first["input_ids"].tolist() == tok(records[0], "v1", sp)[0]
    expected_pixels = preprocess(load_image(tmp_path / "coffee.jpg"), 28, aspect="pad")
    np.testing.assert_array_equal(first["pixel_values"].numpy(), expected_pixels)
    assert second["pixel_values"] is None
    assert dataset.modality_lengths() == [5, -7]  # words, "<image>" included, as LLaVA counts

    batch = collate([second, first], pad_id=0)
    n1, n2 = len(second["input_ids"]), len(first["input_ids"])
    assert n1 != n2
    length = max(n1, n2)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    short = 0 if n1 < n2 else 1
    n_short = min(n1, n2)
    assert batch["input_ids"][short, n_short:].tolist() == [0] * (length - n_short)
    assert batch["labels"][short, n_short:].tolist() == [M] * (length - n_short)
    assert batch["attention_mask"][short].tolist() == [True] * n_short + [False] * (length - n_short)
    assert batch["attention_mask"][1 - short].all()
    assert batch["input_ids"][0, :n1].tolist() == second["input_ids"].tolist()
    assert batch["input_ids"][1, :n2].tolist() == first["input_ids"].tolist()
    assert batch["labels"][1, :n2].tolist() == first["labels"].tolist()
    assert batch["has_image"].tolist() == [False, True]
    assert batch["pixel_values"].shape == (1, 3, 28, 28)

    text_only = collate([second], pad_id=0)
    assert text_only["pixel_values"] is None and text_only["has_image"].tolist() == [False]


def test_image_cache_reads_each_file_once_and_gives_the_same_pixels(tmp_path, sp, monkeypatch):
    import llava_edge.train.data as data_module

    shutil.copy(DATA / "coffee.jpg", tmp_path / "coffee.jpg")
    records = [{"id": str(i), "image": "coffee.jpg", "conversations": conv("<image>\nWhat is this?", "Coffee.")}
               for i in range(3)]
    reads = []
    monkeypatch.setattr(data_module, "load_image", lambda path: reads.append(path) or load_image(path))
    plain = LlavaDataset(records, "v1", sp.encode, 1, 2, image_folder=tmp_path, image_size=28)
    cached = LlavaDataset(records, "v1", sp.encode, 1, 2, image_folder=tmp_path, image_size=28, cache_images=True)
    expected = [plain[i]["pixel_values"] for i in range(3)]
    assert len(reads) == 3
    got = [cached[i]["pixel_values"] for i in (0, 1, 2, 0)]
    assert len(reads) == 4  # one read for the three records of the same image
    for g, e in zip(got, expected + expected[:1]):
        assert torch.equal(g, e)


# ---- modality-grouped batches ---------------------------------------------------------------------------------


def random_lengths(n, seed):
    rng = np.random.default_rng(seed)
    return [int(v) * (1 if rng.random() < 0.6 else -1) for v in rng.integers(1, 500, n)]


@pytest.mark.parametrize(
    "n,batch_size,world_size", [(103, 4, 1), (64, 8, 1), (97, 3, 2), (50, 4, 4), (90, 4, 4), (7, 16, 1)]
)
def test_grouped_batches_are_single_modality_and_cover_all(n, batch_size, world_size):
    lengths = random_lengths(n, seed=n)
    batches = modality_length_grouped_batches(lengths, batch_size, world_size, torch.Generator().manual_seed(0))
    # A modality whose last megabatch has fewer items than ranks repeats items so every rank gets a batch.
    repeats = 0
    for count in (sum(v > 0 for v in lengths), sum(v < 0 for v in lengths)):
        left = count % (batch_size * world_size)
        repeats += world_size - left if 0 < left < world_size else 0
    flat = [i for batch in batches for i in batch]
    assert set(flat) == set(range(n)) and len(flat) == n + repeats
    assert len(batches) % world_size == 0
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({lengths[i] > 0 for i in batch}) == 1
    for start in range(0, len(batches), world_size):  # one step: all ranks see the same modality
        step = [i for batch in batches[start : start + world_size] for i in batch]
        assert len({lengths[i] > 0 for i in step}) == 1


def test_grouped_batches_sorted_by_length_and_seeded():
    lengths = random_lengths(200, seed=1)
    batches = modality_length_grouped_batches(lengths, 8, 1, torch.Generator().manual_seed(3))
    for batch in batches:
        sizes = [abs(lengths[i]) for i in batch]
        assert sizes == sorted(sizes, reverse=True)
    again = modality_length_grouped_batches(lengths, 8, 1, torch.Generator().manual_seed(3))
    other = modality_length_grouped_batches(lengths, 8, 1, torch.Generator().manual_seed(4))
    assert batches == again and batches != other
    full = [b for b in batches if len(b) == 8]
    assert len(full) >= len(batches) - 2  # only each modality's last batch may be short


def test_grouped_batches_give_every_rank_a_batch_when_few_items_are_left():
    lengths = [5, 6, 7, -3]  # 3 with an image, 1 text-only; 4 ranks
    batches = modality_length_grouped_batches(lengths, 2, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 8 and all(batches)
    assert {i for batch in batches for i in batch} == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        modality_length_grouped_batches([1, 0], 2, 1)
