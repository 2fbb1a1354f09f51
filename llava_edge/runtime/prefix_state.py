"""The image prefix's KV on disk: llama.cpp sequence state after the prompt up to the end of its first image.

Saved once that prefix has been prefilled; restored into a sequence by a later process asking about the same
image with the same text before it, instead of prefilling it again (at 7B on a CPU, most of the first answer's
wait). The blobs live in a `KVCache` (kv_cache.py), keyed by everything that shapes them. No torch.
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp

from .kv_cache import KVCache, PrefixKey, positions_digest


class PrefixStates:
    def __init__(self, directory: str, llm: llama_cpp.Llama, decoder_sha256: str, template: str):
        self.cache = KVCache(directory)
        self.ctx = llm.ctx
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._decoder, self._template = decoder_sha256, template
        # what else shapes a saved state: the llama.cpp build, the KV cache's element types as the context holds
        # them (an f16 entry is never offered to a q8_0 context), and flash attention (which stores V untransposed)
        params = llm.context_params
        kv = f"{ggml_type_name(params.type_k)}/{ggml_type_name(params.type_v)}"
        self._runtime = f"llama_cpp {llama_cpp.__version__}; kv {kv}; flash_attn {int(params.flash_attn_type)}"

    def key(self, prefix: list) -> PrefixKey:
        """prefix: positions (token ids, ("image", sha256, i) tuples) ending with the first image."""
        positions = [k if isinstance(k, int) else k[1] for k in prefix]
        return PrefixKey(self._decoder, self._template, prefix[-1][1], positions_digest(positions), self._runtime)

    def has(self, prefix: list) -> bool:
        """Whether an entry for the prefix is stored (it may still turn out unusable when restored)."""
        return self.cache.path(self.key(prefix)).exists()

    def restore(self, seq: int, prefix: list) -> bool | None:
        """Load the prefix into sequence `seq`: True when it now holds exactly the prefix; None when there is
        no entry (the sequence is untouched); False when the entry was unusable (the sequence is emptied)."""
        blob = self.cache.get(self.key(prefix))
        if blob is None:
            return None
        llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        ok = (llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(blob), seq) != 0
              and llama_cpp.llama_memory_seq_pos_max(self._memory, seq) == len(prefix) - 1)
        if not ok:  # refused by llama.cpp, or another length: prefill as if never cached
            llama_cpp.llama_memory_seq_rm(self._memory, seq, 0, -1)
        return ok

    def save(self, seq: int, prefix: list) -> None:
        """Store what sequence `seq` holds, which must be exactly `prefix`."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if not n:
            return
        try:
            self.cache.put(self.key(prefix), memoryview(buf)[:n])
        except OSError as e:  # a full or read-only disk only costs the next process a prefill
            print(f"llava-edge: could not save the image's KV to {self.cache.directory}: {e}", file=sys.stderr)


def ggml_type_name(value: int) -> str:
    """ggml's name for a type id (f16, q8_0, ...), as llama-cpp-python's GGML_TYPE_* constants spell it."""
    names = [n[len("GGML_TYPE_"):].lower() for n in dir(llama_cpp) if n.startswith("GGML_TYPE_")
             and isinstance(getattr(llama_cpp, n), int) and getattr(llama_cpp, n) == int(value)]
    return min(names, key=len) if names else f"type{int(value)}"
