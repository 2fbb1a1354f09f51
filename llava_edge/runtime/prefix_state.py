"""The image prefix's KV on disk: llama.cpp sequence state after the prompt up to the end of its first image.

Saved once that prefix has been prefilled; restored into a sequence by a later process asking about the same
image with the same text before it, instead of prefilling it again (at 7B on a CPU, most of the first answer's
wait). The blobs live in a `KVCache` (kv_cache.py), keyed by everything that shapes them. No torch.
"""

from __future__ import annotations

import sys

from .kv_cache import KVCache, PrefixKey, positions_digest


class PrefixStates:
    """Keys and blobs only: the executor reads a sequence's state out of llama.cpp and writes it back in."""

    def __init__(self, directory: str, decoder_sha256: str, template: str, kv_description: str):
        self.cache = KVCache(directory)
        # kv_description: what else shapes a saved state (the llama.cpp build, the KV cache's element type, flash
        # attention, which stores V untransposed)
        self._decoder, self._template, self._runtime = decoder_sha256, template, kv_description

    def key(self, prefix: list) -> PrefixKey:
        """prefix: positions (token ids, ("image", image id, i) tuples) ending with the first image."""
        positions = [k if isinstance(k, int) else k[1] for k in prefix]
        return PrefixKey(self._decoder, self._template, prefix[-1][1], positions_digest(positions), self._runtime)

    def has(self, prefix: list) -> bool:
        """Whether an entry for the prefix is stored (it may still turn out unusable when restored)."""
        return self.cache.path(self.key(prefix)).exists()

    def get(self, prefix: list):
        """The stored state of this prefix (a buffer), or None."""
        return self.cache.get(self.key(prefix))

    def put(self, prefix: list, blob) -> None:
        """Store the state of a sequence that holds exactly `prefix` (None: nothing was read)."""
        if blob is None:
            return
        try:
            self.cache.put(self.key(prefix), blob)
        except OSError as e:  # a full or read-only disk only costs the next process a prefill
            print(f"llava-edge: could not save the image's KV to {self.cache.directory}: {e}", file=sys.stderr)
