"""How closely the GGUF decoder (through llama-cpp-python) follows the PyTorch reference.

`decoder_parity` feeds the same sequence to both: text positions as token ids (llama.cpp looks them up
in the GGUF's own embedding table), image positions as the reference's projected image embeddings
(through the engine's own batch filler, `runtime.executor`), and compares the logits at every position.
The reference runs streamed (`reference.streamed`: one decoder layer at a time in fp32, from the weights
as loaded, memory-mapped), so a 7B decoder is measured with about a gigabyte of its own memory, and the
comparison runs over blocks of positions (float64 over the whole [T, vocab] would be gigabytes too).
`tokenizer_parity` compares llama.cpp's tokenizer on the GGUF with SentencePiece on tokenizer.model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..reference.streamed import streamed_reference_logits
from ..runtime.tokenizer import Tokenizer
from ..runtime.executor import Executor, sequence_logits
from ..runtime.llama_loader import open_llama

# Text that trips tokenizers: runs of spaces, newlines, tabs, accents, CJK, emoji, digits, markup.
TOKENIZER_STRINGS = (
    "What color is the circle?",
    "  two leading spaces and   three inside",
    "line one\nline two\n\nafter a blank line\n",
    "\ttab\tseparated\t\tcolumns",
    "Crème brûlée, naïve façade, São Paulo, Ærøskøbing",
    "日本語のテキストと中文字符",
    "emoji 🙂🚀 and a family 👨‍👩‍👧",
    "numbers 1234567890 and 3.14159",
    "USER: <image>\nDescribe the image. ASSISTANT:",
    " ",
    "trailing spaces   ",
)


def split_at_images(input_ids: Sequence[int], image_token_id: int) -> list[list[int] | int]:
    """[text ids, image index, text ids, ...]: each placeholder becomes the index of its image."""
    parts: list[list[int] | int] = [[]]
    n_images = 0
    for i in input_ids:
        if i == image_token_id:
            parts += [n_images, []]
            n_images += 1
        else:
            parts[-1].append(int(i))
    return [p for p in parts if p != []]


def reference_logits(model, input_ids: Sequence[int], image_embeds: list[torch.Tensor]) -> np.ndarray:
    """The reference's fp32 logits [T, V] for one sequence, streamed layer by layer."""
    return streamed_reference_logits(model, input_ids, image_embeds).numpy()


def gguf_logits(
    gguf_path: str | os.PathLike, input_ids: Sequence[int], image_embeds: list[np.ndarray], image_token_id: int,
    n_batch: int = 512, f32_kv: bool = True, n_threads: int | None = None, extra_bufts: bool = False,
) -> np.ndarray:
    """llama.cpp's logits at every position. extra_bufts False (plain CPU buffers) keeps the weights
    memory-mapped: the repacked layouts (AMX, Q4_0/Q4_K x8) copy the matrices they take into anonymous
    memory, most of the GGUF, for kernels that compute the same quantized products in another order."""
    parts = split_at_images(input_ids, image_token_id)
    n_positions = sum(len(p) if isinstance(p, list) else len(image_embeds[p]) for p in parts)
    llm = open_llama(
        gguf_path, n_ctx=n_positions, n_batch=n_batch, n_threads=n_threads, kv_type="f32" if f32_kv else "f16",
        extra_bufts=extra_bufts,
    )
    decoder = Tokenizer(llm)
    executor = Executor(llm, llm.n_batch, decoder.n_embd, decoder.n_vocab)
    try:
        return sequence_logits(executor, [p if isinstance(p, list) else image_embeds[p] for p in parts])
    finally:
        executor.close()
        llm.close()


NEAR_TIE = 0.1  # logits: a reference top-1 this close to its top-2 may flip under any rounding


COMPARE_ROWS = 64  # positions compared at a time (float64 [rows, vocab] temporaries)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Argmax agreement per position, max |Δlogit|, mean KL(reference ‖ candidate) in nats."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits shapes differ: {reference.shape} vs {candidate.shape}")
    agree, clear, kl, max_abs = [], [], [], 0.0
    for start in range(0, len(reference), COMPARE_ROWS):
        ref = reference[start: start + COMPARE_ROWS].astype(np.float64)
        cand = candidate[start: start + COMPARE_ROWS].astype(np.float64)
        agree.append(ref.argmax(-1) == cand.argmax(-1))
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]
        clear.append(top2[:, 1] - top2[:, 0] >= NEAR_TIE)  # the reference is not split between two tokens
        log_p = ref - _logsumexp(ref)
        log_q = cand - _logsumexp(cand)
        kl.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        max_abs = max(max_abs, float(np.abs(ref - cand).max()))
    agree, clear, kl = np.concatenate(agree), np.concatenate(clear), np.concatenate(kl)
    return {
        "n_positions": len(agree),
        "argmax_identical": bool(agree.all()),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_clear": float(agree[clear].mean()) if clear.any() else 1.0,  # reference margin >= NEAR_TIE
        "mismatch_positions": [int(i) for i in np.flatnonzero(~agree)],
        "max_abs_diff": max_abs,
        "mean_kl": float(kl.mean()),
    }


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


@torch.no_grad()
def decoder_parity(
    gguf_path: str | os.PathLike,
    model,
    input_ids: Sequence[int],
    pixel_values: torch.Tensor | None = None,
    image_embeds: torch.Tensor | list[torch.Tensor] | None = None,
    image_token_id: int | None = None,
    f32_kv: bool = True,
    n_batch: int = 512,
    n_threads: int | None = None,
) -> dict:
    """Reference `Llava` vs the GGUF on one sequence (image placeholders in input_ids, one per image)."""
    image_token_id = model.cfg.image_token_index if image_token_id is None else image_token_id
    if image_embeds is None and pixel_values is not None:
        image_embeds = model.encode_images(pixel_values)
    images = [e.float() for e in image_embeds] if image_embeds is not None else []
    reference = reference_logits(model, input_ids, images)
    candidate = gguf_logits(
        gguf_path, input_ids, [e.numpy() for e in images], image_token_id, n_batch, f32_kv, n_threads
    )
    return {"gguf": Path(gguf_path).name, "f32_kv": f32_kv, **compare_logits(reference, candidate)}


def tokenizer_parity(
    gguf_path: str | os.PathLike, sp_model_path: str | os.PathLike, strings: Sequence[str] = TOKENIZER_STRINGS
) -> dict:
    """llama.cpp's tokenizer (from the GGUF, BOS added) vs SentencePiece encode with BOS."""
    import llama_cpp
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        mismatches = []
        for text in strings:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            theirs = [sp.bos_id()] + sp.encode(text)
            if ours != theirs:
                mismatches.append({"text": text, "llama_cpp": ours, "sentencepiece": theirs})
    finally:
        llm.close()
    return {"n_strings": len(strings), "identical": len(strings) - len(mismatches), "mismatches": mismatches}
