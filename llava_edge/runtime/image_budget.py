"""An image-token budget, as `Model.image_budget` checked it: what every image cache keys by. No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageBudget:
    """How many positions an image takes, and what the vision graph is asked for to give that many."""
    n_tokens: int
    graph_tokens: int | None  # None: the graph's default, every token (the reference)

    @property
    def tag(self) -> str:
        """What every cache appends to an image's sha256 (embeddings, prefix reuse, the disk KV store): nothing
        for every token, "-kK" for K of them, so that an image at another budget is another image."""
        return "" if self.graph_tokens is None else f"-k{self.n_tokens}"
