"""A chat's messages as the positions the decoder evaluates, rendered exactly as the reference renders them.

Checked here, before anything reaches llama.cpp: roles, images only in user messages, an "<image>" typed into the
text (it would shift the images), token ids inside the vocab, embedding shapes. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from ..conversation import IMAGE_TOKEN_INDEX, render_messages, tokenize_prompt
from ..errors import UserError
from .image_budget import ImageBudget

Key = Union[int, tuple]  # a position: a token id, or ("image", image id, i) for an image's i-th embedding

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: list = field(default_factory=list)  # user messages: paths, bytes or EncodedImage, in part order


@dataclass
class DeferredImage:
    """An image not encoded (yet): a KV cache seems to hold its positions already. The engine encodes it only if
    they must be evaluated after all."""
    source: bytes
    sha256: str
    n_tokens: int
    budget: ImageBudget  # the budget it is to be encoded with

    @property
    def image_id(self) -> str:
        return self.sha256 + self.budget.tag


@dataclass
class Prompt:
    keys: list[Key]
    images: dict[int, np.ndarray | DeferredImage]  # first position of each image -> its embeddings [n, n_embd]

    @property
    def image_spans(self) -> dict[int, int]:
        return {start: _n_tokens(e) for start, e in self.images.items()}

    def upto_last_image(self) -> Prompt:
        """The positions up to the end of the last image: what the next question does not change (the text
        before an image is tokenized on its own, so this is exactly the start of any longer prompt)."""
        start = max(self.images)
        return Prompt(self.keys[:start + _n_tokens(self.images[start])], self.images)


def _n_tokens(image: np.ndarray | DeferredImage) -> int:
    return image.n_tokens if isinstance(image, DeferredImage) else len(image)


def check_messages(messages: list[Message]) -> None:
    if not messages:
        raise UserError("the conversation has no messages")
    for m in messages:
        if m.role not in ROLES:
            raise UserError(f"unknown message role {m.role!r} (expected system, user or assistant)")
        if m.images and m.role != "user":
            raise UserError("images can only be in user messages")


@dataclass
class PromptRenderer:
    template: str
    tokenize: object  # text -> token ids (the GGUF's own tokenizer, no BOS)
    bos_id: int
    eos_id: int
    n_vocab: int
    n_embd: int
    n_image_tokens: int  # per image at the full budget

    def render(self, messages: list[Message], encoded: list) -> Prompt:
        """messages, with their images (EncodedImage or DeferredImage, in message order) -> Prompt."""
        prompt = render_messages(self.template, [(m.role, m.text, len(m.images)) for m in messages])
        ids = tokenize_prompt(prompt, self.tokenize, self.bos_id, IMAGE_TOKEN_INDEX, {"</s>": self.eos_id})
        if ids.count(IMAGE_TOKEN_INDEX) != len(encoded):
            raise UserError("the text contains '<image>'; send images as image parts instead")
        keys: list[Key] = []
        images: dict[int, np.ndarray] = {}
        pending = iter(encoded)
        for t in ids:
            if t != IMAGE_TOKEN_INDEX:
                keys.append(int(t))
                continue
            image = next(pending)
            if isinstance(image, DeferredImage):
                n = image.n_tokens
                images[len(keys)] = image
            else:
                shape = image.embeds.shape
                n = shape[0] if len(shape) == 2 else -1
                if len(shape) != 2 or not 1 <= n <= self.n_image_tokens or shape[1] != self.n_embd:
                    raise UserError(f"image embeddings have shape {shape}; the decoder needs "
                                    f"[at most {self.n_image_tokens}, {self.n_embd}]")
                images[len(keys)] = image.embeds
            keys.extend(("image", image.image_id, i) for i in range(n))
        bad = [k for k in keys if isinstance(k, int) and not 0 <= k < self.n_vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the decoder's vocab of {self.n_vocab}")
        return Prompt(keys, images)
