"""Conversation templates (exact strings from LLaVA's definitions) and LLaVA's tokenizer_image_token."""

from __future__ import annotations

import pytest
from spm_fixture import llava_tokenizer_image_token

from llava_edge.conversation import (
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    Template,
    render_prompt,
    tokenize_prompt,
)
from llava_edge.errors import UserError

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,"
    " detailed, and polite answers to the user's questions."
)


# ---- templates -----------------------------------------------------------------------------------------------


def test_vicuna_v1_single_turn():
    prompt = render_prompt("vicuna_v1", [("What is in the image?", None)])
    assert prompt == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:"


def test_vicuna_v1_multi_turn():
    turns = [("What is in the image?", "A cat."), ("What color is it?", None)]
    assert render_prompt("vicuna_v1", turns) == (
        SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:"
    )


def test_vicuna_v1_complete_conversation_and_text_only():
    turns = [("Hi", "Hello."), ("Bye", "Goodbye.")]
    assert render_prompt("vicuna_v1", turns, image=False) == (
        SYSTEM + " USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT: Goodbye.</s>"
    )


def test_plain_is_the_stage1_sample():
    assert render_prompt("plain", [("", None)]) == "<image>"
    assert render_prompt("plain", [("", "A red circle.")]) == "<image>A red circle.\n"
    assert render_prompt("plain", [("Describe.", None)]) == "<image>Describe."
    assert render_prompt("plain", [("a", "b"), ("c", None)], image=False) == "ab\nc"


def test_llava_hf_single_and_multi_turn():
    single = render_prompt("llava_hf", [("What is in the image?", None)])
    assert single == "USER: <image>\nWhat is in the image? ASSISTANT:"
    turns = [("q1", "a1"), ("q2", None)]
    assert render_prompt("llava_hf", turns) == "USER: <image>\nq1 ASSISTANT: a1 USER: q2 ASSISTANT:"
    assert render_prompt("llava_hf", [("q1", "a1")], image=False) == "USER: q1 ASSISTANT: a1 "


def test_template_object_is_accepted_and_registry_is_named():
    assert set(TEMPLATES) == {"vicuna_v1", "plain", "llava_hf"}
    custom = Template("x", "", ("Q", "A"), "\n", "\n", "<image>\n")
    assert render_prompt(custom, [("hi", None)]) == "Q: <image>\nhi\nA:"


def test_unknown_template_is_a_one_line_user_error():
    with pytest.raises(UserError) as info:
        render_prompt("chatml", [("hi", None)])
    assert "chatml" in str(info.value) and "\n" not in str(info.value)


def test_only_last_turn_may_be_open():
    with pytest.raises(ValueError):
        render_prompt("vicuna_v1", [("q1", None), ("q2", None)])
    with pytest.raises(ValueError):
        render_prompt("vicuna_v1", [])


# ---- tokenize_prompt vs LLaVA's tokenizer_image_token ----------------------------------------------------------


# Prompts whose text pieces do not start with a space: there the transformers-5 Llama tokenizer (HF `tokenizers`
# Metaspace) and SentencePiece agree. Where a piece starts with a space they differ (" x": SentencePiece
# "▁", "▁x"; Metaspace "▁x"); LLaVA used the slow, SentencePiece-backed tokenizer, so those cases are checked
# against SentencePiece itself below.
PROMPTS_WITH_EOS = [
    render_prompt("vicuna_v1", [("What color is the circle?", None)]),
    render_prompt("vicuna_v1", [("What color is the circle?", "Red."), ("How many shapes are there?", None)]),
    render_prompt("vicuna_v1", [("one", "two"), ("three", "four")], image=False),
    render_prompt("plain", [("", None)]),
    render_prompt("plain", [("", "A red circle and a blue square.")]),
    render_prompt("llava_hf", [("q1 yes", "a1 no"), ("q2", None)]),
    "no image at all, 42 shapes",
    "<image><image>two images, then </s>and more</s></s>x",
    "",
]

PROMPTS_WITHOUT_EOS = [
    "text <image> in the middle",
    "<image>  two leading spaces",
    "héllo\n\n  spaced   out  <image> ",
    render_prompt("vicuna_v1", [("What color is the circle?", None)]),
    " <image>",
]


def test_oracle_tokenizer_agrees_with_sentencepiece(sp, hf_tokenizer):
    for text in ["USER: what color is the circle? ASSISTANT: Red.", "héllo\n\n  spaced   out  ", "\nx", "x"]:
        assert hf_tokenizer(text).input_ids == [1] + sp.encode(text)


@pytest.mark.parametrize("prompt", PROMPTS_WITH_EOS)
def test_tokenize_prompt_matches_llava(prompt, sp, hf_tokenizer):
    expected = llava_tokenizer_image_token(prompt, hf_tokenizer)
    actual = tokenize_prompt(prompt, sp.encode, sp.bos_id(), special_tokens={"</s>": sp.eos_id()})
    assert actual == expected
    assert actual.count(sp.eos_id()) == prompt.count("</s>")


@pytest.mark.parametrize("prompt", PROMPTS_WITHOUT_EOS)
def test_tokenize_prompt_encodes_each_chunk_with_sentencepiece(prompt, sp):
    chunks = prompt.split("<image>")
    expected = sp.encode(chunks[0], add_bos=True)
    for chunk in chunks[1:]:
        expected += [IMAGE_TOKEN_INDEX] + sp.encode(chunk)
    assert tokenize_prompt(prompt, sp.encode, sp.bos_id()) == expected


def test_eos_text_stays_characters_without_special_tokens(sp):
    prompt = "USER: <image>\nWhat is it? ASSISTANT: a</s>"
    before, after = prompt.split("<image>")
    expected = sp.encode(before, add_bos=True) + [IMAGE_TOKEN_INDEX] + sp.encode(after)
    assert tokenize_prompt(prompt, sp.encode, sp.bos_id()) == expected
    assert sp.eos_id() not in expected


def test_tokenize_prompt_structure(sp):
    ids = tokenize_prompt("<image>", sp.encode, 1, image_token_id=-7)
    assert ids == [1, -7]
    ids = tokenize_prompt("<image>\nWhat?", sp.encode, 1)
    assert ids[:2] == [1, IMAGE_TOKEN_INDEX] and ids[2:] == sp.encode("\nWhat?")
    assert ids.count(1) == 1
