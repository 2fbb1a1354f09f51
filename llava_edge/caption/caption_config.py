"""How a caption run is set up: one place for its defaults (the CLI reads them from here). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..runtime.kv_type import DEFAULT_KV_TYPE, check_kv_type

DEFAULT_PROMPT = "Describe the image."
VISION_BATCH = 8  # images per vision run where batching cannot change an image's embeddings


@dataclass
class CaptionConfig:
    inputs: list[str]
    out: str
    prompt: str = DEFAULT_PROMPT
    bundle: str | None = None
    parallel: int = 4
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    recursive: bool = False
    threads: int | None = None
    device: str = "auto"
    vision_batch: int | None = None  # None: VISION_BATCH, or 1 for an int8 graph (see vision_batch_size)
    image_tokens: int | None = None  # tokens per image (None: all)
    progress: bool = True
    kv_type: str = DEFAULT_KV_TYPE  # f16|q8_0|q4_0 (runtime/kv_type.py)
    format: str | dict | None = None  # "json" or a JSON schema: each answer is held to it (and parsed in its line)

    def __post_init__(self):
        check_kv_type(self.kv_type)
        self.prompt = self.prompt.strip()  # as `chat` asks it
        if not self.prompt:
            raise UserError("--prompt is empty")
        for name in ("parallel", "threads", "vision_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
