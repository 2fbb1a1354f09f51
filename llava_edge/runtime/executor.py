"""The llama.cpp side of a step: fills `llama_batch`es through ctypes, decodes, reads logits, cuts sequences.

The executor is the only code that writes a context's KV. It takes positions already checked by the engine
(token ids in the vocab, embeddings of the right width, batches within n_batch), because llama.cpp aborts the
process on what it cannot take. `sequence_logits` runs one whole sequence through the same two batch fillers, for the
export's parity check. No torch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np


class Executor:
    def __init__(self, llm: llama_cpp.Llama, n_batch: int, n_embd: int, n_vocab: int):
        self.llm, self.n_batch, self.n_embd, self.n_vocab = llm, n_batch, n_embd, n_vocab
        self.memory = llama_cpp.llama_get_memory(llm.ctx)
        self._tokens = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._embeds = llama_cpp.llama_batch_init(n_batch, n_embd, 1)

    def decode_tokens(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (sequence, position, token id, wants logits) entries, at most n_batch."""
        batch = self._tokens
        for n, (seq, pos, token, wants) in enumerate(entries):
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = wants
        batch.n_tokens = len(entries)
        self._decode(batch)

    def decode_embeddings(self, seq: int, pos: int, embeds: np.ndarray, logits: bool | Sequence[bool]) -> None:
        """One llama_decode of embeddings [m, n_embd] (m <= n_batch) at positions pos.. of one sequence; logits
        True/False is for the last row only, a sequence of bools is per row."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        m = embeds.shape[0]
        batch = self._embeds
        ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
        per_row = [False] * (m - 1) + [bool(logits)] if isinstance(logits, bool) else list(logits)
        for n in range(m):
            batch.pos[n] = pos + n
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = per_row[n]
        batch.n_tokens = m
        self._decode(batch)

    def logits(self, index: int) -> np.ndarray:
        """A copy of row `index` of the last decode's logits ([n_vocab] float32)."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def truncate(self, seq: int, keep: int) -> None:
        """Sequence seq keeps its first `keep` positions' KV."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1)

    @property
    def kv_description(self) -> str:
        """What shapes a saved sequence state besides the model: the llama.cpp build, the KV cache's element type
        and flash attention (which stores V untransposed)."""
        params = self.llm.context_params
        names = {llama_cpp.GGML_TYPE_F32: "f32", llama_cpp.GGML_TYPE_F16: "f16", llama_cpp.GGML_TYPE_Q8_0: "q8_0",
                 llama_cpp.GGML_TYPE_Q4_0: "q4_0"}
        kv = "/".join(names.get(t, f"type {t}") for t in (params.type_k, params.type_v))
        return f"llama_cpp {llama_cpp.__version__}; kv {kv}; flash_attn {int(params.flash_attn_type)}"

    def read_state(self, seq: int) -> memoryview | None:
        """Sequence seq's state (its KV) as bytes, or None when llama.cpp gives none."""
        size = llama_cpp.llama_state_seq_get_size(self.llm.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.llm.ctx, buf, size, seq)
        return memoryview(buf)[:n] if n else None

    def write_state(self, seq: int, blob, n_positions: int) -> bool:
        """Load a state read by read_state into sequence seq: True when it now holds n_positions positions; else
        it is emptied (refused by llama.cpp, or another length: the caller prefills as if never stored)."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, 0, -1)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        ok = (llama_cpp.llama_state_seq_set_data(self.llm.ctx, buf, len(blob), seq) != 0
              and llama_cpp.llama_memory_seq_pos_max(self.memory, seq) == n_positions - 1)
        if not ok:
            llama_cpp.llama_memory_seq_rm(self.memory, seq, 0, -1)
        return ok

    def close(self) -> None:
        for batch in (self._tokens, self._embeds):
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
        self._tokens = self._embeds = None

    def _decode(self, batch) -> None:
        rc = llama_cpp.llama_decode(self.llm.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode of {batch.n_tokens} positions returned {rc}")


def sequence_logits(executor: Executor, parts: Sequence[list[int] | np.ndarray]) -> np.ndarray:
    """The logits at every position [T, n_vocab] of one sequence (0) made of token-id lists and embedding
    arrays, decoded in chunks of n_batch (the export's parity check)."""
    rows, pos = [], 0
    for part in parts:
        n = len(part)
        for start in range(0, n, executor.n_batch):
            chunk = part[start:start + executor.n_batch]
            m = len(chunk)
            if isinstance(part, np.ndarray):
                executor.decode_embeddings(0, pos, chunk, [True] * m)
            else:
                executor.decode_tokens([(0, pos + i, int(t), True) for i, t in enumerate(chunk)])
            rows += [executor.logits(i) for i in range(m)]
            pos += m
    return np.stack(rows)
