"""Contrastive (CLIP objective) pretraining of the vision tower for the shapes world.

No CLIP checkpoint exists for the shapes world, so the tower LLaVA freezes is trained here first:
a CLIP ViT and a small causal text transformer, InfoNCE over in-batch pairs. Two additions make the
tower fit for LLaVA, which reads the patch tokens of layer -2 rather than the pooled CLS:

- an auxiliary CLIP loss on an attention-pooled view of the layer -2 patch tokens, so that those tokens
  themselves carry what the caption says (colors, shapes, left-to-right order, count);
- hard negative captions (objects reordered, colors swapped between objects, one color/shape changed,
  one object added or dropped), so that binding and order matter, not just the bag of words.

Images with identical captions in a batch are not negatives of each other: the target is spread
uniformly over them. The result is written as a transformers CLIPVisionModel directory.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from itertools import permutations
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import CLIP_MEAN, CLIP_STD, VisionConfig
from ..image import load_image, preprocess
from ..reference.checkpoint import save_clip_vision
from ..reference.vision import VisionTransformer
from .shapes import COLORS, COUNT_WORDS, SHAPES


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
    vision: VisionConfig = field(default_factory=demo_vision_config)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 128
    batch_size: int = 128
    epochs: int = 8
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    patch_loss_weight: float = 0.5  # the auxiliary CLIP loss on pooled layer -2 patch tokens
    attribute_loss_weight: float = 1.0  # which (color, shape) pairs the caption names, from mean layer -2 patches
    hard_negatives: int = 4  # perturbed captions per image, extra image->text negatives
    eval_every: int = 0  # epochs between held-out evaluations printed during training (0: only at the end)
    sincos_positions: bool = False  # True: start the vision positions from a 2-D sin-cos grid (see below)
    seed: int = 0
    num_threads: int = 2

    @classmethod
    def from_dict(cls, raw: dict) -> ClipTrainConfig:
        raw = dict(raw)
        raw["vision"] = VisionConfig(**raw.get("vision", {}))
        raw["text"] = TextEncoderConfig(**raw.get("text", {}))
        return cls(**raw)


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


def render_text(objects: Objects, style: str) -> str:
    """The inverse of parse_caption ("caption"), or the listing style "Two shapes: red circle, blue square."."""
    if style == "listing":
        n = len(objects)
        listing = ", ".join(f"{color} {shape}" for color, shape in objects)
        return f"{COUNT_WORDS[n]} shape{'s' if n > 1 else ''}: {listing}."
    parts = [f"a {color} {shape}" for color, shape in objects]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body[0].upper() + body[1:] + "."


def text_style(text: str) -> str:
    return "listing" if ":" in text else "caption"


PAIRS = [(color, shape) for color in COLORS for shape in SHAPES]


def attribute_targets(objects: Objects | None) -> torch.Tensor:
    """1 for each (color, shape) pair in the scene, over PAIRS (all zeros where the caption did not parse)."""
    target = torch.zeros(len(PAIRS))
    for pair in objects or []:
        target[PAIRS.index(pair)] = 1.0
    return target


def world_captions(max_objects: int = len(COUNT_WORDS)) -> list[str]:
    return [render_text(list(p), "caption") for n in range(1, max_objects + 1) for p in permutations(PAIRS, n)]


PERTURBATIONS = ("order", "bind", "color", "shape", "count")


def perturb(objects: Objects, kind: str, rng: random.Random) -> Objects | None:
    """A description that is wrong for the scene in one way; None where `kind` does not apply."""
    objs, n = list(objects), len(objects)
    if kind in ("order", "bind") and n < 2:
        return None
    if kind == "order":
        i, j = rng.sample(range(n), 2)
        objs[i], objs[j] = objs[j], objs[i]
    elif kind == "bind":
        i, j = rng.sample(range(n), 2)
        (ci, si), (cj, sj) = objs[i], objs[j]
        if ci == cj or si == sj:
            return None
        objs[i], objs[j] = (cj, si), (ci, sj)
    elif kind == "color":
        i = rng.randrange(n)
        objs[i] = (rng.choice([c for c in COLORS if c != objs[i][0]]), objs[i][1])
    elif kind == "shape":
        i = rng.randrange(n)
        objs[i] = (objs[i][0], rng.choice([s for s in SHAPES if s != objs[i][1]]))
    elif kind == "count":
        if n == len(COUNT_WORDS) or (n > 1 and rng.random() < 0.5):
            del objs[rng.randrange(n)]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in objs]
            objs.insert(rng.randrange(n + 1), rng.choice(absent))
    if len(set(objs)) < len(objs):  # the world never repeats a (color, shape) pair in one scene
        return None
    return objs


def hard_negatives(objects: Objects | None, style: str, k: int, rng: random.Random) -> list[str]:
    """k distinct wrong descriptions in `style` (fewer if the scene does not allow k)."""
    if objects is None:
        return []
    out: list[str] = []
    for _ in range(8 * k):
        if len(out) == k:
            break
        wrong = perturb(objects, rng.choice(PERTURBATIONS), rng)
        if wrong is not None and (text := render_text(wrong, style)) not in out:
            out.append(text)
    return out


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

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit embeddings of the image from the CLS of the last layer and from the patch tokens of layer -2,
        and the attribute logits (one per (color, shape) pair) from the mean of those patch tokens."""
        n = self.vision.cfg.num_hidden_layers
        penultimate, last = self.vision(pixel_values, [n - 1, n])
        cls = self.visual_projection(self.vision.post_layernorm(last[:, 0]))
        patches = penultimate[:, 1:]
        pooled = self.patch_pool(patches)
        return F.normalize(cls, dim=-1), F.normalize(pooled, dim=-1), self.attribute_head(patches.mean(1))

    def encode_text(self, tokens: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, eos_index), dim=-1)


