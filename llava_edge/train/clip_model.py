"""The shapes world's CLIP model: a ViT (the tower LLaVA freezes), a small causal text encoder, the pieces
of its training that do not depend on the objective (tokenizer, pixels, optimizer, one update step).

No CLIP checkpoint exists for the shapes world, so the tower is trained from scratch by `clip_attributes`
(the objective) and written as a transformers CLIPVisionModel directory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..architectures import CLIP_MEAN, CLIP_STD, VisionConfig
from ..image import load_image, preprocess
from ..reference.clip_vision import VisionTransformer
from .shapes import COLORS, SHAPES


def demo_vision_config() -> VisionConfig:
    return VisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
        image_size=112, patch_size=14,
    )


@dataclass
class TextEncoderConfig:
    width: int = 128
    layers: int = 3
    heads: int = 4
    context: int = 32  # tokens, bos and eos included


@dataclass
class ClipTrainConfig:
    """The CLIP model's shape and the optimizer settings `clip_attributes` trains it with."""

    vision: VisionConfig = field(default_factory=demo_vision_config)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 128
    batch_size: int = 128
    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    sincos_positions: bool = False  # True: start the vision positions from a 2-D sin-cos grid (see below)
    seed: int = 0


# ----------------------------------------------------------------------------- caption grammar

Objects = list[tuple[str, str]]  # (color, shape), left to right


def parse_caption(text: str) -> Objects | None:
    """'A red circle, a blue square and a green triangle.' -> [(red, circle), ...]; None if not that grammar."""
    if not text.endswith("."):
        return None
    objects = []
    for part in re.split(r", | and ", text[:-1]):
        words = part.lower().split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            return None
        objects.append((words[1], words[2]))
    return objects


PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]


# ----------------------------------------------------------------------------- text side


class TextTokenizer:
    """bos + SentencePiece ids + eos, right-padded with 0 to the context length (ids cached per text)."""

    def __init__(self, model_path: str | Path, context: int):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.context = context
        self.cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            body = self.sp.encode(text)[: self.context - 2]
            self.cache[text] = [self.sp.bos_id(), *body, self.sp.eos_id()]
        return self.cache[text]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] (T = the longest text here, at most the context) and the index of each text's eos [B]."""
        width = max(len(self.ids(text)) for text in texts)
        tokens = torch.zeros(len(texts), width, dtype=torch.long)
        eos_index = torch.empty(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)
            tokens[row, : len(ids)] = torch.tensor(ids)
            eos_index[row] = len(ids) - 1
        return tokens, eos_index


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out_proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TextEncoder(nn.Module):
    """CLIP's text transformer in small: causal, pre-LN, features taken at the eos position."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.projection = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x[torch.arange(len(tokens)), eos_index])
        return self.projection(x)


# ----------------------------------------------------------------------------- the CLIP model


class AttentionPool(nn.Module):
    """One learned query attending over patch tokens (the auxiliary head on layer -2)."""

    def __init__(self, width: int, heads: int, embed_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.projection = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(len(x), -1, -1), x, x, need_weights=False)
        return self.projection(pooled[:, 0])


class ClipModel(nn.Module):
    """The vision tower (saved for LLaVA), its CLS projection, the text encoder and CLIP's temperature.

    patch_pool and attribute_head were the heads of the caption-level trainer this tower started with; no
    loss reads them now, but they stay: their creation draws from the RNG, so the demo tower's initial
    weights (and so `build-demo`'s result) stay what they were."""

    def __init__(self, cfg: ClipTrainConfig, vocab_size: int):
        super().__init__()
        v = cfg.vision
        self.vision = VisionTransformer(v)
        self.visual_projection = nn.Linear(v.hidden_size, cfg.embed_dim, bias=False)
        self.patch_pool = AttentionPool(v.hidden_size, v.num_attention_heads, cfg.embed_dim)
        self.attribute_head = nn.Sequential(nn.LayerNorm(v.hidden_size), nn.Linear(v.hidden_size, len(PAIRS)))
        self.text = TextEncoder(cfg.text, vocab_size, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.apply(_init_weights)
        nn.init.normal_(self.vision.embeddings.class_embedding, std=0.02)
        if cfg.sincos_positions:
            with torch.no_grad():
                self.vision.embeddings.position_embedding.weight.copy_(sincos_positions(v))
        nn.init.normal_(self.patch_pool.query, std=0.02)
        nn.init.normal_(self.text.position_embedding, std=0.01)

    def encode_text(self, tokens: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, eos_index), dim=-1)


def sincos_positions(v: VisionConfig) -> torch.Tensor:
    """[1 + grid*grid, width] position table: zeros for CLS, then each patch's row and column in sin-cos
    features (half the width each), as MAE initialises ViT positions.

    With the default N(0, 0.02) start, positions are ~20x smaller than the patch embeddings and nothing in
    this world's texts rewards growing them, so the demo tower's patch tokens barely say where they are: a
    linear probe reads a patch's column from layer -2 36 % of the time (21 % on objects), 88 % (60 %) with this
    start (experiments/tower_position_probe.py). Listing objects left to right needs that; what it did to the demo
    model is in docs/demo-model.md's table of what was tried."""
    if v.hidden_size % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {v.hidden_size}")
    grid = v.image_size // v.patch_size
    quarter = v.hidden_size // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)[:, None] * freqs  # [grid, quarter]
    per_axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # [grid, width/2]
    rows = per_axis[:, None, :].expand(grid, grid, -1)
    cols = per_axis[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return torch.cat([torch.zeros(1, table.shape[1]), table])


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- data and updates


def load_pixels(data_dir: Path, rel_paths: list[str], size: int, progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    out = torch.empty(len(rel_paths), 3, size, size)
    for i, rel in enumerate(tqdm(rel_paths, desc="preprocess", unit="img", disable=not progress)):
        out[i] = torch.from_numpy(preprocess(load_image(data_dir / rel), size, CLIP_MEAN, CLIP_STD, "pad"))
    return out


def make_optimizer(model: nn.Module, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def optimizer_step(model: ClipModel, optimizer, scheduler, loss: torch.Tensor, logit_scale_max: float) -> float:
    """One update; CLIP clamps its learned temperature after every step. Returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, logit_scale_max)
    return loss.item()
