"""The KV cache's element type: the names a user picks, and what llama.cpp needs for each. No heavy imports.

At n_ctx 4096 a Vicuna-7B KV cache is 2 GiB in f16, about 1.06 GiB in q8_0 and 0.56 GiB in q4_0. llama.cpp
keeps a quantized V only with flash attention (which stores V untransposed, so it can be blocked by rows).
"""

from __future__ import annotations

from ..errors import UserError

KV_TYPES = ("f16", "q8_0", "q4_0", "f32")  # f32: the exact parity runs (export, eval against the reference)
DEFAULT_KV_TYPE = "f16"
KV_TYPE_HELP = "KV cache element type: f16|q8_0|q4_0 (q8_0 about halves its memory, q4_0 quarters it)"


def check_kv_type(name: str) -> str:
    if name not in KV_TYPES:
        raise UserError(f"kv-type must be one of {'|'.join(KV_TYPES[:3])} (got {name!r})")
    return name


def needs_flash_attn(name: str) -> bool:
    """Whether llama.cpp can hold this type in V only with flash attention on."""
    return name.startswith("q")