def sincos_positions(v: VisionConfig) -> torch.Tensor:
    """[1 + grid*grid, width] position table: zeros for CLS, then each patch's row and column in sin-cos
    features (half the width each), as MAE initialises ViT positions.

    With the default N(0, 0.02) start, positions are ~20x smaller than the patch embeddings and nothing in
    this world's texts rewards growing them, so the demo tower's patch tokens barely say where they are: a
    linear probe reads a patch's column from layer -2 36 % of the time (21 % on objects), 88 % (60 %) with this
    start (bench/tower_position_probe.py). Listing objects left to right needs that; what it did to the demo
    model is in the README's table of what was tried."""
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


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, same: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE. text[:B] pairs with image[:B]; text[B:] are extra negatives for image->text only.
    same[i, j] says images i and j have the same caption: the target is spread over all of them."""
    B = len(image)
    logits = scale * image @ text.T
    target = same.float() / same.sum(1, keepdim=True)
    image_to_text = F.cross_entropy(logits, F.pad(target, (0, len(text) - B)))
    text_to_image = F.cross_entropy(logits[:, :B].T, target)
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- data


def load_pixels(data_dir: Path, rel_paths: list[str], size: int, progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    out = torch.empty(len(rel_paths), 3, size, size)
    for i, rel in enumerate(tqdm(rel_paths, desc="preprocess", unit="img", disable=not progress)):
        out[i] = torch.from_numpy(preprocess(load_image(data_dir / rel), size, CLIP_MEAN, CLIP_STD, "pad"))
    return out


def split_pairs(data_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Training pairs from clip_pairs.json and held-out (image, caption) pairs: the test split's
    "describe" records when the data has them, else the last tenth of clip_pairs."""
    pairs = json.loads((data_dir / "clip_pairs.json").read_text())
    test_path = data_dir / "test.json"
    test = json.loads(test_path.read_text()) if test_path.exists() else []
    heldout = [(r["image"], r["answer"]) for r in test if r.get("question_type") == "describe"]
    if not heldout:
        n = max(1, len(pairs) // 10)
        pairs, heldout = pairs[:-n], [(p["image"], p["caption"]) for p in pairs[-n:]]
    return pairs, heldout


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def image_embeddings(model: ClipModel, pixels: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """encode_image over pixels in chunks: CLS embeddings, patch embeddings, attribute logits."""
    chunks = [model.encode_image(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return [torch.cat(parts) for parts in zip(*chunks)]


@torch.no_grad()
def text_embeddings(model: ClipModel, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model.encode_text(*tokenizer(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)])


def retrieval_accuracy(image_emb: torch.Tensor, captions: list[str], candidates: list[str], text_emb: torch.Tensor) -> float:
    """Image -> text: the share of images whose most similar candidate is their own caption."""
    best = (image_emb @ text_emb.T).argmax(1).tolist()
    return sum(candidates[j] == c for j, c in zip(best, captions)) / len(captions)


def evaluate(model: ClipModel, tokenizer: TextTokenizer, pixels: torch.Tensor, captions: list[str]) -> dict:
    """Retrieval among the distinct captions of this set (CLS and layer -2 patch embeddings), and among
    every caption the world can produce (reordered and rebound ones included) when the captions parse."""
    model.eval()
    cls_emb, patch_emb, attribute_logits = image_embeddings(model, pixels)
    distinct = sorted(set(captions))
    distinct_emb = text_embeddings(model, tokenizer, distinct)
    out = {
        "n_images": len(captions),
        "n_captions": len(distinct),
        "retrieval_acc": retrieval_accuracy(cls_emb, captions, distinct, distinct_emb),
        "patch_retrieval_acc": retrieval_accuracy(patch_emb, captions, distinct, distinct_emb),
    }
    if all(parse_caption(c) is not None for c in captions):
        truth = torch.stack([attribute_targets(parse_caption(c)) for c in captions])
        out["attribute_set_acc"] = ((attribute_logits > 0).float() == truth).all(1).float().mean().item()
        world = world_captions()
        world_emb = text_embeddings(model, tokenizer, world)
        out["world_retrieval_acc"] = retrieval_accuracy(cls_emb, captions, world, world_emb)
        out["world_patch_retrieval_acc"] = retrieval_accuracy(patch_emb, captions, world, world_emb)
        out["n_world_captions"] = len(world)
    model.train()
    return out


# ----------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(model: ClipModel, optimizer, scheduler, loss: torch.Tensor, logit_scale_max: float) -> float:
    """One update; CLIP clamps its learned temperature after every step. Returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, logit_scale_max)
    return loss.item()


def train_clip(cfg: ClipTrainConfig, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Train on data_dir/clip_pairs.json, write the vision tower (CLIPVisionModel dir) and clip_train.json
    to out_dir, and return the metrics."""
    from tqdm import tqdm

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    order_generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()

    pairs, heldout = split_pairs(data_dir)
    if len(pairs) < cfg.batch_size:
        raise ValueError(f"{len(pairs)} training pairs for a batch size of {cfg.batch_size}")
    tokenizer = TextTokenizer(data_dir / "tokenizer.model", cfg.text.context)
    size = cfg.vision.image_size
    pixels = load_pixels(data_dir, [p["image"] for p in pairs], size, progress)
    heldout_pixels = load_pixels(data_dir, [image for image, _ in heldout], size, progress)
    captions = [p["caption"] for p in pairs]
    objects = [parse_caption(c) for c in captions]
    attributes = torch.stack([attribute_targets(o) for o in objects])
    attributes_known = torch.tensor([o is not None for o in objects])
    caption_ids = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    preprocess_s = time.perf_counter() - start

    model = ClipModel(cfg, tokenizer.vocab_size)
    model.train()
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(pairs) // cfg.batch_size  # full batches only: the number of negatives stays fixed
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))

    epoch_losses: list[float] = []
    bar = tqdm(total=total, desc="clip", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(pairs), generator=order_generator)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            texts = [rng.choice(pairs[i]["texts"]) for i in idx.tolist()]
            negatives = [t for i, text in zip(idx.tolist(), texts)
                         for t in hard_negatives(objects[i], text_style(text), cfg.hard_negatives, rng)]
            text_emb = model.encode_text(*tokenizer(texts + negatives))
            cls_emb, patch_emb, attribute_logits = model.encode_image(pixels[idx])
            same = caption_ids[idx][:, None] == caption_ids[idx][None, :]
            scale = model.logit_scale.exp()
            loss = contrastive_loss(cls_emb, text_emb, same, scale)
            if cfg.patch_loss_weight:
                loss = loss + cfg.patch_loss_weight * contrastive_loss(patch_emb, text_emb, same, scale)
            if cfg.attribute_loss_weight and attributes_known[idx].any():
                known = attributes_known[idx]
                attribute_loss = F.binary_cross_entropy_with_logits(attribute_logits[known], attributes[idx][known])
                loss = loss + cfg.attribute_loss_weight * attribute_loss
            losses.append(optimizer_step(model, optimizer, scheduler, loss, cfg.logit_scale_max))
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
        epoch_losses.append(sum(losses) / len(losses))
        line = f"epoch {epoch + 1}: loss {epoch_losses[-1]:.4f}"
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            scores = evaluate(model, tokenizer, heldout_pixels, [c for _, c in heldout])
            line += "".join(f", {k} {v:.3f}" for k, v in scores.items() if k.endswith("_acc"))
        if progress:
            bar.write(line)
    bar.close()
    train_s = time.perf_counter() - start - preprocess_s

    n_train_eval = min(len(pairs), max(len(heldout), 1))
    metrics = {
        "final_loss": epoch_losses[-1],
        "epoch_losses": epoch_losses,
        "logit_scale": model.logit_scale.exp().item(),
        "heldout": evaluate(model, tokenizer, heldout_pixels, [c for _, c in heldout]),
        "train_subset": evaluate(model, tokenizer, pixels[:n_train_eval], captions[:n_train_eval]),
        "n_train": len(pairs),
        "steps": total,
        "preprocess_s": round(preprocess_s, 1),
        "train_s": round(train_s, 1),
    }
    metrics["retrieval_acc"] = metrics["heldout"]["retrieval_acc"]

    model.vision.eval()
    save_clip_vision(model.vision, out_dir, CLIP_MEAN, CLIP_STD)
    record = {"config": asdict(cfg), "data_dir": str(data_dir), "metrics": metrics}
    (out_dir / "clip_train.json").write_text(json.dumps(record, indent=2) + "\n")
    return metrics


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    defaults = ClipTrainConfig()
    parser = argparse.ArgumentParser(description="Pretrain the shapes-world CLIP vision tower (CLIP objective).")
    parser.add_argument("data_dir", help="a shapes-world dataset (clip_pairs.json, tokenizer.model, images/)")
    parser.add_argument("out_dir", help="where the CLIPVisionModel directory is written")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--hard-negatives", type=int, default=defaults.hard_negatives)
    parser.add_argument("--patch-loss-weight", type=float, default=defaults.patch_loss_weight)
    parser.add_argument("--layers", type=int, default=defaults.vision.num_hidden_layers, help="vision layers")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-threads", type=int, default=defaults.num_threads)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = ClipTrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        hard_negatives=args.hard_negatives, patch_loss_weight=args.patch_loss_weight,
        seed=args.seed, num_threads=args.num_threads,
    )
    cfg.vision.num_hidden_layers = args.layers
    metrics = train_clip(cfg, args.data_dir, args.out_dir, progress=not args.quiet)
    summary = {k: v for k, v in metrics.items() if k != "epoch_losses"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
