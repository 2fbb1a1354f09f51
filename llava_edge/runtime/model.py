"""The front door of the runtime: a bundle opened once, with everything it owns and every setting it bounds.

`Model.open(bundle, device, threads)` reads and verifies the manifest once, opens the vision graph on ONNX Runtime
and maps the decoder's token-embedding table. Engines take a Model (`Engine(model, config)`); the decoder contexts
they load from it are the model's too, and `close()` frees them all. The settings that depend on the model are
checked here and nowhere else: the image-token budget (`image_budget`) and the context length
(`context_length`). No torch.
"""

from __future__ import annotations

import numbers
import os
import sys
import llama_cpp

from ..errors import UserError
from ..paths import DEMO_BUNDLE
from .bundle import DEMO_DOMAIN, Bundle, open_bundle
from .engine_config import DEFAULT_DEVICE, MAX_DEFAULT_N_CTX
from .image_budget import ImageBudget
from .llama_loader import decoder_gpu_layers, open_llama
from .token_embeddings import TokenEmbeddings
from .vision import EmbeddingCache, VisionEncoder



class Model:
    def __init__(self, bundle: Bundle, vision: VisionEncoder, threads: int | None = None, gpu_layers: int = 0):
        self.bundle, self.vision, self.threads = bundle, vision, threads
        self.gpu_layers = gpu_layers  # decoder layers on the GPU (-1: all)
        # the token-embedding table, when its rows can be made exactly as llama.cpp makes them (None otherwise)
        self.token_rows = TokenEmbeddings.open(bundle.decoder_file)
        self._decoders: list[llama_cpp.Llama] = []

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike | None = None, device: str = DEFAULT_DEVICE, threads: int | None = None,
             verify: bool = True, image_cache_dir: str | os.PathLike | None = None) -> Model:
        """Open a bundle (default: the demo bundle in the package). Vision runs on `device`, and so does the decoder
        where llama.cpp was built for a GPU; `threads` CPU threads for vision and decoding (default: all); image
        embeddings are also kept as .npy files in image_cache_dir."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UserError(f"threads must be a whole number of at least 1 (got {threads!r})")
        bundle = open_bundle(DEMO_BUNDLE if bundle_dir is None else bundle_dir, verify=verify)
        vision = VisionEncoder(bundle, device, threads, EmbeddingCache(disk_dir=image_cache_dir))
        return cls(bundle, vision, threads, decoder_gpu_layers(device))

    @property
    def is_demo(self) -> bool:
        """Whether this is the demo model of the synthetic shapes world (its manifest's domain)."""
        return self.bundle.domain == DEMO_DOMAIN

    @property
    def n_image_tokens(self) -> int:
        """Positions an image takes when every token is kept (the default)."""
        return self.bundle.vision.n_image_tokens

    def image_budget(self, image_tokens: int | None = None) -> ImageBudget:
        """An image-token budget checked against this bundle: None or K = the image's token count is every token;
        K from the graph's minimum below that needs a graph that can reduce. A bad K is one UserError."""
        spec, n = self.bundle.vision, self.n_image_tokens
        if image_tokens is None:
            return ImageBudget(n, None)
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, numbers.Integral) or not 1 <= image_tokens <= n:
            raise UserError(f"image tokens must be a whole number from {spec.image_tokens_min} to {n} (an image is "
                            f"{n} tokens; {n} or unset keeps them all), not {image_tokens!r}")
        if image_tokens == n:
            return ImageBudget(n, None)
        if not spec.reducible:
            raise UserError(f"{self.bundle.path}: this bundle predates token reduction (its vision graph always gives "
                            f"{n} tokens); re-export it with `llava-edge export` to use fewer image tokens")
        if image_tokens < spec.image_tokens_min:
            raise UserError(f"image tokens must be a whole number from {spec.image_tokens_min} to {n}, "
                            f"not {image_tokens}")
        return ImageBudget(int(image_tokens), int(image_tokens))

    def context_length(self, n_ctx: int | None = None) -> int:
        """Positions per conversation: the model's trained context (at most 4096) by default. More than the model
        was trained on is cut to that with a note on stderr (llama.cpp would run on, past the positions the model
        ever saw); no more than one image's positions is refused."""
        trained = self.bundle.n_ctx_train
        if n_ctx is None:
            return min(trained or MAX_DEFAULT_N_CTX, MAX_DEFAULT_N_CTX)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
            raise UserError(f"--n-ctx must be a whole number (got {n_ctx!r})")
        if n_ctx <= self.n_image_tokens:
            raise UserError(f"--n-ctx {n_ctx} is too small: an image alone takes {self.n_image_tokens} positions; "
                            f"use at least {self.n_image_tokens + 16}")
        if trained and n_ctx > trained:
            print(f"llava-edge: note: --n-ctx {n_ctx} is more than the model was trained on; using {trained}",
                  file=sys.stderr)
            return trained
        return n_ctx

    def open_decoder(self, n_ctx: int, n_seq: int, n_batch: int, kv_type: str) -> llama_cpp.Llama:
        """A llama.cpp context of n_seq sequences over n_ctx positions in all, owned by this model."""
        llm = open_llama(self.bundle.decoder_file, n_ctx=n_ctx, n_threads=self.threads, n_batch=n_batch,
                         kv_type=kv_type, n_seq_max=n_seq, n_gpu_layers=self.gpu_layers)
        self._decoders.append(llm)
        return llm

    @property
    def decoders(self) -> tuple[llama_cpp.Llama, ...]:
        """The llama.cpp contexts open on this model."""
        return tuple(self._decoders)

    def close_decoder(self, llm: llama_cpp.Llama) -> None:
        if llm in self._decoders:
            self._decoders.remove(llm)
        llm.close()

    def close(self) -> None:
        for llm in list(self._decoders):
            self.close_decoder(llm)
