"""A tiny real SentencePiece BPE tokenizer with LLaMA's settings, trained in a second for tests.

LLaMA's tokenizer.model: BPE, byte fallback, digits split, identity normalization, dummy prefix on, extra
whitespace kept; unk=0, bos=1, eos=2. Import from tests as `from spm_fixture import train_tiny_spm`.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import sentencepiece as spm

WORDS = (
    "a chat between a curious user and an artificial intelligence assistant the assistant gives helpful "
    "detailed and polite answers to the user's questions USER ASSISTANT what color is the circle square "
    "triangle red green blue yellow how many shapes are there is there in the image describe answer "
    "question using single word or phrase yes no one two three object photo of cat rocket coffee cup"
).split()


def corpus_lines() -> list[str]:
    """Deterministic sentences covering the words above, with punctuation, digits and newlines."""
    lines = []
    for i, (a, b, c) in enumerate(itertools.product(WORDS[:24], WORDS[24:48], WORDS[48:])):
        if i % 7 == 0:
            lines.append(f"USER: {a} {b}? ASSISTANT: {c}.")
        elif i % 7 == 1:
            lines.append(f"{a.capitalize()} {b}, {c} {i % 100}.")
        else:
            lines.append(f"{a} {b} {c}")
    return lines


def train_tiny_spm(directory: Path, vocab_size: int = 400) -> Path:
    """Train the model and write `directory/tokenizer.model`; returns its path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def load_spm(path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


def load_hf_llama_tokenizer(directory: Path):
    """transformers' LlamaTokenizer on the same tokenizer.model, legacy, adding BOS: the tokenizer object LLaVA's
    code calls. It maps "</s>" in text to EOS. Caveat: transformers 5 builds it on HF `tokenizers`, which adds no
    dummy prefix to a text piece that already starts with a space (SentencePiece adds one), so use it as an
    oracle only on text whose pieces do not start with a space."""
    import transformers

    return transformers.LlamaTokenizer.from_pretrained(str(directory), legacy=True, add_bos_token=True)


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index=-200):
    """LLaVA mm_utils.tokenizer_image_token, rewritten from LLaVA (a test oracle)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids
