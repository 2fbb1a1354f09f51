"""Evaluation on the shapes world: the prompt each question gets, image caching, and the scoring arithmetic.

The model is a tiny random liuhaotian-layout checkpoint (vicuna_v1 template) whose vocab is the shapes
tokenizer's 512 pieces, so its answers are noise: the tests check what is asked and how it is scored.
"""

import json
import shutil
from collections import Counter

import pytest
import sentencepiece as spm
import torch

from llava_edge.image import load_image, preprocess
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.scoring import format_table, score_answer, score_predictions, write_predictions
from llava_edge.train import reference_answers as evaluate_module
from llava_edge.train.reference_answers import answer_questions, evaluate
from llava_edge.train.shapes import build_dataset
from tiny_checkpoints import make_hf_model, save_full_clip, save_liuhaotian_layout

# LLaVA's conv_vicuna_v1, written out by hand: system + " " + "USER: " + text + " " + "ASSISTANT:".
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("shapes"), n_train_images=0, n_test_images=6, seed=0,
                         progress=False)


@pytest.fixture(scope="module")
def records(world):
    return json.loads(world["test"].read_text())


@pytest.fixture(scope="module")
def ckpt(world, tmp_path_factory):
    hf = make_hf_model(image_size=28, vocab_size=512, seed=5)
    out = save_liuhaotian_layout(hf, tmp_path_factory.mktemp("ckpt") / "llava-tiny", "clip", fmt="safetensors")
    save_full_clip(hf, out / "clip")
    shutil.copy(world["tokenizer"], out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def sp(world):
    return spm.SentencePieceProcessor(model_file=str(world["tokenizer"]))


def test_fixture_is_a_vicuna_checkpoint_on_the_shapes_vocab(loaded, sp, records):
    assert loaded.config.template == "vicuna_v1"
    assert loaded.config.text.vocab_size == sp.get_piece_size() == 512
    assert loaded.config.image_token_index == IMAGE_PLACEHOLDER
    # several questions per image, so caching the image embeddings matters
    assert len({r["image"] for r in records}) < len(records)


@pytest.mark.slow
def test_runs_end_to_end(ckpt, world, records, tmp_path):
    result = evaluate(ckpt, world["test"], progress=False, max_new_tokens=8)

    assert [s.id for s in result.samples] == [r["id"] for r in records]
    assert result.overall.n == len(records)
    assert {t: s.n for t, s in result.per_type.items()} == Counter(r["question_type"] for r in records)
    assert list(result.per_type) == ["color", "shape", "count", "exists", "describe"]
    for sample, record in zip(result.samples, records):
        assert isinstance(sample.prediction, str) and sample.prediction == sample.prediction.strip()
        assert sample.answer == record["answer"]
        assert sample.question == record["conversations"][0]["value"][len("<image>\n"):]
        assert sample.correct == score_answer(record["question_type"], sample.prediction, record["answer"])
    assert result.overall.correct == sum(s.correct for s in result.samples)
    assert result.pope is not None and result.pope.n == 6

    table = format_table(result)
    for qtype, score in result.per_type.items():
        assert f"| {qtype} | {score.n} | {100 * score.accuracy:.1f}% |" in table
    assert "POPE" in table

    lines = write_predictions(result, tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert rows[0].keys() == {"id", "question_type", "question", "answer", "prediction", "correct"}
    assert [r["prediction"] for r in rows] == [s.prediction for s in result.samples]


def test_limit_takes_the_first_records(ckpt, world, records):
    result = evaluate(ckpt, world["test"], limit=4, progress=False, max_new_tokens=8)
    assert [s.id for s in result.samples] == [r["id"] for r in records[:4]]


def test_prompt_is_the_reference_prompt_and_each_image_is_encoded_once(loaded, world, records, sp, monkeypatch):
    model, cfg = loaded.model, loaded.config
    real_encode = model.encode_images
    encoded_rows, calls = [], []

    def counting_encode(pixel_values, image_tokens=None):
        encoded_rows.append(pixel_values.shape[0])
        return real_encode(pixel_values, image_tokens)

    def spy_generate(input_ids, **kwargs):
        calls.append((input_ids, kwargs))
        return sp.encode(" Yes") + [cfg.text.eos_token_id]

    monkeypatch.setattr(model, "encode_images", counting_encode)
    monkeypatch.setattr(model, "generate", spy_generate)
    answers = answer_questions(model, cfg, world["tokenizer"], records, world["test"].parent,
                               max_new_tokens=7, image_batch_size=4, progress=False)

    assert answers == ["Yes"] * len(records)
    images = list(dict.fromkeys(r["image"] for r in records))
    assert sum(encoded_rows) == len(images) and encoded_rows == [4, 2]
    assert len(calls) == len(records)

    # the oracle: the vicuna_v1 prompt built by hand, each chunk around <image> encoded by SentencePiece
    # (test.json lists each image's questions together, so image-grouped order is record order)
    for (input_ids, kwargs), record in zip(calls, records):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        before, after = f"{VICUNA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:".split("<image>")
        expected = [1] + sp.encode(before) + [IMAGE_PLACEHOLDER] + sp.encode(after)
        assert input_ids.tolist() == [expected]
        assert kwargs["max_new_tokens"] == 7 and kwargs["temperature"] == 0.0
        assert kwargs.get("pixel_values") is None

        # the embeddings given are those of this record's own image
        image = load_image(world["test"].parent / record["image"])
        pixels = preprocess(image, 28, cfg.image_mean, cfg.image_std, "pad")
        with torch.no_grad():
            want = real_encode(torch.from_numpy(pixels)[None])
        torch.testing.assert_close(kwargs["image_embeds"], want, atol=1e-5, rtol=1e-5)


def test_answers_equal_plain_generate_on_each_image(loaded, world, records, sp):
    model, cfg = loaded.model, loaded.config
    some = records[:7]
    answers = answer_questions(model, cfg, world["tokenizer"], some, world["test"].parent,
                               max_new_tokens=10, image_batch_size=1, progress=False)
    for record, answer in zip(some, answers):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        before, after = f"{VICUNA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:".split("<image>")
        ids = [1] + sp.encode(before) + [IMAGE_PLACEHOLDER] + sp.encode(after)
        image = load_image(world["test"].parent / record["image"])
        pixels = preprocess(image, 28, cfg.image_mean, cfg.image_std, "pad")
        out = model.generate(torch.tensor([ids]), pixel_values=torch.from_numpy(pixels)[None], max_new_tokens=10)
        assert answer == sp.decode(out).strip()


def test_gold_answers_score_100_percent(ckpt, world, records, monkeypatch):
    monkeypatch.setattr(evaluate_module, "answer_questions",
                        lambda model, config, tok, recs, root, **kw: [r["answer"] for r in recs])
    result = evaluate(ckpt, world["test"], progress=False)
    assert result.overall.correct == result.overall.n == len(records)
    assert all(score.accuracy == 1.0 for score in result.per_type.values())
    p = result.pope
    assert (p.f1, p.precision, p.recall, p.accuracy) == (1.0, 1.0, 1.0, 1.0)
    gold_yes = [r["answer"] for r in records if r["question_type"] == "exists"].count("Yes")
    assert p.yes_ratio == gold_yes / p.n


def test_always_yes_scores_the_yes_share(ckpt, world, records, monkeypatch):
    monkeypatch.setattr(evaluate_module, "answer_questions",
                        lambda model, config, tok, recs, root, **kw: ["Yes"] * len(recs))
    result = evaluate(ckpt, world["test"], progress=False)
    golds = [r["answer"] for r in records if r["question_type"] == "exists"]
    assert "Yes" in golds and "No" in golds  # the fixture has both, so the numbers below mean something
    yes_share = golds.count("Yes") / len(golds)

    assert result.per_type["exists"].accuracy == pytest.approx(yes_share)
    assert result.pope.accuracy == pytest.approx(yes_share)
    assert result.pope.recall == 1.0 and result.pope.yes_ratio == 1.0
    assert result.pope.precision == pytest.approx(yes_share)
    assert result.pope.f1 == pytest.approx(2 * yes_share / (1 + yes_share))
    for qtype in ("color", "shape", "count", "describe"):
        assert result.per_type[qtype].correct == 0
    assert result.overall.correct == golds.count("Yes")


def test_scores_and_table_on_hand_picked_predictions():
    def rec(i, qtype, answer):
        return {"id": str(i), "image": "x.png", "question_type": qtype, "answer": answer,
                "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": answer}]}

    records = [rec(0, "exists", "Yes"), rec(1, "exists", "No"), rec(2, "exists", "No"), rec(3, "exists", "Yes"),
               rec(4, "count", "Two"), rec(5, "color", "Red")]
    # "No, there is not." is a POPE "no" (first sentence has "No") but not an exact one-word match
    preds = ["Yes", "Yes", "No, there is not.", "No", "2", "red."]
    result = score_predictions(records, preds)

    assert [s.correct for s in result.samples] == [True, False, False, False, True, True]
    assert list(result.per_type) == ["color", "count", "exists"]
    assert (result.per_type["exists"].n, result.per_type["exists"].correct) == (4, 1)
    assert result.overall.accuracy == pytest.approx(3 / 6)
    p = result.pope  # tp 1, fp 1, tn 1, fn 1
    assert (p.precision, p.recall, p.f1, p.accuracy, p.yes_ratio) == (0.5, 0.5, 0.5, 0.5, 0.5)

    table = format_table(result)
    assert "| exists | 4 | 25.0% |" in table
    assert "| count | 1 | 100.0% |" in table
    assert "| **overall** | 6 | 50.0% |" in table
    assert "| yes = positive | 4 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |" in table

    no_yes_no = score_predictions(records[4:], preds[4:])
    assert no_yes_no.pope is None and "POPE" not in format_table(no_yes_no)


def test_prediction_count_must_match():
    with pytest.raises(ValueError):
        score_predictions([], ["Yes"])
