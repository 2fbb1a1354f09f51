"""The shapes world: a synthetic image/question world the demo model is trained on from scratch.

Scenes are 1-3 coloured shapes on a light background. Every question asked about a scene is
answerable from the pixels and has a one-word answer (docs/design.md, "The shapes world").
Needs numpy, Pillow and sentencepiece only (no torch).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..conversation import IMAGE_TOKEN, TEMPLATES

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
COLOR_RGB = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 25),
}
COLOR_JITTER = 12
BACKGROUND_RANGE = (215, 255)
MIN_SIDE, MAX_SIDE = 160, 320
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.2, 0.45
MAX_OBJECTS = 3
COUNT_WORDS = {1: "One", 2: "Two", 3: "Three"}

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
DESCRIBE_QUESTION = "Describe the image."


@dataclass
class ShapeObject:
    shape: str
    color: str
    cx: int
    cy: int
    size: int  # side of the bounding box, in pixels
    rgb: tuple[int, int, int] | None = None  # exact fill (jittered); None = the palette colour

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with x1, y1 exclusive."""
        x0, y0 = self.cx - self.size // 2, self.cy - self.size // 2
        return x0, y0, x0 + self.size, y0 + self.size

    @property
    def fill(self) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else COLOR_RGB[self.color]


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    objects: list[ShapeObject] = field(default_factory=list)


# --------------------------------------------------------------------------- scenes


def _boxes_apart(a: ShapeObject, b: ShapeObject, margin: int) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0


def _place_objects(rng: np.random.Generator, width: int, height: int, n: int) -> list[ShapeObject] | None:
    short = min(width, height)
    lo, hi = int(np.ceil(MIN_SIZE_FRACTION * short)), int(MAX_SIZE_FRACTION * short)
    margin = max(4, short // 40)
    # Captions list objects left to right; centres this far apart in x keep that order visible.
    min_dx = short // 10
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objects: list[ShapeObject] = []
    for k in chosen:
        color, shape = pairs[k]
        for _ in range(200):
            size = int(rng.integers(lo, hi + 1))
            half = size // 2
            cx = int(rng.integers(half + 2, width - (size - half) - 2 + 1))
            cy = int(rng.integers(half + 2, height - (size - half) - 2 + 1))
            jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLOR_RGB[color]) + jitter, 0, 255))
            candidate = ShapeObject(shape, color, cx, cy, size, rgb)
            if all(_boxes_apart(candidate, o, margin) and abs(candidate.cx - o.cx) >= min_dx for o in objects):
                objects.append(candidate)
                break
        else:
            return None
    return objects


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: size in [160, 320] per side, 1-3 non-overlapping objects with distinct
    (color, shape) pairs, each with a bounding box of 1/5 to 0.45 of the short side."""
    while True:
        width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        background = tuple(int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3))
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        objects = _place_objects(rng, width, height, n)
        if objects is not None:
            return Scene(width, height, background, objects)


def render_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        box = [x0, y0, x1 - 1, y1 - 1]  # PIL boxes are inclusive
        if obj.shape == "circle":
            draw.ellipse(box, fill=obj.fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=obj.fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=obj.fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


# --------------------------------------------------------------------------- language


def _ordered(scene: Scene) -> list[ShapeObject]:
    return sorted(scene.objects, key=lambda o: (o.cx, o.cy))


def _caption_of(pairs: list[tuple[str, str]]) -> str:
    parts = [f"a {color} {shape}" for color, shape in pairs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body[0].upper() + body[1:] + "."


def caption(scene: Scene) -> str:
    """'A red circle, a blue square and a green triangle.' with objects ordered left to right."""
    return _caption_of([(o.color, o.shape) for o in _ordered(scene)])


def color_question(shape: str) -> str:
    return f"What color is the {shape}?{SHORT_ANSWER_SUFFIX}"


def shape_question(color: str) -> str:
    return f"What shape is the {color} object?{SHORT_ANSWER_SUFFIX}"


def count_question() -> str:
    return f"How many shapes are there?{SHORT_ANSWER_SUFFIX}"


def exists_question(color: str, shape: str) -> str:
    return f"Is there a {color} {shape} in the image?{SHORT_ANSWER_SUFFIX}"


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def questions_for(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """One (question_type, question, answer) per question type that the scene can answer
    unambiguously, in scoring.QUESTION_TYPES order. "color" needs a shape present exactly once and
    "shape" a colour present exactly once; the other types always apply."""
    shapes = [o.shape for o in scene.objects]
    colors = [o.color for o in scene.objects]
    out: list[tuple[str, str, str]] = []

    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    if unique_shapes:
        shape = _pick(rng, unique_shapes)
        answer = next(o.color for o in scene.objects if o.shape == shape)
        out.append(("color", color_question(shape), answer.capitalize()))

    unique_colors = [c for c in COLORS if colors.count(c) == 1]
    if unique_colors:
        color = _pick(rng, unique_colors)
        answer = next(o.shape for o in scene.objects if o.color == color)
        out.append(("shape", shape_question(color), answer.capitalize()))

    out.append(("count", count_question(), COUNT_WORDS[len(scene.objects)]))

    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = _pick(rng, sorted(present))
        out.append(("exists", exists_question(color, shape), "Yes"))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # Mostly ask about a pair that shares a colour or shape with the scene, so "No" needs
        # the combination to be checked rather than the mere presence of a colour.
        near = [(c, s) for c, s in absent if c in colors or s in shapes]
        color, shape = _pick(rng, near if near and rng.random() < 0.75 else absent)
        out.append(("exists", exists_question(color, shape), "No"))

    out.append(("describe", DESCRIBE_QUESTION, caption(scene)))
    return out


def object_boxes(scene: Scene) -> list[dict]:
    """Where each object is, for the tower's patch-level grounding loss."""
    return [{"color": o.color, "shape": o.shape, "bbox": list(o.bbox)} for o in scene.objects]


