"""LLaVA-1.5: CLIP hidden states -> MLP projector -> spliced into LLaMA's input embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..architectures import LlavaConfig, ProjectorConfig
from .llama import KVCache, Llama
from .token_reduction import reduce_image_tokens
from .clip_vision import VisionTransformer

IGNORE_INDEX = -100


class Projector(nn.Module):
    """`linear` or `mlp{N}x_gelu`: N linears with exact-erf GELU between them."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        n = cfg.num_linears
        dims = [cfg.in_features] + [cfg.out_features] * n
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=cfg.bias) for i in range(n))

    def forward(self, x):
        for i, linear in enumerate(self.linears):
            x = linear(x if i == 0 else F.gelu(x))
        return x


@dataclass
class MultimodalInputs:
    inputs_embeds: torch.Tensor  # [B, T, D]
    attn_2d: torch.Tensor  # [B, T] long, 1 = real position
    labels: torch.Tensor | None  # [B, T], IGNORE_INDEX at image, prompt and padding positions


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.projector)
        self.language = Llama(cfg.text)

    def encode_images(self, pixel_values: torch.Tensor, image_tokens: int | None = None) -> torch.Tensor:
        """[B, 3, S, S] preprocessed pixels -> image embeddings [B, n_image_tokens, text hidden], or
        [B, image_tokens, text hidden] chosen by token reduction (see reduced_image_tokens)."""
        if image_tokens is not None:
            return self.reduced_image_tokens(pixel_values, image_tokens)[0]
        states = self.vision(pixel_values, self.cfg.feature_layers)
        if not self.cfg.keeps_cls:
            states = [s[:, 1:] for s in states]
        return self._project(torch.cat(states, dim=-1))

    def reduced_image_tokens(self, pixel_values: torch.Tensor, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, K, text hidden], patches [B, K] long) for K = image_tokens, K <= n_image_tokens.

        The features of the selected layers (concatenated) are reduced before the projector, by the [CLS]
        attention and keys of the deepest selected layer (reference/token_reduction.py). `patches[b, j]` is
        the patch token j stands for; -1 for the CLS token, which checkpoints that keep it keep first (it
        counts in K). K = n_image_tokens is every token in raster order, as encode_images without K.
        """
        n_patches = self.cfg.vision.num_patches
        n_cls = int(self.cfg.keeps_cls)
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or not (
                n_cls + 1 <= image_tokens <= self.cfg.n_image_tokens):
            raise ValueError(f"image_tokens must be an integer from {n_cls + 1} to {self.cfg.n_image_tokens}, "
                             f"not {image_tokens!r}")
        states, probe = self.vision.forward_with_probe(pixel_values, self.cfg.feature_layers)
        features = torch.cat([s[:, 1:] for s in states], dim=-1)
        batch = pixel_values.shape[0]
        if image_tokens == self.cfg.n_image_tokens:
            patches = torch.arange(n_patches).expand(batch, -1)
        else:
            reduced = reduce_image_tokens(features, *probe, image_tokens - n_cls)
            features, patches = reduced.tokens, reduced.patches
        if n_cls:
            features = torch.cat([torch.cat([s[:, :1] for s in states], dim=-1), features], dim=1)
            patches = torch.cat([torch.full((batch, 1), -1), patches], dim=1)
        return self._project(features), patches

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features.to(self.projector.linears[0].weight.dtype))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        attn_2d: torch.Tensor | None = None,
    ) -> MultimodalInputs:
        """Replace each image placeholder in input_ids [B, T] by the next image's embeddings.

        Images are consumed in order across the batch (row 0's images first), as LLaVA does. Rows grow
        by (n_image_tokens - 1) per image; the batch is re-padded on the right.
        """
        image_token = self.cfg.image_token_index
        images = list(image_embeds) if image_embeds is not None else []
        table = self.language.embed_tokens
        rows, row_labels = [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            keep = attn_2d[b].bool() if attn_2d is not None else torch.ones_like(ids, dtype=torch.bool)
            ids = ids[keep]
            lab = labels[b][keep] if labels is not None else None
            cut = (ids == image_token).nonzero().flatten().tolist()
            pieces, label_pieces, start = [], [], 0
            for pos in cut + [len(ids)]:
                text = ids[start:pos]
                pieces.append(table(text))
                if lab is not None:
                    label_pieces.append(lab[start:pos])
                if pos < len(ids):
                    if next_image >= len(images):
                        raise ValueError("more image placeholders in input_ids than images given")
                    img = images[next_image].to(pieces[-1].dtype)
                    next_image += 1
                    pieces.append(img)
                    if lab is not None:
                        label_pieces.append(torch.full((img.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                start = pos + 1
            rows.append(torch.cat(pieces))
            if lab is not None:
                row_labels.append(torch.cat(label_pieces))
        if next_image != len(images):
            raise ValueError(f"{len(images)} images given but {next_image} placeholders in input_ids")
        T = max(r.shape[0] for r in rows)
        D = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), T, D)
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=input_ids.device)
        out_labels = None
        if labels is not None:
            out_labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        for b, row in enumerate(rows):
            embeds[b, : row.shape[0]] = row
            mask[b, : row.shape[0]] = 1
            if out_labels is not None:
                out_labels[b, : row.shape[0]] = row_labels[b]
        return MultimodalInputs(embeds, mask, out_labels)

    def forward(self, input_ids, pixel_values=None, labels=None, attn_2d=None, image_embeds=None):
        """Training/scoring pass: returns (logits, loss or None). pixel_values rows are images in order."""
        if image_embeds is None and pixel_values is not None and len(pixel_values) > 0:
            image_embeds = self.encode_images(pixel_values)
        mm = self.embed(input_ids, image_embeds, labels, attn_2d)
        logits = self.language(mm.inputs_embeds, mm.attn_2d)
        return logits, causal_lm_loss(logits, mm.labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> list[int]:
        """Generate for one prompt (input_ids [1, T] with image placeholders). Greedy when temperature is 0."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)
        mm = self.embed(input_ids, image_embeds)
        eos = self.cfg.text.eos_token_id if eos_token_id is None else eos_token_id
        cache = KVCache(len(self.language.layers))
        logits = self.language(mm.inputs_embeds, cache=cache, last_only=True)[:, -1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = sample_token(logits[0].float(), temperature, top_p, generator)
            if token == eos:
                break
            out.append(token)
            x = self.language.embed_tokens(torch.tensor([[token]], device=input_ids.device))
            logits = self.language(x, cache=cache)[:, -1]
        return out


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Mean next-token cross-entropy over the supervised positions (labels != IGNORE_INDEX)."""
    if labels is None:
        return None
    if not (labels[:, 1:] != IGNORE_INDEX).any():  # e.g. an answer truncated away: no signal, no NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
