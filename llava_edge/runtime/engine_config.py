"""How an engine is set up: one place for its defaults (the CLI reads them from here). No heavy imports.

What belongs to the model rather than to an engine (the vision device, CPU threads, the embedding cache's
directory) is given to `Model.open`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .kv_type import DEFAULT_KV_TYPE, check_kv_type

# Defaults of what Model.open takes, here so that the CLI reads them without loading the runtime
DEFAULT_DEVICE = "auto"  # vision on ONNX Runtime, the decoder on llama.cpp: auto|cpu|cuda|tensorrt
DEVICE_HELP = ("auto|cpu|cuda|tensorrt: vision on ONNX Runtime's GPU providers, and the decoder on the GPU where "
               "llama.cpp was built for one")
MAX_DEFAULT_N_CTX = 4096  # N sequences of a longer trained context would cost N times its KV cache for nothing


@dataclass
class EngineConfig:
    parallel: int = 1  # sequences (slots) in the one context
    n_ctx: int | None = None  # positions per sequence (default and bounds: Model.context_length)
    n_batch: int = 512  # most positions in one llama_decode
    queue: int = 16  # requests that may wait for a slot; one more is refused (EngineBusy)
    kv_type: str = DEFAULT_KV_TYPE  # f16|q8_0|q4_0 (f32: the exact parity runs); see kv_type.py
    kv_cache_dir: str | None = None  # KV state after the image prefix, on disk
    image_tokens: int | None = None  # tokens per image when a request names none (None: all, the reference)
    decode_slowdown: float = 0.25  # prefill riding along may slow the next token of the answers by at most this
    prefill_ahead_step_seconds: float = 3.0  # steps of a prefill nobody waits on yet (the chat's, while typing)
    embed_text: bool = True  # the text next to an image goes in the image's decode, as embedding rows

    def __post_init__(self):
        check_kv_type(self.kv_type)
        for name in ("parallel", "n_batch", "queue"):
            if getattr(self, name) < (0 if name == "queue" else 1):
                raise UserError(f"{name.replace('_', '-')} must be at least {0 if name == 'queue' else 1}")
        # n_ctx is bounded by the model (Model.context_length)
