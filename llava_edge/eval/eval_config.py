"""How an eval run is set up: one place for its defaults (the CLI reads them from here). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..runtime.kv_type import check_kv_type


@dataclass
class EvalConfig:
    benchmark: str
    data: str
    bundle: str | None = None
    ckpt: str | None = None
    compare: str | None = None  # an earlier run's --predictions: its answers are the reference column
    image_tokens: list[int | None] = field(default_factory=lambda: [None])  # the bundle's sweep (None: all)
    parallel: int = 4
    limit: int | None = None
    predictions: str | None = None
    max_tokens: int = 128  # LLaVA's model_vqa_loader default
    threads: int | None = None
    device: str = "auto"
    progress: bool = True
    kv_type: str = "f16"  # the bundle's KV cache type (runtime/kv_type.py)

    def __post_init__(self):
        if self.bundle is None and self.ckpt is None:
            raise UserError("pass --bundle (edge runtime), --ckpt (reference model), or both")
        if self.compare is not None and self.ckpt is not None:
            raise UserError("--compare takes the reference's answers from a file: leave out --ckpt")
        if self.compare is not None and self.bundle is None:
            raise UserError("--compare sets a bundle beside earlier answers: pass --bundle too")
        check_kv_type(self.kv_type)
        for name in ("parallel", "max_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def parse_sweep(text: str | None) -> list[int | None]:
    """--image-tokens "576,192,64" (or "all", or one number) as the sweep; "all" is None, every token."""
    if text is None:
        return [None]
    sweep = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            sweep.append(None)
        elif part.isdigit():
            sweep.append(int(part))
        else:
            raise UserError(f"--image-tokens takes whole numbers or 'all', comma-separated (got {text!r})")
    return sweep