def clip_texts(scene: Scene) -> list[str]:
    """Texts that describe the scene, for the contrastive pretraining of the vision tower."""
    ordered = _ordered(scene)
    n = len(ordered)
    listing = ", ".join(f"{o.color} {o.shape}" for o in ordered)
    return [caption(scene), f"{COUNT_WORDS[n]} shape{'s' if n > 1 else ''}: {listing}."]


def world_texts() -> list[str]:
    """Every text the world can produce (all captions, questions, answers) plus the chat templates'
    fixed strings, for training the tokenizer. Independent of any sample, so deterministic."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    captions = [_caption_of(list(p)) for n in range(1, MAX_OBJECTS + 1) for p in permutations(pairs, n)]
    questions = [count_question(), DESCRIBE_QUESTION]
    questions += [color_question(s) for s in SHAPES] + [shape_question(c) for c in COLORS]
    questions += [exists_question(c, s) for c, s in pairs]
    answers = [c.capitalize() for c in COLORS] + [s.capitalize() for s in SHAPES]
    answers += list(COUNT_WORDS.values()) + ["Yes", "No"] + [str(n) for n in COUNT_WORDS]
    vicuna = TEMPLATES["vicuna_v1"]
    user, assistant = vicuna.roles
    dialogues = [f"{vicuna.system} {user}: {q} {assistant}: {a}" for q in questions for a in answers]
    # Dialogues repeat the system prompt and pair every question with every answer, which weights
    # the BPE merges so that each world word (and the prompt's words) ends up a single piece.
    # Characters outside the world (most digits, other letters) fall back to bytes.
    texts = [vicuna.system, f"{user}:", f"{assistant}:", SHORT_ANSWER_SUFFIX.strip()]
    return texts + questions + answers + captions + dialogues


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out_path_prefix: str | Path, vocab_size: int = 512) -> Path:
    """A SentencePiece BPE model with LLaMA's settings (byte fallback, unk/bos/eos = 0/1/2, no pad).
    Writes `{out_path_prefix}.model` and returns its path."""
    import sentencepiece as spm

    # 256 byte pieces + unk, bos, eos, plus a piece per distinct character (coverage 1.0)
    needed = 259 + len({ch for text in texts for ch in text if ch != " "}) + 1  # + "▁" for space
    if vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size} is too small for these texts: at least {needed} needed")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentencepiece_length=16,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        unk_surface=" \u2047 ",
        num_threads=1,  # one thread keeps the merges, and so the file, deterministic
        minloglevel=2,
    )
    path = Path(f"{out_path_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


# --------------------------------------------------------------------------- dataset


def _human(text: str) -> dict:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _instruction_turns(qas: list[tuple[str, str, str]], rng: np.random.Generator, describe_always: bool) -> list[dict]:
    """2-4 of the scene's questions in random order, as one conversation. With describe_always the
    description is always one of them (at a random turn): it is the hardest answer to learn."""
    n_turns = min(len(qas), int(rng.integers(2, 5)))
    order = list(rng.permutation(len(qas)))
    if describe_always:
        describe = next(i for i, (qtype, _, _) in enumerate(qas) if qtype == "describe")
        order.remove(describe)
        order.insert(int(rng.integers(n_turns)), describe)
    turns: list[dict] = []
    for k, (_, question, answer) in enumerate(qas[i] for i in order[:n_turns]):
        turns += [_human(f"{IMAGE_TOKEN}\n{question}" if k == 0 else question), _gpt(answer)]
    return turns


def _write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")


def build_dataset(
    out_dir: str | Path, n_train_images: int, n_test_images: int, seed: int = 0,
    vocab_size: int = 512, progress: bool = True, describe_always: bool = False,
) -> dict[str, Path]:
    """Render the world into out_dir: images/, stage1.json (captions), stage2.json (instructions),
    test.json (held-out images, one scored question per record), clip_pairs.json, tokenizer.model."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    stage1, stage2, test, clip_pairs = [], [], [], []
    jobs = [("train", i) for i in range(n_train_images)] + [("test", i) for i in range(n_test_images)]
    for split, i in tqdm(jobs, desc="shapes world", unit="img", disable=not progress or len(jobs) < 100):
        # One stream per image: an image does not depend on how many others are built.
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        scene = sample_scene(rng)
        image_id = f"{split}_{i:06d}"
        rel = f"images/{image_id}.png"
        render_scene(scene).save(out_dir / rel, compress_level=1)
        qas = questions_for(scene, rng)
        if split == "train":
            cap = caption(scene)
            stage1.append({"id": image_id, "image": rel, "conversations": [_human(f"{IMAGE_TOKEN}\n"), _gpt(cap)]})
            stage2.append({"id": image_id, "image": rel, "conversations": _instruction_turns(qas, rng, describe_always)})
            clip_pairs.append({"id": image_id, "image": rel, "caption": cap, "texts": clip_texts(scene),
                               "size": [scene.width, scene.height], "objects": object_boxes(scene)})
        else:
            for qtype, question, answer in qas:
                test.append({
                    "id": f"{image_id}_{qtype}", "image": rel,
                    "conversations": [_human(f"{IMAGE_TOKEN}\n{question}"), _gpt(answer)],
                    "question_type": qtype, "answer": answer,
                })
    paths = {
        "images": out_dir / "images",
        "stage1": out_dir / "stage1.json",
        "stage2": out_dir / "stage2.json",
        "test": out_dir / "test.json",
        "clip_pairs": out_dir / "clip_pairs.json",
    }
    _write_json(paths["stage1"], stage1)
    _write_json(paths["stage2"], stage2)
    _write_json(paths["test"], test)
    _write_json(paths["clip_pairs"], clip_pairs)
    paths["tokenizer"] = train_tokenizer(world_texts(), out_dir / "tokenizer", vocab_size)
    return paths


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the shapes-world dataset and tokenizer.")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=200, help="held-out images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--describe-always", action="store_true", help="every stage-2 conversation holds the description")
    args = parser.parse_args(argv)
    paths = build_dataset(args.out_dir, args.train, args.test, args.seed, args.vocab_size,
                          describe_always=args.describe_always)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
