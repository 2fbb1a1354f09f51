"""Token ids and image embeddings into one llama.cpp sequence (llama-cpp-python), without torch.

Image embeddings go in through a `llama_batch` with `embd` set, chunked by n_batch (llama.cpp aborts
the process on a decode larger than n_batch). `Llama`'s own bookkeeping is kept in step: `n_tokens`
advances past the image and `input_ids` holds -1 there, so its next `eval` appends after the image
instead of overwriting its KV, and `generate`'s prefix match never matches across an image.
Everything that could make llama.cpp abort is checked in Python first, as a one-line UserError.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np

from ..errors import UserError

IMAGE_INPUT_ID = -1  # what input_ids holds at positions fed as embeddings


class Decoder:
    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        # llama.cpp may round the context up (e.g. to 256), but Llama's input_ids / scores arrays keep the
        # size that was asked for, and positions beyond them would be silently dropped from its bookkeeping.
        self.n_ctx = min(llm.n_ctx(), len(llm.input_ids))
        self.n_batch = llm.n_batch
        self.n_vocab = llm.n_vocab()
        n_embd_inp = getattr(llama_cpp, "llama_model_n_embd_inp", llama_cpp.llama_model_n_embd)
        self.n_embd = int(n_embd_inp(llm.model))
        self.logits_all = bool(getattr(llm, "_logits_all", False))
        self._batch = None  # the embeddings batch, allocated on first use, reused, freed in close()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._pieces: dict[int, bytes] = {}

    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def room(self) -> int:
        return self.n_ctx - self.n_past

    def sequence(self) -> list[int]:
        """What the KV cache holds: token ids, IMAGE_INPUT_ID at positions fed as embeddings."""
        return [int(t) for t in self.llm.input_ids[: self.n_past]]

    def truncate(self, n: int) -> None:
        """Keep the first n positions of the sequence (their KV stays), drop the rest."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"cannot keep {n} of {self.n_past} positions")
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), -1, n, -1)
        self.llm.n_tokens = n

    def tokenize(self, text: str) -> list[int]:
        """The GGUF's own SentencePiece-compatible tokenizer, no BOS, special tokens not parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for (a word piece may be part of a UTF-8 character)."""
        if token not in self._pieces:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # a longer piece: llama.cpp says how many bytes it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            self._pieces[token] = buf.raw[: max(n, 0)]
        return self._pieces[token]

    def reset(self) -> None:
        """Forget the sequence (the KV cache is cleared too, not just overwritten later)."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llm.ctx), -1, 0, -1)
        self.llm.reset()

    def eval_tokens(self, ids: Sequence[int]) -> None:
        ids = [int(i) for i in ids]
        if not ids:
            return
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the decoder's vocab of {self.n_vocab}")
        self._check_room(len(ids), "tokens")
        self.llm.eval(ids)  # chunks by n_batch itself

    def eval_embeddings(self, embeds: np.ndarray) -> None:
        """Append input embeddings [n, n_embd] (e.g. one image's projected patches) to the sequence."""
        embeds = np.asarray(embeds)
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
            raise UserError(
                f"image embeddings have shape {tuple(embeds.shape)}; the decoder needs [n, {self.n_embd}]"
            )
        n = embeds.shape[0]
        if n == 0:
            return
        self._check_room(n, "image embeddings")
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        llama_cpp.llama_memory_seq_rm(memory, -1, self.n_past, -1)  # drop stale KV past the sequence
        batch, pos, wants_logits = self._embd_batch()
        for start in range(0, n, self.n_batch):
            chunk = embeds[start : start + self.n_batch]
            m = chunk.shape[0]
            n_past = self.n_past
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            pos[:m] = np.arange(n_past, n_past + m, dtype=pos.dtype)
            wants_logits[:m] = 1 if self.logits_all else 0
            wants_logits[m - 1] = 1  # the chunk's last position: logits_last() after an image works
            batch.n_tokens = m
            rc = llama_cpp.llama_decode(self.llm.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode of {m} embeddings at position {n_past} failed (code {rc})")
            if self.logits_all:
                logits = llama_cpp.llama_get_logits(self.llm.ctx)
                self.llm.scores[n_past : n_past + m] = np.ctypeslib.as_array(logits, shape=(m, self.n_vocab))
            self.llm.input_ids[n_past : n_past + m] = IMAGE_INPUT_ID
            self.llm.n_tokens = n_past + m
        self.llm._requires_eval = False  # as after Llama.eval: the current logits come from a live decode

    def logits_last(self) -> np.ndarray:
        """Logits after the last position evaluated (a copy, [n_vocab] float32)."""
        if self.n_past == 0:
            raise RuntimeError("no position evaluated yet")
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def logits_all_positions(self) -> np.ndarray:
        """[n_past, n_vocab] logits of every position (only with a Llama opened with logits_all)."""
        if not self.logits_all:
            raise RuntimeError("open the model with logits_all=True for per-position logits")
        return self.llm.scores[: self.n_past].copy()

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch[0])
            self._batch = None

    def __del__(self):
        self.close()

    def _check_room(self, n: int, what: str) -> None:
        if n > self.room():
            raise UserError(
                f"{n} {what} do not fit: {self.n_past} of the context's {self.n_ctx} positions are used "
                f"({self.room()} left); shorten the prompt or open the decoder with a larger n_ctx"
            )

    def _embd_batch(self):
        """(batch, pos view, logits view): seq ids are fixed to sequence 0 once."""
        if self._batch is None:
            batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
            for i in range(self.n_batch):
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
            pos = np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))
            wants_logits = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))
            self._batch = (batch, pos, wants_logits)
        return self._batch
