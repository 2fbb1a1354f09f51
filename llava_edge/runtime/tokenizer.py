"""The tokenizer of an open GGUF decoder: text to token ids, token ids to bytes, its vocab size and input width.

Evaluating positions is the executor's job (executor.py); this reads the model only. No torch.
"""

from __future__ import annotations

import ctypes

import llama_cpp


class Tokenizer:
    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        n_embd_inp = getattr(llama_cpp, "llama_model_n_embd_inp", llama_cpp.llama_model_n_embd)
        self.n_embd = int(n_embd_inp(llm.model))
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str) -> list[int]:
        """The GGUF's own SentencePiece-compatible tokenizer, no BOS, special tokens not parsed."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for (a word piece may be part of a UTF-8 character)."""
        if token not in self._pieces:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # a longer piece: llama.cpp says how many bytes it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            self._pieces[token] = buf.raw[: max(n, 0)]
        return self._pieces[token]
